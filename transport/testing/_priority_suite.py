"""Conformance scenarios for :class:`~transport.PriorityRequestQueue` (TESTING.md 16)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import Any

import pytest

from transport import (
    AgingPolicy,
    Delivery,
    ProvisionPlan,
    RequestQueue,
    Transport,
    WorkRequest,
    utcnow,
)
from transport.errors import UnsupportedFeatureError
from transport.testing._queue_suite import RequestQueueConformance
from transport.testing._util import drain
from transport.testing.harness import BackendHarness

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]


class _Clock:
    """A clock the test moves by hand: aging without sleeping."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset


class PriorityQueueConformance:
    """Priority and aging on the backend's queues."""

    async def test_higher_level_first_under_backlog(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        pq = transport.priority_queue(queue_name, levels=3, aging_interval=timedelta(hours=1))
        sent: dict[int, list[str]] = {0: [], 1: [], 2: []}
        for i in range(4):
            for level in (2, 1, 0):
                r = await pq.enqueue(
                    WorkRequest(task="t", payload={"level": level, "i": i}), priority=level
                )
                sent[level].append(r.request_id)
        got = await drain(pq, 12, harness.scaled(30))
        levels = [d.request.priority for d in got]
        assert levels == sorted(levels), f"delivered out of priority order: {levels}"
        if harness.capabilities.ordered:
            assert [d.request.request_id for d in got] == sent[0] + sent[1] + sent[2]

    async def test_a_priority_queue_of_one_level_is_the_plain_queue(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        """One level means the plain queue ``name``, as for an ``Ensemble`` of
        ``priority_levels=1`` (what its advertisement says), ``Network`` and
        the outbox. ``priority_queue(name, levels=1)`` used ``name__p0``: a
        producer enqueueing by the advertisement stranded every request."""
        pq = transport.priority_queue(queue_name, levels=1)
        sent = await pq.enqueue(WorkRequest(task="t"), priority=0)
        plain = transport.request_queue(queue_name)
        got = await plain.poll(harness.scaled(30))
        assert got is not None and got.request.request_id == sent.request_id
        assert await got.ack()
        await plain.aclose()  # a consumer that may hold the next one ahead
        producer = transport.request_queue(queue_name)
        again = await producer.enqueue(WorkRequest(task="t"))
        taken = await pq.poll(harness.scaled(30))
        assert taken is not None and taken.request.request_id == again.request_id
        assert await taken.ack()

    async def test_aging_promotes_one_level_per_interval(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        clock = _Clock()
        interval = timedelta(minutes=10)
        policy = AgingPolicy(levels=3, aging_interval=interval, clock=clock)
        pq = transport.priority_queue(queue_name, policy=policy)
        # enqueued_at given by the caller is kept: this request has waited
        # just over one interval, so it competes as level 1 and, being
        # older, wins the tie against a fresh level-1 request.
        waited = WorkRequest(
            task="t", payload="old level 2", enqueued_at=utcnow() - interval - timedelta(seconds=5)
        )
        old_low = await pq.enqueue(waited, priority=2)
        new_mid = await pq.enqueue(WorkRequest(task="t", payload="new level 1"), priority=1)
        assert old_low.enqueued_at == waited.enqueued_at
        assert policy.effective_level(2, old_low.enqueued_at) == 1
        first = await pq.poll(harness.scaled(10))
        assert first is not None and first.request.request_id == old_low.request_id
        await first.ack()
        second = await pq.poll(harness.scaled(10))
        assert second is not None and second.request.request_id == new_mid.request_id
        await second.ack()
        # The clock moves on: two intervals → level 0, never below 0.
        clock.offset = interval
        assert policy.effective_level(2, old_low.enqueued_at) == 0
        clock.offset = 10 * interval
        assert policy.effective_level(2, old_low.enqueued_at) == 0
        assert policy.effective_level(1, new_mid.enqueued_at) == 0

    async def test_without_aging_higher_level_wins(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        interval = timedelta(minutes=10)
        pq = transport.priority_queue(queue_name, levels=3, aging_interval=interval)
        almost = utcnow() - interval + timedelta(seconds=30)  # not yet one interval
        await pq.enqueue(
            WorkRequest(task="t", payload="old level 2", enqueued_at=almost), priority=2
        )
        new_mid = await pq.enqueue(WorkRequest(task="t", payload="new level 1"), priority=1)
        first = await pq.poll(harness.scaled(10))
        assert first is not None and first.request.request_id == new_mid.request_id
        await first.ack()

    async def test_lowest_level_wait_is_bounded_under_sustained_high_priority_load(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        interval = 0.4
        pq = transport.priority_queue(queue_name, levels=3, aging_interval=interval)
        for _ in range(5):
            await pq.enqueue(WorkRequest(task="t", payload="hot"), priority=0)
        low = await pq.enqueue(WorkRequest(task="t", payload="cold"), priority=2)
        started = time.monotonic()
        served_low_at: float | None = None
        hot_served = 0
        deadline = started + harness.scaled(20)
        serve_times: list[float] = []
        first_at: float | None = None  # the first delivery (the levels joined by then)
        while served_low_at is None and time.monotonic() < deadline:
            begun = time.monotonic()
            delivery = await pq.poll(1.0)
            if delivery is None:
                continue
            if first_at is None:
                first_at = time.monotonic()
            await delivery.ack()
            if delivery.request.request_id == low.request_id:
                served_low_at = time.monotonic()
            else:
                hot_served += 1
                # Keep level 0 busy: one new hot request per one served.
                await pq.enqueue(WorkRequest(task="t", payload="hot"), priority=0)
                await asyncio.sleep(0.02)
                serve_times.append(time.monotonic() - begun)
        assert served_low_at is not None, "level-2 request starved"
        waited = served_low_at - started
        # The five hot requests enqueued before it rightly go first (older,
        # higher level); then it must win within two aging intervals. The
        # bound is in this backend's own time per served request, plus the
        # time to the first delivery, which joined the levels (seconds on a
        # loaded broker, and not a matter of priority).
        per_serve = sorted(serve_times)[len(serve_times) // 2] if serve_times else 0.0
        joined = (first_at or started) - started
        bound = 2 * interval + 5 * per_serve + joined + harness.scaled(3)
        assert waited <= bound, (
            f"waited {waited:.2f}s (bound {bound:.2f}s; {hot_served} hot requests served "
            f"first, {per_serve:.3f}s each; first delivery after {joined:.3f}s)"
        )
        assert hot_served > 0

    async def test_priority_and_enqueued_at_survive_redelivery_and_restart(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        client = await make_transport()
        pq = client.priority_queue(queue_name, levels=3, aging_interval=timedelta(hours=1))
        sent = await pq.enqueue(WorkRequest(task="t", payload="p"), priority=2)
        delivery = await pq.poll(harness.scaled(10))
        assert delivery is not None
        assert await delivery.nack()
        again = await pq.poll(harness.scaled(10))
        assert again is not None and again.attempt == 2
        assert again.request.priority == 2
        assert again.request.enqueued_at == sent.enqueued_at
        await client.aclose()  # restart without acking
        restarted = (await make_transport()).priority_queue(
            queue_name, levels=3, aging_interval=timedelta(hours=1)
        )
        back = await restarted.poll(harness.scaled(20))
        assert back is not None and back.request.request_id == sent.request_id
        assert back.request.priority == 2
        assert back.request.enqueued_at == sent.enqueued_at
        assert back.attempt == 3  # two deliveries, then released by a clean close
        await back.ack()

    @pytest.mark.parametrize("options", ["harness", "defaults"])
    async def test_levels_filled_before_the_first_worker_are_served_in_order_from_the_first_poll(
        self, harness: BackendHarness, queue_name: str, make_transport: Any, options: str
    ) -> None:
        # "defaults": the backend's own options, as a user starts it (no
        # tuning for the dev broker). Each poll waits 5 s, as a user's would.
        overrides: dict[str, Any] = {"options": {}} if options == "defaults" else {}
        producer = await make_transport(**overrides)
        pq = producer.priority_queue(queue_name, levels=3, aging_interval=timedelta(hours=1))
        low = [
            (await pq.enqueue(WorkRequest(task="t", payload=i), priority=2)).request_id
            for i in range(5)
        ]
        high = [
            (await pq.enqueue(WorkRequest(task="t", payload=i), priority=0)).request_id
            for i in range(5)
        ]
        await producer.aclose()
        worker_client = await make_transport(**overrides)
        worker = worker_client.priority_queue(
            queue_name, levels=3, aging_interval=timedelta(hours=1)
        )
        got: list[tuple[int, str]] = []
        for n in range(10):
            started = time.monotonic()
            delivery = await worker.poll(timeout=5)
            assert delivery is not None, (
                f"poll {n + 1} of a fresh worker returned nothing within 5 s "
                f"({time.monotonic() - started:.1f} s) while {10 - n} requests were waiting; "
                f"served so far (level, id): {got}"
            )
            got.append((delivery.request.priority, delivery.request.request_id))
            assert await delivery.ack()
        levels = [level for level, _ in got]
        assert levels == [0] * 5 + [2] * 5, f"served out of priority order: {levels}"
        if worker_client.capabilities.ordered:  # of these options (Kafka: one partition)
            assert [rid for _, rid in got] == high + low

    async def test_a_head_leased_after_its_poll_returned_is_not_handed_out_twice(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        # A poll of empty levels waits on one poll per level and returns when
        # one answers; the others go on and may lease their level's head
        # after it returned. That head was left in a finished task, its lease
        # not kept alive: while its worker handled a request for longer than
        # the lease, the head ran out, the other worker got it at attempt 2,
        # and the busy worker's next poll handed out its stale copy too (one
        # request handled twice at once). Two workers, both in the group
        # before anything is sent (no rebalance while work is held).
        lease = 2 * harness.lease_seconds  # room for a loaded machine's extend round trips
        hour = timedelta(hours=1)
        clients = [await make_transport(), await make_transport()]
        workers = [
            c.priority_queue(queue_name, levels=3, aging_interval=hour, lease_seconds=lease)
            for c in clients
        ]
        for worker in workers:
            assert await worker.caught_up(harness.scaled(20))
        producer = clients[0].priority_queue(queue_name, levels=3, aging_interval=hour)
        polls = {asyncio.create_task(w.poll(harness.scaled(3 * lease + 10))): w for w in workers}
        deadline = time.monotonic() + harness.scaled(10)
        while not all(any(t is not None and not t.done() for t in w._tasks) for w in workers):
            assert time.monotonic() < deadline, "the workers' level polls did not start"
            await asyncio.sleep(0.01)
        first = await producer.enqueue(WorkRequest(task="t", payload="first"), priority=0)
        done, _ = await asyncio.wait(polls, return_when=asyncio.FIRST_COMPLETED)
        busy_poll = done.pop()
        busy, got = polls.pop(busy_poll), busy_poll.result()
        assert got is not None and got.request.request_id == first.request_id

        async def keep_lease() -> None:  # as a runtime keeps a running handler's
            while True:
                await asyncio.sleep(lease / 4)
                assert await got.extend(), "the busy worker lost its lease"

        keeper = asyncio.create_task(keep_lease())
        late = await producer.enqueue(WorkRequest(task="t", payload="late"), priority=2)
        [idle_poll] = polls

        async def handled_at_once(poll: Awaitable[Delivery | None]) -> tuple[str, int] | None:
            delivery = await poll
            if delivery is None:
                return None
            await delivery.ack()
            return delivery.request.request_id, delivery.attempt

        by_idle = asyncio.create_task(handled_at_once(idle_poll))
        await asyncio.sleep(3 * lease)  # the busy worker handles `first` for 3 leases
        assert not keeper.done(), keeper.exception()
        keeper.cancel()
        assert await got.ack()
        handed = []
        if (taken := await handled_at_once(busy.poll(0.5))) is not None:
            handed.append(taken)
        if (taken := await by_idle) is not None:
            handed.append(taken)
        assert handed == [(late.request_id, 1)], (
            f"handed out (id, attempt): {handed}; the late head is {late.request_id}"
        )
        for client in clients:
            await client.aclose()

    async def test_clean_sessions_count_no_attempt_for_held_heads(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        # A priority queue leases the head of every level to compare them and
        # holds those that lost. Closing it gives them back without counting
        # an attempt: only a hand-out to a handler counts. Seven short
        # sessions (each a new client): every one polls one request; the
        # second closes without acking (its request comes back with exactly
        # one more attempt), the others ack. The level-2 heads lose to level
        # 0 in the first sessions and are held and given back each time.
        max_attempts = 3
        producer = await make_transport()
        try:
            pq = producer.priority_queue(
                queue_name, levels=3, aging_interval=timedelta(hours=1), max_attempts=max_attempts
            )
            sent = [
                await pq.enqueue(WorkRequest(task="t", payload={"level": level, "i": i}), level)
                for level, count in ((0, 4), (2, 2))
                for i in range(count)
            ]
        finally:
            await producer.aclose()
        wanted = {r.request_id: r.priority for r in sent}
        handed: dict[str, int] = {}  # hand-outs per request
        acked: set[str] = set()
        log: list[str] = []
        for session in range(1, 8):
            ack = session != 2
            client = await make_transport()
            try:
                worker = client.priority_queue(
                    queue_name,
                    levels=3,
                    aging_interval=timedelta(hours=1),
                    max_attempts=max_attempts,
                )
                delivery = await worker.poll(harness.scaled(20))
                assert delivery is not None, f"session {session} got nothing ({log})"
                rid = delivery.request.request_id
                assert rid in wanted, f"session {session} got an unknown request {rid}"
                assert rid not in acked, f"acked request {rid} delivered again ({log})"
                handed[rid] = handed.get(rid, 0) + 1
                log.append(
                    f"s{session}:p{wanted[rid]}/{rid[:8]}@{delivery.attempt}"
                    f"{'' if ack else ' released'}"
                )
                # Exact: one attempt per hand-out to a handler, none for the
                # sessions that held it as a head that lost the comparison.
                assert delivery.attempt == handed[rid], (
                    f"request handed out {handed[rid]} time(s) has attempt "
                    f"{delivery.attempt} ({log})"
                )
                if ack:
                    assert await delivery.ack(), f"ack in session {session} did not take effect"
                    acked.add(rid)
            finally:
                await client.aclose()
        assert acked == set(wanted), f"not every request was delivered and acked ({log})"
        assert sorted(handed.values()) == [1, 1, 1, 1, 1, 2], log
        checker = await make_transport()
        try:
            dead = await checker.priority_queue(
                queue_name, levels=3, aging_interval=timedelta(hours=1)
            ).dead_letters()
        finally:
            await checker.aclose()
        assert dead == [], f"dead-lettered: {[(d.request_id, d.error) for d in dead]} ({log})"

    async def test_a_worker_with_fewer_levels_than_its_producers_is_warned(
        self,
        harness: BackendHarness,
        queue_name: str,
        make_transport: Any,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # Producers use 5 levels, a worker opens 3: what they enqueue at
        # level 4 is never polled. The worker says so once, at its first
        # poll, where the backend can tell without creating anything.
        hour = timedelta(hours=1)
        producer = await make_transport()
        pq = producer.priority_queue(queue_name, levels=5, aging_interval=hour)
        urgent = await pq.enqueue(WorkRequest(task="t", payload="urgent"), priority=0)
        stranded = await pq.enqueue(WorkRequest(task="t", payload="low"), priority=4)
        await producer.aclose()

        def warnings() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.name == "transport.priority" and r.levelno == logging.WARNING
            ]

        worker_client = await make_transport()
        try:
            await worker_client.missing(ProvisionPlan(queues={queue_name: 5}))
            can_tell = True
        except UnsupportedFeatureError:  # pulsar:// without the admin API
            can_tell = False

        async def first_poll(client: Transport, levels: int) -> str:
            """The request id a new worker of ``levels`` levels handles
            first, once its check of the levels above is done."""
            worker = client.priority_queue(queue_name, levels=levels, aging_interval=hour)
            with caplog.at_level(logging.WARNING, logger="transport.priority"):
                delivery = await worker.poll(harness.scaled(10))
                assert delivery is not None
                assert await delivery.ack()
                await worker._levels_checked()
            await worker.aclose()
            return delivery.request.request_id

        assert await first_poll(worker_client, 3) == urgent.request_id
        if can_tell:
            [said] = warnings()
            assert f"priority queue {queue_name!r} is polled with 3 levels" in said, said
            shown = re.search(r"level\(s\) ([0-9, ]+) ", said)
            assert shown is not None and "4" in shown.group(1).split(", "), said
            assert "levels=5" in said, said
        else:
            assert warnings() == []
        # A worker opened as its producers are is not warned, and gets it.
        caplog.clear()
        assert await first_poll(await make_transport(), 5) == stranded.request_id
        assert warnings() == []

    async def test_out_of_range_priority_is_rejected(
        self, transport: Transport, queue_name: str
    ) -> None:
        pq = transport.priority_queue(queue_name, levels=3)
        with pytest.raises(ValueError):
            await pq.enqueue(WorkRequest(task="t"), priority=3)
        with pytest.raises(ValueError):
            transport.priority_queue(queue_name, levels=0)


class PriorityAsRequestQueueConformance(RequestQueueConformance):
    """The whole queue contract, run through a priority queue (requests spread
    over its levels)."""

    def open_queue(self, transport: Transport, name: str, **kw: Any) -> RequestQueue:
        return transport.priority_queue(name, levels=2, aging_interval=timedelta(hours=1), **kw)

    def raw_target(self, name: str) -> str:
        return f"{name}__p0"
