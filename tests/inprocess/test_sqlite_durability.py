"""``sqlite://`` under SIGKILL: producers and workers are real processes,
killed at random points; nothing acknowledged may be lost."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from transport import TransportConfig, WorkRequest, connect
from transport.testing._crash_suite import WorkerProcess
from transport.testing._util import drain
from transport.testing.harness import BackendHarness
from transport_inprocess import SqliteTransport

pytestmark = [pytest.mark.asyncio, pytest.mark.crash]


@pytest.fixture
def harness(tmp_path: Path) -> BackendHarness:
    config = TransportConfig(
        url=f"sqlite:///{tmp_path / 'crash.db'}", options={"poll_interval": 0.02}
    )
    return BackendHarness(config, SqliteTransport.capabilities)


async def _run_until_killed(worker: WorkerProcess, after: float) -> None:
    """Read the worker's output until ``after`` seconds passed, then SIGKILL it."""
    await worker.wait_for("STARTED", 30)
    try:
        await worker.wait_for("\x00never", after)
    except TimeoutError:
        pass
    finally:
        await worker.reap()


async def test_enqueue_that_returned_survives_sigkill_of_the_producer(
    harness: BackendHarness,
) -> None:
    confirmed: list[str] = []
    for _ in range(3):
        producer = await WorkerProcess.start(
            harness, "--queue", "durable", "--mode", "produce", "--count", "100000"
        )
        await _run_until_killed(producer, random.uniform(0.3, 0.8))
        confirmed += producer.ids("ENQUEUED")
    assert len(confirmed) > 10
    transport = await connect(harness.config)
    try:
        queue = transport.request_queue("durable")
        depth = (await queue.stats()).depth
        got = await drain(queue, depth, 60)
        stored = {d.request.request_id for d in got}
        lost = set(confirmed) - stored
        assert not lost, f"{len(lost)} of {len(confirmed)} confirmed enqueues lost"
    finally:
        await transport.aclose()


# Bounded by its 60 rounds of two worker lives (each a process start plus
# 0.4-1.2 s of work), not by a clock: on a loaded machine most of a life is
# the interpreter starting, so it needs more rounds than the default timeout.
@pytest.mark.timeout(360)
async def test_workers_killed_at_random_points_lose_nothing(harness: BackendHarness) -> None:
    total = 1500
    harness.config = harness.config.model_copy(update={"max_attempts": 50})
    transport = await connect(harness.config)
    try:
        queue = transport.request_queue("jobs")
        sent = await asyncio.gather(
            *(queue.enqueue(WorkRequest(task="job", payload={"i": i})) for i in range(total))
        )
        wanted = {r.request_id for r in sent}
        handled: list[str] = []
        in_flight_at_kill: set[str] = set()
        kills = 0

        async def one_life() -> None:
            nonlocal kills
            worker = await WorkerProcess.start(
                harness, "--queue", "jobs", "--mode", "process", "--lease", "1.0"
            )
            await _run_until_killed(worker, random.uniform(0.4, 1.2))
            kills += 1
            handled.extend(worker.ids("LEASED"))
            in_flight_at_kill.update(set(worker.ids("LEASED")) - set(worker.ids("ACKED")))

        for _round in range(60):
            if (await queue.stats()).depth == 0 and wanted <= set(handled):
                break
            await asyncio.gather(one_life(), one_life())  # two workers share the file
        stats = await queue.stats()
        assert stats.depth == 0 and stats.dead_lettered == 0
        assert kills >= 4
        assert wanted <= set(handled), f"{len(wanted - set(handled))} requests never processed"
        counts: dict[str, int] = {}
        for rid in handled:
            counts[rid] = counts.get(rid, 0) + 1
        duplicates = {rid for rid, n in counts.items() if n > 1}
        assert duplicates <= in_flight_at_kill, "a duplicate that was not in flight at a kill"
        print(
            f"processed {total} with {kills} SIGKILLs; {len(duplicates)} duplicates, all in flight at a kill"
        )
    finally:
        await transport.aclose()


async def test_several_processes_share_one_file_without_double_delivery(
    harness: BackendHarness,
) -> None:
    """Two worker processes and this one compete; every request is leased by
    exactly one of them (no lease expires here: the default lease is 30 s)."""
    total = 300
    transport = await connect(harness.config)
    try:
        queue = transport.request_queue("shared")
        sent = await asyncio.gather(
            *(queue.enqueue(WorkRequest(task="job", payload={"i": i})) for i in range(total))
        )
        workers = [
            await WorkerProcess.start(harness, "--queue", "shared", "--mode", "process")
            for _ in range(2)
        ]
        try:
            for worker in workers:
                await worker.wait_for("STARTED", 30)
            mine = await drain(queue, total, 3)
            # Wait until the other processes have finished the rest; only the
            # shared file tells (no cross-process event exists).
            async with asyncio.timeout(60):
                while True:
                    stats = await queue.stats()
                    if stats.depth == 0 and stats.in_flight == 0:
                        break
                    await asyncio.sleep(0.05)
        finally:
            for worker in workers:
                await worker.reap()
        leased = [d.request.request_id for d in mine] + [
            rid for w in workers for rid in w.ids("ACKED")
        ]
        assert any(w.ids("ACKED") for w in workers), "the worker processes took no share"
        assert sorted(leased) == sorted(r.request_id for r in sent)
        assert len(set(leased)) == total
    finally:
        await transport.aclose()
