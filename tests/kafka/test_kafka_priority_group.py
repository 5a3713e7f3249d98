"""A Kafka priority queue across worker processes: its levels are one
consumer-group membership, so a second worker joining (a rebalance) never
splits the levels between workers and global priority order holds."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest

from transport import Delivery, PriorityRequestQueue, WorkRequest, connect

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]


def _name() -> str:
    return f"k{uuid.uuid4().hex[:10]}"


class _Handouts:
    """Every hand-out of both workers, in the order the polls returned
    (both run on this event loop, so the order is exact), checked against
    global priority order as it happens."""

    def __init__(self, high: list[str], low: list[str]) -> None:
        self.high = set(high)
        self.low = set(low)
        self.seen: set[str] = set()
        self.log: list[tuple[str, int, str]] = []
        self.violations: list[str] = []

    def record(self, worker: str, delivery: Delivery) -> None:
        request = delivery.request
        self.log.append((worker, request.priority, request.request_id))
        if request.request_id in self.low and request.request_id not in self.seen:
            waiting = self.high - self.seen
            if waiting:
                self.violations.append(
                    f"{worker} got level-2 {request.request_id} while {len(waiting)} "
                    f"level-0 requests were still waiting"
                )
        self.seen.add(request.request_id)


async def test_a_second_worker_joining_never_serves_a_lower_level_before_a_higher_backlog(
    kafka_config_factory: Any,
) -> None:
    """Required order with two workers: no level-2 request is handed out, by
    either worker, while a level-0 request enqueued before it has not been
    handed out yet (no aging within the test: the interval is an hour).

    With one partition per level, that holds because every level of the
    priority queue is assigned to the same member: the other worker idles
    (as on any ``ordered`` single-partition queue). Worker A takes one
    level-0 request and works on it without polling, long enough to be idle
    with buffered work of the other levels; worker B joins meanwhile."""
    name = _name()
    # A short idle hand-off: a worker busy with one request must not give up
    # some levels (those without a lease) and keep others.
    options = {"handoff_idle_s": 1.0}
    a = await connect(kafka_config_factory(options=options))
    b = await connect(kafka_config_factory(options=options))
    try:
        pq_a = a.priority_queue(
            name, levels=3, aging_interval=timedelta(hours=1), lease_seconds=120
        )
        pq_b = b.priority_queue(
            name, levels=3, aging_interval=timedelta(hours=1), lease_seconds=120
        )
        assert isinstance(pq_a, PriorityRequestQueue) and isinstance(pq_b, PriorityRequestQueue)
        high = [
            (await pq_a.enqueue(WorkRequest(task="t"), priority=0)).request_id for _ in range(5)
        ]
        handouts = _Handouts(high, [])
        first = await pq_a.poll(30)
        assert first is not None, "worker A got nothing within 30 s"
        handouts.record("A", first)
        assert first.request.request_id == high[0]
        # The lower level's backlog arrives while A works on its request.
        low = [(await pq_a.enqueue(WorkRequest(task="t"), priority=2)).request_id for _ in range(5)]
        handouts.low = set(low)

        # B joins while A is busy (not polling) and observes for a while.
        assert await pq_b.caught_up(30), "worker B did not join within 30 s"
        loop = asyncio.get_running_loop()
        window_end = loop.time() + 8.0
        while (left := window_end - loop.time()) > 0:
            delivery = await pq_b.poll(left)
            if delivery is None:
                break
            handouts.record("B", delivery)
            await delivery.ack()
        assert not handouts.violations, handouts.violations

        # A finishes (the ack may come too late if the levels moved to B:
        # then the request is delivered again), and both drain the rest.
        await first.ack()
        everything = set(high) | set(low)
        done = asyncio.Event()
        if everything <= handouts.seen:  # B took everything over in the window
            done.set()

        async def work(worker: str, pq: PriorityRequestQueue) -> None:
            while not done.is_set():
                delivery = await pq.poll(0.5)
                if delivery is None:
                    continue
                handouts.record(worker, delivery)
                await delivery.ack()
                if everything <= handouts.seen:
                    done.set()

        tasks = [asyncio.create_task(work("A", pq_a)), asyncio.create_task(work("B", pq_b))]
        try:
            await asyncio.wait_for(done.wait(), 60)
        except TimeoutError:
            pytest.fail(f"not everything was handed out within 60 s: {handouts.log}")
        finally:
            done.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert not handouts.violations, (handouts.violations, handouts.log)
        # One member holds every level: after B's join, a single worker serves.
        servers = {worker for worker, _, _ in handouts.log[1:]}
        assert len(servers) == 1, f"the levels were split between workers: {handouts.log}"
    finally:
        await a.aclose()
        await b.aclose()


async def test_priority_levels_share_one_group_membership(kafka_config_factory: Any) -> None:
    """One consumer (one group join) serves every level of a priority queue,
    and the committed offsets of every level live in that one group."""
    from transport_kafka import KafkaTransport

    transport = await connect(kafka_config_factory())
    assert isinstance(transport, KafkaTransport)
    try:
        name = _name()
        pq = transport.priority_queue(name, levels=3, aging_interval=timedelta(hours=1))
        sent = [
            (await pq.enqueue(WorkRequest(task="t"), priority=level)).request_id
            for level in (2, 1, 0)
        ]
        got = []
        for _ in range(3):
            delivery = await pq.poll(30)
            assert delivery is not None
            assert await delivery.ack()
            got.append(delivery.request.request_id)
        assert got == sent[::-1]
        engines = [transport._engines[f"{name}__p{level}"] for level in range(3)]
        members = {id(engine.member) for engine in engines}
        assert len(members) == 1, "each level has its own consumer"
        group = engines[0].member.group
        assert all(engine.topics.group == group for engine in engines)
        for engine in engines:
            committed = await transport.clients.committed(group, engine.topics.requests, [0])
            assert committed[0] == 1, f"{engine.name}: level not committed in {group}"
    finally:
        await transport.aclose()


async def test_levels_adopt_the_positions_of_their_former_groups(kafka_config_factory: Any) -> None:
    """Before the levels shared one group, each level queue had a group of
    its own: what it consumed there is not delivered again after an upgrade
    (the requests are kept until consumed, so all of them would be)."""
    from transport_kafka import KafkaTransport

    name = _name()
    old = await connect(kafka_config_factory())
    assert isinstance(old, KafkaTransport)
    try:
        # What a level was before: a plain queue with its own group.
        level0 = old._open_queue(f"{name}__p0", lease_seconds=30, max_attempts=5)
        former_group = level0.topics.group
        assert former_group == old.settings.queue_topics(f"{name}__p0").group
        sent = [(await level0.enqueue(WorkRequest(task="t"))).request_id for _ in range(3)]
        for expected in sent[:2]:
            delivery = await level0.poll(30)
            assert delivery is not None and delivery.request.request_id == expected
            assert await delivery.ack()
        await level0.aclose()
        committed = await old.clients.committed(former_group, level0.topics.requests, [0])
        assert committed[0] == 2
    finally:
        await old.aclose()
    new = await connect(kafka_config_factory())
    assert isinstance(new, KafkaTransport)
    try:
        pq = new.priority_queue(name, levels=2, aging_interval=timedelta(hours=1))
        delivery = await pq.poll(30)
        assert delivery is not None
        assert delivery.request.request_id == sent[2], "a consumed request was delivered again"
        assert await delivery.ack()
        assert await pq.poll(1) is None
        group = new.settings.priority_group(name)
        topic = new.settings.queue_topics(f"{name}__p0").requests
        assert (await new.clients.committed(group, topic, [0]))[0] == 3
    finally:
        await new.aclose()


async def test_a_worker_back_from_hand_off_does_not_take_the_levels_back(
    kafka_config_factory: Any,
) -> None:
    """An idle worker with buffered work leaves the group (hand-off); the
    worker that took the levels over keeps them, and its leases, when the
    first one polls again (it joins as the newest member and idles)."""
    from transport_kafka import KafkaTransport

    name = _name()
    options = {"handoff_idle_s": 1.0}
    a = await connect(kafka_config_factory(options=options))
    b = await connect(kafka_config_factory(options=options))
    assert isinstance(a, KafkaTransport)
    try:
        pq_a = a.priority_queue(name, levels=2, aging_interval=timedelta(hours=1), lease_seconds=60)
        pq_b = b.priority_queue(name, levels=2, aging_interval=timedelta(hours=1), lease_seconds=60)
        sent = [
            (await pq_a.enqueue(WorkRequest(task="t"), priority=0)).request_id for _ in range(3)
        ]
        first = await pq_a.poll(30)
        assert first is not None and first.request.request_id == sent[0]
        assert await first.ack()
        # A stops polling with two requests buffered: it leaves the group.
        member = a._engines[f"{name}__p0"].member
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while member.subscribed:
            assert loop.time() < deadline, "worker A did not hand off within 30 s"
            await asyncio.sleep(0.1)
        second = await pq_b.poll(30)
        assert second is not None and second.request.request_id == sent[1]
        # A polls again: it joins (a rebalance) and idles; B keeps its lease.
        assert await pq_a.caught_up(30), "worker A did not join again within 30 s"
        assert await pq_a.poll(1) is None
        assert await second.ack(), "the lease of the busy worker was lost when A came back"
        third = await pq_b.poll(30)
        assert third is not None and third.request.request_id == sent[2]
        assert await third.ack()
    finally:
        await a.aclose()
        await b.aclose()
