"""Conformance scenarios for clean restarts: attempts count deliveries (a
request handed to a handler), not sessions. A clean close gives back what
it reserved or prefetched without counting it; a request polled and
released by a clean close comes back with exactly one more attempt.

Also: a forgotten ``aclose()`` (the interpreter still exits), and messages
written by another program (TESTING.md lifecycle)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sys
import time
import uuid
import weakref
from collections import Counter
from typing import Any

import pytest

from transport import (
    Delivery,
    Ensemble,
    RequestQueue,
    TaskContext,
    Transport,
    WorkRequest,
    WorkResponse,
)
from transport.errors import ClosedResourceError
from transport.kit import WIRE_SCHEMA_VERSION, wait_within
from transport.testing._util import await_dead_letters, enqueue_all, make_requests
from transport.testing.harness import BackendHarness

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]

MAX_ATTEMPTS = 3


async def _assert_still_waiting(
    task: asyncio.Task[Any], harness: BackendHarness, what: str
) -> None:
    """The poll in ``task`` is still waiting a moment later (a poll that
    failed or returned at once would make the rest of a test meaningless)."""
    done, _ = await asyncio.wait({task}, timeout=harness.scaled(0.5))
    assert not done, f"{what} ended: {task!r}"


async def _assert_ends_closed(task: asyncio.Task[Any], harness: BackendHarness, what: str) -> None:
    """``task``'s poll ends soon with ``ClosedResourceError``: not a hang,
    not a ``CancelledError`` in a task nobody cancelled."""
    done, _ = await asyncio.wait({task}, timeout=harness.scaled(5))
    assert done, f"{what} left its poll(None) waiting"
    assert not task.cancelled(), "the poll's task was cancelled, nobody cancelled it"
    error = task.exception()
    assert isinstance(error, ClosedResourceError), f"the poll ended with {error!r}"


async def _cancel_unfinished(*tasks: asyncio.Task[Any] | None) -> None:
    for task in tasks:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class CleanRestartConformance:
    """Short sessions (connect, poll, settle, ``aclose()``) one after the
    other on one queue, each a new client of the backend. No capability
    gate: every backend shares a queue between clients (``memory://``
    between the clients of one process, which is all these need)."""

    def open_queue(self, transport: Transport, name: str) -> RequestQueue:
        return transport.request_queue(name, max_attempts=MAX_ATTEMPTS)

    async def _session(
        self, make_transport: Any, name: str, harness: BackendHarness, *, ack: bool
    ) -> Delivery | None:
        """One session: connect, poll one request, ack it (or not), close."""
        client = await make_transport()
        try:
            queue = self.open_queue(client, name)
            delivery = await queue.poll(harness.scaled(20))
            if delivery is not None and ack:
                assert await delivery.ack(), "ack of a live delivery did not take effect"
            return delivery
        finally:
            await client.aclose()

    async def _next_worker_takes(
        self,
        make_transport: Any,
        name: str,
        harness: BackendHarness,
        count: int,
        acked: set[str],
        *,
        batch: bool,
    ) -> dict[str, int]:
        """A new worker takes and acks ``count`` requests (one ``poll`` at a
        time, or ``poll_many(8)`` with ``batch``), none of them in
        ``acked`` and none twice; returns each one's attempt."""
        rest: dict[str, int] = {}
        deadline = time.monotonic() + harness.scaled(60)
        nxt = await make_transport()
        try:
            queue = self.open_queue(nxt, name)
            while len(rest) < count and time.monotonic() < deadline:
                if batch:
                    got = await queue.poll_many(8, 1.0)
                else:
                    one = await queue.poll(1.0)
                    got = [] if one is None else [one]
                for delivery in got:
                    rid = delivery.request.request_id
                    assert rid not in acked, f"acked request {rid} delivered again"
                    assert rid not in rest, f"{rid} delivered twice to the next worker"
                    rest[rid] = delivery.attempt
                    assert await delivery.ack()
        finally:
            await nxt.aclose()
        return rest

    async def test_clean_sessions_count_only_deliveries(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        producer = self.open_queue(transport, queue_name)
        sent = await enqueue_all(producer, make_requests(5))
        wanted = {r.request_id for r in sent}
        handed: Counter[str] = Counter()  # deliveries seen per request
        acked: set[str] = set()
        log: list[str] = []
        # Seven sessions: the second closes without acking; the other six ack
        # what they get (five requests + one redelivery = six deliveries).
        index = {r.request_id: i for i, r in enumerate(sent)}
        for session in range(1, 7):
            ack = session != 2
            delivery = await self._session(make_transport, queue_name, harness, ack=ack)
            assert delivery is not None, f"session {session} got nothing ({log})"
            rid = delivery.request.request_id
            assert rid in wanted
            assert rid not in acked, f"acked request {rid} delivered again ({log})"
            handed[rid] += 1
            log.append(f"s{session}:r{index[rid]}@{delivery.attempt}{'' if ack else ' released'}")
            # Exact: one attempt per handing to a handler, nothing for the
            # sessions that prefetched or reserved it without handing it out.
            assert delivery.attempt == handed[rid], (
                f"request delivered {handed[rid]} time(s) has attempt {delivery.attempt} ({log})"
            )
            if ack:
                acked.add(rid)
        # The seventh session gets a request enqueued only now, at attempt 1:
        # nothing of the five is left over, and the session is live.
        [late] = await enqueue_all(producer, make_requests(1))
        seventh = await self._session(make_transport, queue_name, harness, ack=True)
        assert seventh is not None, f"session 7 got nothing ({log})"
        assert (seventh.request.request_id, seventh.attempt) == (late.request_id, 1), (
            f"session 7 got {index.get(seventh.request.request_id, 'the late request')} "
            f"at attempt {seventh.attempt} ({log})"
        )
        assert acked == wanted, f"not every request was delivered and acked ({log})"
        assert sorted(handed.values()) == [1, 1, 1, 1, 2], log
        dead = await producer.dead_letters()
        assert dead == [], f"dead-lettered: {[(d.request_id, d.error) for d in dead]} ({log})"

    async def test_released_at_every_attempt_dead_letters_only_that_request(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        producer = self.open_queue(transport, queue_name)
        sent = await enqueue_all(producer, make_requests(3))
        # The first request handed out is released by a clean close at each
        # of its attempts; it comes back with exactly one more each time.
        first = await self._session(make_transport, queue_name, harness, ack=False)
        assert first is not None and first.attempt == 1
        released = first.request.request_id
        attempts = [first.attempt]
        others: dict[str, int] = {}
        sessions = 1
        while len(attempts) < MAX_ATTEMPTS or len(others) < len(sent) - 1:
            sessions += 1
            assert sessions <= 2 * len(sent) + MAX_ATTEMPTS, (
                f"too many sessions: released at {attempts}, others {others}"
            )
            client = await make_transport()
            try:
                queue = self.open_queue(client, queue_name)
                delivery = await queue.poll(harness.scaled(20))
                assert delivery is not None, (
                    f"session {sessions} got nothing: released at {attempts}, others {others}"
                )
                rid = delivery.request.request_id
                if rid == released:
                    attempts.append(delivery.attempt)  # closed without acking
                else:
                    assert rid not in others, f"acked request {rid} delivered again"
                    others[rid] = delivery.attempt
                    assert await delivery.ack()
            finally:
                await client.aclose()
        assert attempts == list(range(1, MAX_ATTEMPTS + 1)), attempts
        assert set(others.values()) == {1}, f"never released, yet attempt > 1: {others}"
        # Its last lease was released at the last attempt: dead-lettered, not
        # delivered again; nothing else is. A request enqueued now shows
        # that the last session was live.
        [late] = await enqueue_all(producer, make_requests(1))
        last = await self._session(make_transport, queue_name, harness, ack=True)
        assert last is not None, "the last session got nothing"
        assert (last.request.request_id, last.attempt) == (late.request_id, 1), (
            f"{last.request.request_id} delivered at attempt {last.attempt}, "
            f"expected the late request (released one: {released}, after {attempts})"
        )
        # A poll dead-letters it when it reaches it: where there is no single
        # order (several partitions) the last session may not have.
        dead = await await_dead_letters(producer, 1, harness.scaled(10))
        assert [(d.request_id, d.attempts) for d in dead] == [(released, MAX_ATTEMPTS)], [
            (d.request_id, d.attempts, d.error) for d in dead
        ]

    async def test_a_fast_worker_closing_cleanly_leaves_no_count_behind(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        """A worker handling requests back to back (where backends count the
        next hand-outs ahead, beside its acks) closes cleanly in the middle
        of the backlog: every request it did not hand to its handler comes
        to the next worker at attempt 1, and none it acked comes back."""
        producer = self.open_queue(transport, queue_name)
        sent = await enqueue_all(producer, make_requests(24))
        wanted = {r.request_id for r in sent}
        acked: set[str] = set()
        fast = await make_transport()
        try:
            queue = self.open_queue(fast, queue_name)
            for _ in range(10):
                delivery = await queue.poll(harness.scaled(20))
                assert delivery is not None, f"the fast worker got {len(acked)} of 10"
                assert delivery.attempt == 1, (delivery.request.request_id, delivery.attempt)
                assert await delivery.ack(), "ack of a live delivery did not take effect"
                acked.add(delivery.request.request_id)
        finally:
            await fast.aclose()
        rest = await self._next_worker_takes(
            make_transport, queue_name, harness, len(wanted - acked), acked, batch=False
        )
        assert rest.keys() == wanted - acked, f"{len(wanted - acked - rest.keys())} never came"
        counted = {rid: n for rid, n in rest.items() if n != 1}
        assert not counted, f"handed out for the first time at a later attempt: {counted}"
        dead = await producer.dead_letters()
        assert dead == [], [(d.request_id, d.error) for d in dead]

    async def test_a_batch_worker_closing_cleanly_counts_only_what_it_handed_out(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        """A worker on the batch path (``poll_many``, where backends count a
        whole batch ahead) acks part of its batch and closes cleanly: the
        next worker gets the part it released at attempt 2, every request it
        never handed out at attempt 1, and none it acked."""
        producer = self.open_queue(transport, queue_name)
        sent = await enqueue_all(producer, make_requests(16))
        wanted = {r.request_id for r in sent}
        batch: list[Delivery] = []
        first = await make_transport()
        try:
            queue = self.open_queue(first, queue_name)
            deadline = time.monotonic() + harness.scaled(30)
            while len(batch) < 6 and time.monotonic() < deadline:
                batch += await queue.poll_many(6 - len(batch), harness.scaled(10))
            assert len(batch) == 6, f"the batch worker got {len(batch)} of 6"
            assert [d.attempt for d in batch] == [1] * 6
            assert await queue.ack_many(batch[:3]) == [True] * 3
        finally:
            await first.aclose()  # the other three go back, each handed out once
        acked = {d.request.request_id for d in batch[:3]}
        released = {d.request.request_id for d in batch[3:]}
        rest = await self._next_worker_takes(
            make_transport, queue_name, harness, len(wanted - acked), acked, batch=True
        )
        assert rest.keys() == wanted - acked, f"{len(wanted - acked - rest.keys())} never came"
        expected = {rid: 2 if rid in released else 1 for rid in rest}
        assert rest == expected, {
            rid: (n, expected[rid]) for rid, n in rest.items() if n != expected[rid]
        }
        dead = await producer.dead_letters()
        assert dead == [], [(d.request_id, d.error) for d in dead]

    async def test_a_handle_per_poll_gets_every_waiting_request(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        """A loop that opens a new handle for each poll (and never closes
        them) gets every waiting request, each at attempt 1, none held back
        by a handle nobody polls any more. On Pulsar it got one of three and
        then nothing for a lease: each handle's consumer held what it had
        prefetched."""
        producer = self.open_queue(transport, queue_name)
        sent = await enqueue_all(producer, make_requests(6))
        worker = await make_transport()
        got: dict[str, int] = {}
        try:
            for _ in range(6):
                delivery = await self.open_queue(worker, queue_name).poll(harness.scaled(10))
                assert delivery is not None, f"got {len(got)} of 6, then nothing"
                got[delivery.request.request_id] = delivery.attempt
                assert await delivery.ack(), "ack of a live delivery did not take effect"
        finally:
            await worker.aclose()
        assert got == {r.request_id: 1 for r in sent}

    async def test_closing_one_of_two_handles_gives_back_what_it_held(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        """Two handles of one queue in one transport: closing one gives its
        unsettled delivery back (to the other, at attempt 2: it was handed
        out) and leaves the other working; the closed one refuses to poll."""
        closing = self.open_queue(transport, queue_name)
        staying = self.open_queue(transport, queue_name)
        [sent] = await enqueue_all(closing, make_requests(1))
        held = await closing.poll(harness.scaled(10))
        assert held is not None and held.attempt == 1
        await closing.aclose()
        with pytest.raises(ClosedResourceError):
            await closing.poll(0)
        again = await staying.poll(harness.scaled(20))
        assert again is not None, "the closed handle's delivery never came back"
        assert (again.request.request_id, again.attempt) == (sent.request_id, 2)
        assert await again.ack()
        assert not await held.ack(), "the closed handle's delivery was still its to settle"
        [more] = await enqueue_all(staying, make_requests(1))
        last = await staying.poll(harness.scaled(10))
        assert last is not None and last.request.request_id == more.request_id
        assert await last.ack()

    @pytest.mark.parametrize("second_poller", [False, True], ids=["alone", "beside-a-later-poller"])
    async def test_closing_a_handle_ends_the_poll_waiting_on_it(
        self, transport: Transport, queue_name: str, harness: BackendHarness, second_poller: bool
    ) -> None:
        """A worker's ``poll(None)`` waits on an empty queue; the program
        closes that handle (its shutdown path). The poll ends with
        ``ClosedResourceError`` -- not a hang, not a ``CancelledError`` in a
        task nobody cancelled -- also when another handle of the queue in the
        same transport began polling after it (and keeps polling). Work
        enqueued afterwards goes to the handle still open."""
        closing = self.open_queue(transport, queue_name)
        assert await closing.poll(0) is None  # the consumer is open and the queue empty
        waiting = asyncio.create_task(closing.poll(None))
        other = self.open_queue(transport, queue_name)
        other_poll: asyncio.Task[Delivery | None] | None = None
        try:
            await _assert_still_waiting(waiting, harness, "poll(None) on an empty queue")
            if second_poller:
                other_poll = asyncio.create_task(other.poll(harness.scaled(30)))
                await _assert_still_waiting(other_poll, harness, "the second handle's poll")
            await closing.aclose()
            await _assert_ends_closed(waiting, harness, "closing the handle")
            [sent] = await enqueue_all(other, make_requests(1))
            if other_poll is None:
                other_poll = asyncio.create_task(other.poll(harness.scaled(10)))
            got = await other_poll
            assert got is not None, "the open handle got nothing after the other was closed"
            assert got.request.request_id == sent.request_id
            assert await got.ack()
        finally:
            await _cancel_unfinished(waiting, other_poll)
            await other.aclose()

    async def test_closing_a_handle_ends_a_poll_of_a_task_that_swallowed_a_cancel(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        """A worker task caught a ``CancelledError`` earlier and went on (so
        its task counts a cancellation request it never undid), then waits
        in ``poll(None)``. Closing the handle ends that poll with
        ``ClosedResourceError`` all the same: the earlier cancellation is not
        mistaken for one of this poll."""
        queue = self.open_queue(transport, queue_name)
        assert await queue.poll(0) is None
        waiting_to_be_cancelled = asyncio.Event()

        async def worker() -> Delivery | None:
            try:
                waiting_to_be_cancelled.set()
                await asyncio.sleep(harness.scaled(30))
            except asyncio.CancelledError:
                pass  # swallowed, not uncancel()ed
            return await queue.poll(None)

        task = asyncio.create_task(worker())
        try:
            await waiting_to_be_cancelled.wait()
            task.cancel()
            await _assert_still_waiting(task, harness, "the worker's poll(None) on an empty queue")
            await queue.aclose()
            await _assert_ends_closed(task, harness, "closing the handle")
        finally:
            await _cancel_unfinished(task)

    async def test_closing_the_transport_ends_a_poll_waiting_on_it(
        self, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        """A worker's ``poll(None)`` waits on an empty queue when the
        program closes the whole transport (``async with connect(...)``
        ending): the poll ends with ``ClosedResourceError``, not a hang and
        not a ``CancelledError`` in a task nobody cancelled."""
        client = await make_transport()
        queue = self.open_queue(client, queue_name)
        assert await queue.poll(0) is None
        waiting = asyncio.create_task(queue.poll(None))
        try:
            await _assert_still_waiting(waiting, harness, "poll(None) on an empty queue")
            await client.aclose()
            await _assert_ends_closed(waiting, harness, "closing the transport")
        finally:
            await _cancel_unfinished(waiting)
            await client.aclose()

    async def test_a_worker_handle_closing_beside_an_open_producer_gives_back_its_backlog(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        """A process enqueues and works one queue through two handles of one
        transport; the worker's handle closes (an ``Ensemble`` stopping)
        while the producer's stays open: what the worker had taken ahead of
        its polls (prefetched, pulled) reaches another process's worker now,
        at attempt 1, not when the transport closes."""
        process = await make_transport()
        try:
            producer = self.open_queue(process, queue_name)
            sent = await enqueue_all(producer, make_requests(8))
            worker = self.open_queue(process, queue_name)
            first = await worker.poll(harness.scaled(10))
            assert first is not None
            assert await first.ack()
            await worker.aclose()
            rest = await self._next_worker_takes(
                make_transport, queue_name, harness, 7, {first.request.request_id}, batch=False
            )
            first_id = first.request.request_id
            assert rest == {r.request_id: 1 for r in sent if r.request_id != first_id}
        finally:
            await process.aclose()

    async def test_a_worker_joining_takes_no_request_being_handled(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        """Scale-out: a second worker starts while the first one is handling
        requests. What the first holds is not delivered again (its acks take
        effect), every request is handed out once at attempt 1, and where
        the backend shares a queue's work (capability ``scale_out``) the new
        worker gets some of it."""
        producer = self.open_queue(transport, queue_name)
        sent = await enqueue_all(producer, make_requests(8))
        first = self.open_queue(await make_transport(), queue_name)
        held: list[Delivery] = []  # all of them: on every partition where there are some
        for _ in range(len(sent)):
            delivery = await first.poll(harness.scaled(20))
            assert delivery is not None, f"the first worker got {len(held)} of {len(sent)}"
            held.append(delivery)
        sent += await enqueue_all(producer, make_requests(40))
        wanted = {r.request_id for r in sent}
        handed: Counter[str] = Counter(d.request.request_id for d in held)
        acked: set[str] = set()
        late: list[str] = []  # deliveries after the first one, with their attempt
        by_worker: Counter[str] = Counter()
        joined = asyncio.Event()  # the new worker got its first request
        deadline = time.monotonic() + harness.scaled(60)

        async def work(queue: RequestQueue, who: str) -> None:
            while not wanted <= acked and time.monotonic() < deadline:
                delivery = await queue.poll(0.5)
                if delivery is None:
                    continue
                rid = delivery.request.request_id
                handed[rid] += 1
                by_worker[who] += 1
                if handed[rid] > 1 or delivery.attempt != 1:
                    late.append(f"{who}:{rid}@{delivery.attempt}")
                joined.set()
                assert await delivery.ack(), f"{who}: ack of {rid} did not take effect"
                acked.add(rid)

        joiner = self.open_queue(await make_transport(), queue_name)
        joining = asyncio.create_task(work(joiner, "joiner"))
        try:
            # The first worker's handlers finish once the new worker is
            # serving, or (where it gets nothing while another holds the
            # queue, or must wait for these handlers) after a while: long
            # enough that a backend moving held requests has moved them.
            # Meanwhile they keep their leases, as long handlers do.
            until = time.monotonic() + harness.scaled(8)
            while not joined.is_set() and time.monotonic() < until:
                with contextlib.suppress(TimeoutError):
                    await wait_within(joined.wait(), harness.lease_seconds / 3)
                for delivery in held:
                    assert await delivery.extend(), (
                        f"the first worker's lease on {delivery.request.request_id} was "
                        f"taken away while being handled ({late})"
                    )
            for delivery in held:
                assert await delivery.ack(), (
                    f"the first worker's ack of {delivery.request.request_id} did not take "
                    f"effect: the request was taken away while being handled ({late})"
                )
                acked.add(delivery.request.request_id)
            await work(first, "first")
            await joining
        finally:
            joining.cancel()
            with contextlib.suppress(BaseException):
                await joining
        assert not late, f"delivered again while or after being handled: {late}"
        assert handed.keys() == wanted, f"{len(wanted - handed.keys())} request(s) never delivered"
        if harness.capabilities.scale_out:
            assert by_worker["joiner"] > 0, f"the new worker got no work: {dict(by_worker)}"
        dead = await producer.dead_letters()
        assert dead == [], [(d.request_id, d.error) for d in dead]

    async def test_an_ensemble_stopped_past_its_grace_gives_the_request_back_uncounted(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        """A deploy stops a worker whose handler outlasts ``shutdown_grace``:
        the request comes back to the next worker at the same attempt. A
        job longer than the grace used to lose an attempt at every clean
        restart, and was dead-lettered after ``max_attempts`` deploys
        without ever failing."""
        producer = self.open_queue(transport, queue_name)
        [sent] = await enqueue_all(producer, make_requests(1))
        started, never = asyncio.Event(), asyncio.Event()

        async def long_job(ctx: TaskContext) -> None:
            started.set()
            await never.wait()

        worker = await make_transport()
        try:
            ensemble = Ensemble(
                queue_name,
                transport=worker,
                concurrency=2,
                shutdown_grace=0.2,
                advertise=False,
                max_attempts=MAX_ATTEMPTS,
            )
            ensemble.add_task(sent.task, long_job)
            await ensemble.start()
            try:
                await wait_within(started.wait(), harness.scaled(30))
            finally:
                await ensemble.aclose()
        finally:
            await worker.aclose()
        assert not never.is_set()
        attempts = await self._next_worker_takes(
            make_transport, queue_name, harness, 1, set(), batch=False
        )
        assert attempts == {sent.request_id: 1}, (
            f"after a stop that interrupted its handler: {attempts} (attempt 2: the stop counted)"
        )
        dead = await producer.dead_letters()
        assert dead == [], [(d.request_id, d.error) for d in dead]


#: How long after its last line a script that forgot ``aclose()`` may take
#: to exit (``asyncio.run`` cancelling what was left running).
EXIT_WITHIN_S = 5.0


class ForgottenCloseConformance:
    """Subclass it in the backend's tests, no body."""

    async def test_script_that_forgets_aclose_still_exits(
        self, harness: BackendHarness, queue_name: str
    ) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "transport.testing.forgotten_close",
            "--ensemble",
            queue_name,
            "--caller",
            f"front-{uuid.uuid4().hex[:8]}",
            "--timeout",
            str(harness.scaled(40)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=harness.subprocess_env(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        stderr_task = asyncio.ensure_future(proc.stderr.read())
        try:
            async with asyncio.timeout(harness.scaled(50)):
                line = await proc.stdout.readline()
            answered = time.monotonic()
            assert line.decode().strip() == "RESPONSE completed", (
                f"no response: {line!r}; stderr: {(await stderr_task).decode()[-2000:]}"
            )
            try:
                async with asyncio.timeout(EXIT_WITHIN_S):
                    rest = await proc.stdout.read()
                    code = await proc.wait()
            except TimeoutError:
                raise AssertionError(
                    f"the script returned from main() without aclose() but the interpreter"
                    f" had not exited {EXIT_WITHIN_S} s later"
                ) from None
            took = time.monotonic() - answered
            assert code == 0, f"exit code {code}; stderr: {(await stderr_task).decode()[-2000:]}"
            assert rest.decode().split() == ["EXITING"], rest
            assert took < EXIT_WITHIN_S
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            stderr_task.cancel()

    async def test_handles_opened_per_call_and_dropped_are_not_kept(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        """A worker loop that opens a handle per call and never closes it --
        ``transport.delivery_registry(request.reply_to).complete(...)``,
        ``transport.request_queue(name).poll()`` -- as the README's own
        example reads: the transport does not keep those handles alive (it
        kept every one, about 5 KB a request, until it closed), and the view
        of a registry dropped that way stops (a ``capability_registry()`` per
        lookup kept a task and a backend reader each). What a program still
        holds keeps working and is closed with the transport."""
        transport = await make_transport()
        try:
            held = transport.request_queue(queue_name)
            inbox = transport.delivery_registry(f"{queue_name}-inbox")
            dropped: list[weakref.ref[Any]] = []
            for request in make_requests(3):
                request = request.model_copy(update={"reply_to": f"{queue_name}-inbox"})
                pending = await inbox.register(request.request_id)
                queue = transport.request_queue(queue_name)
                await queue.enqueue(request)
                dropped.append(weakref.ref(queue))
                queue = transport.request_queue(queue_name)
                delivery = await queue.poll(harness.scaled(10))
                assert delivery is not None and delivery.request.request_id == request.request_id
                dropped.append(weakref.ref(queue))
                registry = transport.delivery_registry(f"{queue_name}-inbox")
                answer = WorkResponse(request_id=request.request_id)
                assert await registry.complete(request.request_id, answer)
                dropped.append(weakref.ref(registry))
                assert await delivery.ack()
                assert (await pending.result(harness.scaled(10))).request_id == request.request_id
                # Registries whose view follows the backend (started by
                # pending() and lookup()), opened per call and dropped.
                registry = transport.delivery_registry(f"{queue_name}-inbox")
                assert await registry.pending() == []
                dropped.append(weakref.ref(registry))
                capabilities = transport.capability_registry()
                assert await capabilities.lookup(f"{queue_name}-none") == []
                dropped.append(weakref.ref(capabilities))
                del queue, registry, delivery, capabilities
            # A callback the loop has not run yet (an ack's completion) may
            # hold a handle a moment longer: collected within a bound, or it
            # is kept (one of 15 was alive at the first collection in one
            # fresh-clone run on sqlite://).
            limit = asyncio.get_running_loop().time() + harness.scaled(5)
            while True:
                gc.collect()
                kept = [ref() for ref in dropped if ref() is not None]
                if not kept or asyncio.get_running_loop().time() >= limit:
                    break
                del kept
                await asyncio.sleep(0.01)  # let pending callbacks run
            assert not kept, f"{len(kept)} of {len(dropped)} dropped handles still alive: {kept}"
            # ... and their views stop: only the inbox's still follows the log.
            views: list[asyncio.Task[Any]] = []
            async with asyncio.timeout(harness.scaled(10)):
                while True:
                    views = [t for t in asyncio.all_tasks() if t.get_name().startswith("view:")]
                    if len(views) <= 1:
                        break
                    await asyncio.sleep(0.01)
            assert [t.get_name() for t in views] == [f"view:delivery registry '{queue_name}-inbox'"]
            [last] = await enqueue_all(held, make_requests(1))
            got = await held.poll(harness.scaled(10))
            assert got is not None and got.request.request_id == last.request_id
            assert await got.ack()
        finally:
            await transport.aclose()
        with pytest.raises(ClosedResourceError):
            await held.poll(0)

    async def test_a_priority_worker_that_forgets_aclose_gives_back_the_heads_it_held(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        # A priority queue holds the head of every level to compare them; a
        # script that took one request and ended without aclose() left the
        # others leased, and each came back with one attempt more: run a
        # few times, it dead-lettered a request no handler had seen.
        if harness.config.scheme == "memory":
            pytest.skip("nothing outlives a memory:// process")
        transport = await make_transport()
        queue = transport.priority_queue(queue_name, levels=3)
        await queue.enqueue(WorkRequest(task="t", payload="low"), priority=2)
        for i in range(2):
            await queue.enqueue(WorkRequest(task="t", payload=f"high{i}"), priority=0)
        await queue.aclose()
        # A lease the scripts' ack is sure to beat on a loaded machine (with
        # the suite's 1 s one, the first script's lease once ran out before
        # its ack and the request came back to the second script): what is
        # tested is what happens to the heads held, not to an expired lease.
        lease = max(harness.lease_seconds, harness.scaled(5))
        for i in range(2):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "transport.testing.forgotten_close",
                "--priority-once",
                queue_name,
                "--timeout",
                str(harness.scaled(30)),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=harness.subprocess_env(lease_seconds=lease),
            )
            out, err = await wait_within(proc.communicate(), harness.scaled(60))
            assert proc.returncode == 0, err.decode()[-2000:]
            assert out.decode().split("\n")[0] == f"HANDLED high{i} 1 acked=True", out
        queue = transport.priority_queue(queue_name, levels=3)
        low = await queue.poll(harness.scaled(10) + lease * 3)
        assert low is not None and low.request.payload == "low"
        assert low.attempt == 1, "the heads the scripts held were counted as deliveries"
        await low.ack()
        await queue.aclose()


class ForeignMessageConformance:
    """Requests written by another program straight to the broker: the id
    and the attempt count come from the backend, not from the body."""

    async def test_request_without_id_keeps_one_id_across_redeliveries(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        first_client: Transport = await make_transport()
        body = json.dumps({"task": "foreign", "payload": {"from": "elsewhere"}}).encode()
        await harness.inject_raw(first_client, queue_name, body)
        queue = first_client.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        first = await queue.poll(harness.scaled(30))
        assert first is not None, "the foreign request was never delivered"
        assert (first.request.task, first.request.payload, first.attempt) == (
            "foreign",
            {"from": "elsewhere"},
            1,
        )
        request_id = first.request.request_id
        # Released by closing its client: the same message again, decoded by
        # another client, which must derive the same id.
        await first_client.aclose()
        other = (await make_transport()).request_queue(
            queue_name, lease_seconds=harness.lease_seconds
        )
        second = await other.poll(harness.scaled(30))
        assert second is not None, "the released foreign request was never redelivered"
        assert (second.request.request_id, second.attempt) == (request_id, 2), (
            f"first delivery had id {request_id!r}"
        )
        # A nack with an error: some backends deliver a re-published copy of
        # the message; same id still.
        assert await second.nack(error="handler failed")
        third = await other.poll(harness.scaled(30))
        assert third is not None, "the nacked foreign request was never redelivered"
        assert (third.request.request_id, third.attempt) == (request_id, 3)
        assert await third.ack()

    async def test_request_of_a_future_wire_version_is_dead_lettered_with_the_reason(
        self, harness: BackendHarness, queue_name: str, transport: Transport
    ) -> None:
        future = WIRE_SCHEMA_VERSION + 1
        body = json.dumps(
            {"schema_version": future, "request_id": "from-the-future", "task": "foreign"}
        ).encode()
        await harness.inject_raw(transport, queue_name, body)
        queue = transport.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        [good] = await enqueue_all(queue, make_requests(1))
        delivery = await queue.poll(harness.scaled(30))
        assert delivery is not None, "the request after the future one was never delivered"
        assert delivery.request.request_id == good.request_id, (
            "a record of a future wire version was handed to a handler"
        )
        assert await delivery.ack()
        dead = await await_dead_letters(queue, 1, harness.scaled(10))
        assert len(dead) == 1, f"dead letters: {dead}"
        assert dead[0].request is None and dead[0].raw is not None
        assert "from-the-future" in dead[0].raw
        assert f"wire schema version {future}" in dead[0].error, dead[0].error

    async def test_attempt_in_the_body_is_ignored(
        self, harness: BackendHarness, queue_name: str, transport: Transport
    ) -> None:
        body = json.dumps({"request_id": "foreign-4", "task": "foreign", "attempt": 4}).encode()
        await harness.inject_raw(transport, queue_name, body)
        queue = transport.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        first = await queue.poll(harness.scaled(30))
        assert first is not None, "the foreign request was never delivered"
        assert (first.request.request_id, first.attempt) == ("foreign-4", 1)
        assert await first.nack()
        second = await queue.poll(harness.scaled(30))
        assert second is not None, "the nacked foreign request was never redelivered"
        assert (second.request.request_id, second.attempt) == ("foreign-4", 2)
        assert await second.ack()

    async def test_dead_letter_of_a_request_without_id_keeps_the_delivered_id(
        self, harness: BackendHarness, queue_name: str, transport: Transport
    ) -> None:
        body = json.dumps({"task": "foreign", "payload": {"n": 7}}).encode()
        await harness.inject_raw(transport, queue_name, body)
        queue = transport.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        delivery = await queue.poll(harness.scaled(30))
        assert delivery is not None, "the foreign request was never delivered"
        assert await delivery.dead_letter("refused by the handler")
        request_id = delivery.request.request_id
        dead = await queue.dead_letters()
        assert len(dead) == 1, f"dead letters: {dead}"
        assert dead[0].request is not None
        assert (dead[0].request_id, dead[0].request.request_id) == (request_id, request_id)
        assert await queue.requeue_dead_letters() == 1
        back = await queue.poll(harness.scaled(30))
        assert back is not None, "the requeued foreign request was never delivered"
        assert (back.request.request_id, back.attempt) == (request_id, 1)
        assert await back.ack()
