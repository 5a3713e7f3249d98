"""transport._runtime.shared.SharedRun: concurrent callers share reads, and none gets
a result taken before its call began."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from transport._runtime.shared import SharedRun


class _Reads:
    """A read that takes until released; returns when it started."""

    def __init__(self) -> None:
        self.clock = itertools.count()
        self.started: list[int] = []
        self.release = asyncio.Event()
        self.fail: Exception | None = None
        self._changed = asyncio.Condition()

    async def started_count(self, n: int) -> None:
        """Until ``n`` reads have started (5 s at most)."""
        async with asyncio.timeout(5), self._changed:
            await self._changed.wait_for(lambda: len(self.started) >= n)

    async def __call__(self) -> int:
        stamp = next(self.clock)
        self.started.append(stamp)
        async with self._changed:
            self._changed.notify_all()
        await self.release.wait()
        self.release.clear()
        if self.fail is not None:
            raise self.fail
        return stamp


async def test_a_burst_shares_one_read_that_starts_after_every_call() -> None:
    reads = _Reads()
    run = SharedRun(reads)
    first = asyncio.create_task(run())
    await reads.started_count(1)
    called_at = next(reads.clock)  # every later caller calls after this
    burst = [asyncio.create_task(run()) for _ in range(20)]
    await asyncio.sleep(0)
    reads.release.set()
    assert await first == 0
    await reads.started_count(2)
    reads.release.set()
    results = await asyncio.gather(*burst)
    assert len(reads.started) == 2
    assert all(stamp > called_at for stamp in results), "a caller got a read older than its call"


async def test_a_cancelled_caller_does_not_cancel_the_read_of_others() -> None:
    reads = _Reads()
    run = SharedRun(reads)
    quitter, stayer = asyncio.create_task(run()), asyncio.create_task(run())
    await reads.started_count(1)
    quitter.cancel()
    reads.release.set()
    assert await stayer == 0
    assert quitter.cancelled()


async def test_a_failed_read_fails_its_callers_and_the_next_call_reads_again() -> None:
    reads = _Reads()
    run = SharedRun(reads)
    reads.fail = RuntimeError("broker down")
    callers = [asyncio.create_task(run()) for _ in range(3)]
    await reads.started_count(1)
    reads.release.set()
    for caller in callers:
        with pytest.raises(RuntimeError, match="broker down"):
            await caller
    reads.fail = None
    again = asyncio.create_task(run())
    await reads.started_count(2)
    reads.release.set()
    assert await again == 1


async def test_aclose_cancels_a_read_in_progress() -> None:
    reads = _Reads()
    run = SharedRun(reads)
    caller = asyncio.create_task(run())
    await reads.started_count(1)
    await run.aclose()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_in_flight_runs_once_for_concurrent_callers_and_survives_a_cancelled_one() -> None:
    from transport.kit import InFlight

    runs: list[str] = []
    release = asyncio.Event()

    async def create(key: str) -> None:
        runs.append(key)
        await release.wait()

    in_flight: InFlight[str] = InFlight()
    callers = [asyncio.create_task(in_flight.run("a", lambda: create("a"))) for _ in range(50)]
    other = asyncio.create_task(in_flight.run("b", lambda: create("b")))
    await asyncio.sleep(0)  # every caller joins before the run can end
    callers[0].cancel()
    release.set()
    results = await asyncio.gather(*callers, other, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [None] * 50
    assert sorted(runs) == ["a", "b"], runs  # one run per key, the cancelled caller did not stop it


async def test_in_flight_gives_the_error_to_every_caller_and_runs_again_after() -> None:
    from transport.kit import InFlight

    attempts = 0

    async def failing() -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        raise RuntimeError(f"attempt {attempts}")

    in_flight: InFlight[str] = InFlight()
    results = await asyncio.gather(
        *(in_flight.run("k", failing) for _ in range(5)), return_exceptions=True
    )
    assert [str(r) for r in results] == ["attempt 1"] * 5
    with pytest.raises(RuntimeError, match="attempt 2"):
        await in_flight.run("k", failing)
