"""SIGKILL scenarios (TESTING.md 6, 11): a real worker process is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

from transport import RequestQueue, Transport, WorkRequest
from transport.testing._util import (
    Budget,
    await_dead_letters,
    drain,
    drain_ids,
    enqueue_all,
    make_requests,
)
from transport.testing.harness import BackendHarness


def _lost(harness: BackendHarness, message: str) -> None:
    """Fail a scenario that lost requests, unless the test broker recorded a
    documented defect of its own during the test (then xfail with it)."""
    gap = harness.known_broker_gap()
    if gap:
        pytest.xfail(f"{message}; the test broker's documented gap: {gap}")
    notes = harness.broker_notes()
    pytest.fail(f"{message}. {notes}" if notes else message)


pytestmark = [pytest.mark.conformance, pytest.mark.crash, pytest.mark.asyncio]


class WorkerProcess:
    """``python -m transport.testing.worker`` whose stdout is read
    continuously (so a chatty worker never blocks on a full pipe) into
    :attr:`lines`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._cursor = 0
        self._changed = asyncio.Condition()
        self._eof = False
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            async with self._changed:
                if not raw:
                    self._eof = True
                else:
                    self.lines.append(raw.decode().strip())
                self._changed.notify_all()
            if not raw:
                return

    @classmethod
    async def start(cls, harness: BackendHarness, *args: str) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "transport.testing.worker",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=harness.subprocess_env(),
        )
        return cls(proc)

    async def wait_for(self, prefix: str, timeout: float) -> str:
        """The next line (after those already returned) starting with ``prefix``.

        Raises: TimeoutError; AssertionError if the worker exited first.
        """
        async with asyncio.timeout(timeout), self._changed:
            while True:
                while self._cursor < len(self.lines):
                    line = self.lines[self._cursor]
                    self._cursor += 1
                    if line.startswith(prefix):
                        return line
                if self._eof:
                    stderr = b""
                    if self.proc.stderr is not None:
                        stderr = await self.proc.stderr.read()
                    raise AssertionError(
                        f"worker exited: {stderr.decode(errors='replace')[-2000:]}"
                    )
                await self._changed.wait()

    def kill(self) -> None:
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def reap(self) -> None:
        """SIGKILL the worker, wait for it, and collect all it had printed."""
        self.kill()
        await self.proc.wait()
        await self._reader

    def ids(self, verb: str) -> list[str]:
        return [line.split()[1] for line in self.lines if line.startswith(verb + " ")]


def check_timely(harness: BackendHarness, what: str, took: float, bound: float) -> None:
    """Fail if ``what`` took longer than ``bound`` seconds — or, where the
    harness records that its test broker redelivers a killed consumer's
    requests late (``slow_crash_redelivery``), xfail with that reason.
    Called only once nothing was lost: losing a request always fails."""
    if took <= bound:
        return
    if harness.slow_crash_redelivery:
        pytest.xfail(
            f"{what} took {took:.1f} s (bound {bound:.1f} s): {harness.slow_crash_redelivery}"
        )
    pytest.fail(f"{what} took {took:.1f} s, more than {bound:.1f} s")


async def _kill_at_max_attempts_1(
    transport: Transport, queue_name: str, harness: BackendHarness, budget: Budget, *, levels: int
) -> None:
    """Enqueue 18 requests (over ``levels`` priority levels, or a plain
    queue), let a worker at ``max_attempts=1`` take one and SIGKILL it: the
    other 17 are handed out at attempt 1, only the killed one's request is
    dead-lettered."""
    queue: RequestQueue
    if levels:
        queue = transport.priority_queue(
            queue_name, levels=levels, lease_seconds=harness.lease_seconds, max_attempts=1
        )
        requests = [
            WorkRequest(task="work", priority=i % levels, payload={"n": i}) for i in range(18)
        ]
    else:
        queue = transport.request_queue(
            queue_name, lease_seconds=harness.lease_seconds, max_attempts=1
        )
        requests = make_requests(18)
    sent = await enqueue_all(queue, requests)
    args = ["--queue", queue_name, "--mode", "hold", "--count", "1"]
    args += ["--lease", str(harness.lease_seconds), "--max-attempts", "1"]
    if levels:
        args += ["--priority-levels", str(levels)]
    worker = await WorkerProcess.start(harness, *args)
    try:
        await worker.wait_for("READY", budget.left(harness.scaled(60)))
    finally:
        await worker.reap()
    [killed_id] = worker.ids("LEASED")
    others = {r.request_id for r in sent} - {killed_id}
    got = await drain_ids(queue, others, budget.left())
    dead = await queue.dead_letters(50)
    unseen = sorted(d.request_id or "" for d in dead if d.request_id in others)
    assert not unseen, f"dead-lettered without a delivery: {unseen}"
    missing = others - {d.request.request_id for d in got}
    if missing:
        _lost(harness, f"lost after the SIGKILL: {sorted(missing)}")
    assert {d.request.request_id: d.attempt for d in got} == dict.fromkeys(others, 1)
    if not dead:  # the killed one's only attempt is used: it goes to the dead letters
        dead = await await_dead_letters(queue, 1, budget.left(harness.scaled(10)))
    assert [d.request_id for d in dead] == [killed_id]


class CrashConformance:
    """Only for backends whose state outlives a process (``persistent``).

    Every scenario first requires that nothing is lost, waiting for it up to
    the test's budget (its timeout less a teardown margin); only then does
    it check that the redeliveries came within the usual time
    (:func:`check_timely`)."""

    # On the class, so a subclass in a backend's test module carries the
    # markers too (a module's pytestmark only marks that module's tests).
    pytestmark = [pytest.mark.conformance, pytest.mark.crash]

    @pytest.fixture(autouse=True)
    def _needs_persistence(self, harness: BackendHarness) -> None:
        if not harness.capabilities.persistent:
            pytest.skip(
                "backend state does not outlive a process (capability 'persistent' is false)"
            )

    async def test_sigkill_mid_handler_is_redelivered_with_higher_attempt(
        self, transport: Transport, queue_name: str, harness: BackendHarness, budget: Budget
    ) -> None:
        queue = transport.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        sent = await enqueue_all(queue, make_requests(3))
        worker = await WorkerProcess.start(
            harness,
            "--queue",
            queue_name,
            "--mode",
            "hold",
            "--count",
            "1",
            "--lease",
            str(harness.lease_seconds),
        )
        try:
            await worker.wait_for("READY", budget.left(harness.scaled(60)))
        finally:
            await worker.reap()
        [killed_id] = worker.ids("LEASED")
        killed_at = time.monotonic()
        got = await drain(queue, 3, budget.left())
        missing = {r.request_id for r in sent} - {d.request.request_id for d in got}
        if missing:
            _lost(harness, f"lost after the SIGKILL: {sorted(missing)} (killed {killed_id})")
        took = time.monotonic() - killed_at
        again = next(d for d in got if d.request.request_id == killed_id)
        # Handed out once before the kill: exactly one more attempt. A kill
        # may also count one delivery of requests the worker had reserved or
        # prefetched but not handed out (never more than one per kill).
        assert again.attempt == 2
        others = [d.attempt for d in got if d is not again]
        assert all(a in (1, 2) for a in others), others
        bound = harness.scaled(30) + 2 * harness.lease_seconds
        check_timely(harness, "redelivery after SIGKILL", took, bound)

    async def test_sigkill_at_max_attempts_1_dead_letters_only_the_request_handed_out(
        self, transport: Transport, queue_name: str, harness: BackendHarness, budget: Budget
    ) -> None:
        """``max_attempts=1``: a request is never run twice. A worker killed
        holding one request used that request's only attempt, and no other:
        the requests it had prefetched, reserved or counted ahead without
        handing them out are delivered to the next worker (at attempt 1),
        not dead-lettered as exhausted without any handler having seen
        them."""
        await _kill_at_max_attempts_1(transport, queue_name, harness, budget, levels=0)

    async def test_sigkill_of_a_priority_worker_at_max_attempts_1_dead_letters_only_its_request(
        self, transport: Transport, queue_name: str, harness: BackendHarness, budget: Budget
    ) -> None:
        """As above for a priority queue of three levels, whose poll leases
        the head of every level to compare them: the heads that lost are
        not held (they would be exhausted by the kill), they are given back
        uncounted before the winner is handed out (before, every backend
        dead-lettered the other two levels' heads unseen)."""
        await _kill_at_max_attempts_1(transport, queue_name, harness, budget, levels=3)

    async def test_sigkill_after_out_of_order_acks_redelivers_the_unacked(
        self, transport: Transport, queue_name: str, harness: BackendHarness, budget: Budget
    ) -> None:
        queue = transport.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        sent = await enqueue_all(queue, make_requests(5))
        worker = await WorkerProcess.start(
            harness,
            "--queue",
            queue_name,
            "--mode",
            "ack-all-but-oldest",
            "--count",
            "5",
            "--lease",
            str(harness.lease_seconds),
        )
        try:
            await worker.wait_for("READY", budget.left(harness.scaled(60)))
        finally:
            await worker.reap()
        leased, acked = worker.ids("LEASED"), worker.ids("ACKED")
        unacked = set(leased) - set(acked)
        assert len(unacked) == 1
        later = await enqueue_all(queue, make_requests(5))
        # Without individual acks, acked ones may come back too (only a
        # prefix was committed); they are allowed, not required.
        required = {r.request_id for r in later} | unacked
        killed_at = time.monotonic()
        got = await drain_ids(queue, required, budget.left())
        took = time.monotonic() - killed_at
        seen = {d.request.request_id for d in got}
        if not unacked <= seen:
            _lost(harness, f"the unacked request {sorted(unacked)} was not redelivered")
        lost = {r.request_id for r in later} - seen
        if lost:
            _lost(
                harness, f"{len(lost)} of 5 requests enqueued after the kill lost: {sorted(lost)}"
            )
        if harness.capabilities.individual_acks:
            assert not (seen & set(acked)), "acked requests came back"
        assert seen <= {r.request_id for r in sent} | {r.request_id for r in later}
        check_timely(
            harness,
            "redelivery after SIGKILL",
            took,
            harness.scaled(30) + 2 * harness.lease_seconds,
        )

    async def test_repeated_sigkills_lose_nothing(
        self, transport: Transport, queue_name: str, harness: BackendHarness, budget: Budget
    ) -> None:
        total = 200
        queue = transport.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        sent = await asyncio.gather(*(queue.enqueue(r) for r in make_requests(total)))
        wanted = {r.request_id for r in sent}
        acked: set[str] = set()
        in_flight_at_kill: set[str] = set()
        # Acks under way when their worker was killed: such a request may be
        # gone (the broker took the ack before the worker could say so) or
        # come back; either is right, neither is a loss.
        unsure: set[str] = set()
        duplicates: list[str] = []
        kills = 0
        started = time.monotonic()
        while not wanted <= acked | unsure and not budget.expired():
            worker = await WorkerProcess.start(
                harness,
                "--queue",
                queue_name,
                "--mode",
                "process",
                "--lease",
                str(harness.lease_seconds),
            )
            read = 0  # ACKED lines of this worker read so far
            try:
                await worker.wait_for("STARTED", budget.left(harness.scaled(60)))
                target = min(len(acked) + 40, total)
                try:
                    while len(acked) < target:
                        line = await worker.wait_for(
                            "ACKED", budget.left(harness.scaled(30) + 2 * harness.lease_seconds)
                        )
                        read += 1
                        rid = line.split()[1]
                        if rid in acked:
                            duplicates.append(rid)
                        acked.add(rid)
                except TimeoutError:
                    pass
            finally:
                await worker.reap()
            kills += 1
            # A fast worker acks more before the kill lands than were read
            # up to the target: ack() returned for those too, so they are
            # acked (and must not come back), not lost.
            for rid in worker.ids("ACKED")[read:]:
                if rid in acked:
                    duplicates.append(rid)
                acked.add(rid)
            in_flight_at_kill |= set(worker.ids("LEASED")) - set(worker.ids("ACKED"))
            unsure |= (
                set(worker.ids("ACKING")) - set(worker.ids("ACKED")) - set(worker.ids("STALE"))
            )
        unsure -= acked
        # Those that come back are taken and acked here; those that do not
        # were acked by the killed worker.
        drain_until = time.monotonic() + harness.scaled(5) + 2 * harness.lease_seconds
        while unsure - acked and time.monotonic() < drain_until and not budget.expired():
            delivery = await queue.poll(min(1.0, budget.left(1.0)))
            if delivery is not None:
                if delivery.request.request_id in acked:
                    duplicates.append(delivery.request.request_id)
                acked.add(delivery.request.request_id)
                await delivery.ack()
        took = time.monotonic() - started
        lost = wanted - acked - unsure
        if lost:
            _lost(
                harness,
                f"{len(lost)} of {total} requests never acked after {kills} SIGKILLs in "
                f"{took:.0f} s: {sorted(lost)[:5]}",
            )
        assert kills >= 2, f"only {kills} worker(s) killed: the scenario did not kill mid-run"
        # Duplicates only among requests that were in flight when a worker died
        # (or, without individual acks, acked but not yet committed).
        if harness.capabilities.individual_acks:
            outside = set(duplicates) - in_flight_at_kill
            assert not outside, f"{len(outside)} duplicates were not in flight at a kill"
        check_timely(
            harness, f"{total} requests through {kills} SIGKILLs", took, harness.scaled(120)
        )
