"""Kafka-specific behaviour on a real broker: commits under out-of-order
acks, long handlers beyond ``max.poll.interval.ms``, backpressure, names."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from typing import Any

import pytest

from transport import Delivery, InMemoryMetrics, WorkRequest, connect, set_metrics_sink
from transport_kafka import KafkaRequestQueue, KafkaTransport

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]


def _name() -> str:
    return f"k{uuid.uuid4().hex[:10]}"


async def _committed(transport: KafkaTransport, queue: KafkaRequestQueue) -> int:
    topics = queue.topics
    return (await transport.clients.committed(topics.group, topics.requests, [0]))[0]


async def test_out_of_order_acks_never_commit_past_an_unacked_record(
    kafka_config_factory: Any,
) -> None:
    transport = await connect(kafka_config_factory())
    assert isinstance(transport, KafkaTransport)
    try:
        queue = transport.request_queue(_name())
        assert isinstance(queue, KafkaRequestQueue)
        sent = [await queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(8)]
        held: list[Delivery] = []
        while len(held) < 8:
            delivery = await queue.poll(15)
            assert delivery is not None
            held.append(delivery)
        # FIFO on one partition: the i-th delivery is offset i.
        assert [d.request.request_id for d in held] == [r.request_id for r in sent]
        unacked = set(range(8))
        order = [i for i in range(8) if i != 2]
        random.shuffle(order)
        for i in [*order, 2]:
            assert await held[i].ack()
            unacked.discard(i)
            await queue._engine.commit_now()
            committed = await _committed(transport, queue)
            lowest = min(unacked) if unacked else 8
            # Never past an unacked record; exactly the contiguous prefix.
            assert committed <= lowest
            if committed >= 0:
                assert committed == lowest
        assert await _committed(transport, queue) == 8
    finally:
        await transport.aclose()


async def test_unacked_record_behind_acked_ones_is_the_only_redelivery(
    kafka_config_factory: Any,
) -> None:
    name = _name()
    first = await connect(kafka_config_factory())
    second = None
    try:
        queue = first.request_queue(name)
        sent = [await queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(6)]
        held = [await queue.poll(15) for _ in range(6)]
        assert all(held)
        for d in reversed(held[1:]):
            assert d is not None and await d.ack()
        await first.aclose()  # leaves the group; offset 0 was never acked
        second = await connect(kafka_config_factory())
        queue2 = second.request_queue(name)
        again = await queue2.poll(20)
        assert again is not None
        assert again.request.request_id == sent[0].request_id
        assert again.attempt == 2
        assert await queue2.poll(1.0) is None, "acked records came back"
        assert await again.ack()
    finally:
        await first.aclose()
        if second is not None:
            await second.aclose()


async def test_handler_longer_than_max_poll_interval_is_not_redelivered(
    kafka_config_factory: Any,
) -> None:
    """max.poll.interval.ms = 6 s, the handler runs 18 s while extending a
    2 s lease; a rival consumer in another client polls the whole time."""
    options = {"max_poll_interval_ms": 6000, "session_timeout_ms": 6000}
    worker_t = await connect(kafka_config_factory(options=options))
    rival_t = await connect(kafka_config_factory(options=options))
    try:
        name = _name()
        worker = worker_t.request_queue(name, lease_seconds=2.0)
        [request] = [await worker.enqueue(WorkRequest(task="long"))]
        delivery = await worker.poll(15)
        assert delivery is not None and delivery.request.request_id == request.request_id
        rival = rival_t.request_queue(name, lease_seconds=2.0)
        stolen: list[Delivery] = []

        async def rival_polls() -> None:
            while True:
                got = await rival.poll(0.5)
                if got is not None:
                    stolen.append(got)

        rival_task = asyncio.create_task(rival_polls())
        try:
            end = time.monotonic() + 18.0
            while time.monotonic() < end:
                await asyncio.sleep(0.5)
                assert await delivery.extend(), "lease lost while extending"
            assert await delivery.ack(), "the worker kept its partition and its lease"
        finally:
            rival_task.cancel()
            await asyncio.gather(rival_task, return_exceptions=True)
        assert stolen == []
        # A later request is still served (the worker was never evicted).
        follow = await worker.enqueue(WorkRequest(task="after"))
        got = await worker.poll(10)
        assert got is not None and got.request.request_id == follow.request_id
        assert got.attempt == 1
        assert await got.ack()
    finally:
        await rival_t.aclose()
        await worker_t.aclose()


async def test_bounded_buffer_pauses_and_resumes(kafka_config_factory: Any) -> None:
    transport = await connect(kafka_config_factory(options={"max_buffered": 5}))
    assert isinstance(transport, KafkaTransport)
    try:
        queue = transport.request_queue(_name())
        assert isinstance(queue, KafkaRequestQueue)
        sent = [await queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(40)]
        first = await queue.poll(15)
        assert first is not None
        engine = queue._engine
        assert engine._thread is not None
        # librdkafka would restart the fetch of a resumed partition only at
        # its broker thread's next wake-up; the engine wakes the leader.
        woken: list[list[tuple[str, int]]] = []
        wake = engine._wake_fetchers

        def counting_wake(consumer: Any) -> None:
            wake(consumer)  # asks the leaders first after an assignment
            woken.append([(tp.topic, tp.partition) for tp in engine._wake or []])

        engine._wake_fetchers = counting_wake  # type: ignore[method-assign]
        paused = False
        for _ in range(20):  # each call runs between two steps of the consumer thread
            paused = await engine._thread.submit(lambda: engine._paused)
            if paused:
                break
        assert paused, "the consumer did not pause at max_buffered"
        got = [first]
        await first.ack()
        while len(got) < 40:
            delivery = await queue.poll(10)
            assert delivery is not None, f"stalled after {len(got)}"
            await delivery.ack()
            got.append(delivery)
        assert [d.request.request_id for d in got] == [r.request_id for r in sent]
        for _ in range(20):
            if not await engine._thread.submit(lambda: engine._paused):
                break
        assert woken, "resumed without waking the fetcher"
        assert woken[0] == [(queue.topics.requests, 0)]
    finally:
        await transport.aclose()


async def test_a_lone_write_is_sent_at_once_whatever_linger_ms(
    kafka_config_factory: Any,
) -> None:
    """A record produced while the producer holds no other (one awaited
    enqueue, registration, response) goes out at once instead of after
    ``linger.ms``, which only batches records produced together; closing
    the transport ends the producer's threads."""
    config = kafka_config_factory(
        options={"producer": {"linger.ms": 20_000}, "operation_timeout_s": 60.0}
    )
    transport = await connect(config)
    try:
        queue = transport.request_queue(_name())
        registry = transport.delivery_registry(_name())
        # Without the flush each of these waits out the 20 s linger.
        async with asyncio.timeout(10):
            await queue.enqueue(WorkRequest(task="t", payload=1))
            await registry.register("r1")
            delivery = await queue.poll(5)  # its delivery count is one more write
        assert delivery is not None and delivery.request.payload == 1
        async with asyncio.timeout(10):
            assert await delivery.ack()
    finally:
        await transport.aclose()
    left = [t.name for t in threading.enumerate() if t.name.startswith("kafka-producer")]
    assert left == [], f"producer threads alive after aclose(): {left}"


async def test_a_burst_of_first_enqueues_creates_the_topics_once(
    kafka_config_factory: Any,
) -> None:
    """Concurrent first enqueues on a new queue share one creation and
    check of its topics (each made its own before: 20,000 of them timed out
    behind each other on the client's thread pool)."""
    transport = await connect(kafka_config_factory())
    assert isinstance(transport, KafkaTransport)
    clients = transport.clients
    calls: list[list[str]] = []
    create = clients._create_topics

    def counted(specs: Any, limit: float) -> Any:
        calls.append(sorted(s.name for s in specs))
        return create(specs, limit)

    clients._create_topics = counted  # type: ignore[method-assign]
    try:
        queue = transport.request_queue(_name())
        stored = await asyncio.gather(
            *(queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(300))
        )
        assert len({r.request_id for r in stored}) == 300
        assert len(calls) == 1, f"{len(calls)} creations for one queue's topics"
    finally:
        await transport.aclose()


async def test_topics_and_group_follow_the_documented_names(kafka_config_factory: Any) -> None:
    transport = await connect(kafka_config_factory(namespace="acme", consumer_group="cooks"))
    assert isinstance(transport, KafkaTransport)
    try:
        name = _name()
        queue = transport.request_queue(name)
        assert isinstance(queue, KafkaRequestQueue)
        await queue.enqueue(WorkRequest(task="t"))
        topics = queue.topics
        assert topics.requests == f"acme.{name}.requests"
        assert topics.dlq == f"acme.{name}.dlq"
        assert topics.state == f"acme.{name}.state"
        assert topics.group == f"acme.cooks.{name}"
        for topic in (topics.requests, topics.dlq, topics.state):
            assert await transport.clients.partitions(topic) == [0]
        stats = await queue.stats()
        assert stats.depth == 1
        health = await transport.health()
        assert health.ok and health.latency_ms is not None
    finally:
        await transport.aclose()


async def test_partitions_option_creates_partitioned_request_topics(
    kafka_config_factory: Any,
) -> None:
    transport = await connect(kafka_config_factory(options={"partitions": 3}))
    assert isinstance(transport, KafkaTransport)
    assert transport.capabilities.ordered is False  # per partition only
    try:
        queue = transport.request_queue(_name())
        assert isinstance(queue, KafkaRequestQueue)
        sent = [await queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(12)]
        assert await transport.clients.partitions(queue.topics.requests) == [0, 1, 2]
        before = await queue.stats()
        assert before.partition_lag is not None and set(before.partition_lag) == {"0", "1", "2"}
        assert sum(before.partition_lag.values()) == before.depth == 12
        got = []
        while len(got) < 12:
            delivery = await queue.poll(15)
            assert delivery is not None
            await delivery.ack()
            got.append(delivery.request.request_id)
        assert sorted(got) == sorted(r.request_id for r in sent)
        after = await queue.stats()
        assert after.depth == 0 and after.partition_lag == {"0": 0, "1": 0, "2": 0}
    finally:
        await transport.aclose()


async def test_partition_lag_reaches_the_metrics_sink(kafka_config_factory: Any) -> None:
    metrics = InMemoryMetrics()
    set_metrics_sink(metrics)
    transport = await connect(kafka_config_factory(options={"partitions": 2}))
    try:
        name = _name()
        queue = transport.request_queue(name)
        for i in range(6):
            await queue.enqueue(WorkRequest(task="t", payload=i, ordering_key=f"k{i}"))
        stats = await queue.stats()
        assert stats.partition_lag is not None
        for partition, lag in stats.partition_lag.items():
            key = ("queue_partition_lag", (("partition", partition), ("queue", name)))
            assert metrics.gauges[key] == lag
        assert sum(stats.partition_lag.values()) == 6
    finally:
        set_metrics_sink(None)
        await transport.aclose()


async def test_health_reports_an_unreachable_broker(kafka_config_factory: Any) -> None:
    from transport.testing.brokers import free_port

    config = kafka_config_factory(options={"operation_timeout_s": 1.0})
    config = config.model_copy(update={"url": f"kafka://127.0.0.1:{free_port()}"})
    transport = await connect(config)
    try:
        health = await transport.health()
        assert health.ok is False
        assert "unreachable" in health.detail
    finally:
        await transport.aclose()


async def test_requests_held_by_the_application_do_not_fill_the_buffer(
    kafka_config_factory: Any,
) -> None:
    """``max_buffered`` bounds what is fetched and not handed out: a batch
    being worked on must not stop the fetch of the next one (until
    2026-12-04 leases counted, and a worker holding ``max_buffered``
    requests paused its partitions until it acked some)."""
    transport = await connect(kafka_config_factory(options={"max_buffered": 5}))
    try:
        queue = transport.request_queue(_name())

        async def take(count: int, why: str) -> list[Delivery]:
            taken: list[Delivery] = []
            while len(taken) < count:
                got = await queue.poll_many(count - len(taken), 15)
                assert got, f"{why} after {len(taken)}"
                taken.extend(got)
            return taken

        first = [await queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(12)]
        held = await take(12, "stalled")
        assert [d.request.request_id for d in held] == [r.request_id for r in first]
        later = [await queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(12, 15)]
        # All twelve are still held: the next ones come all the same.
        more = await take(3, "nothing fetched while twelve requests are held")
        assert [d.request.request_id for d in more] == [r.request_id for r in later]
        assert all(await queue.ack_many(held + more))
    finally:
        await transport.aclose()


async def test_priority_levels_open_together_even_with_a_backlog_beyond_the_buffer(
    kafka_config_factory: Any,
) -> None:
    from datetime import timedelta

    transport = await connect(kafka_config_factory(options={"max_buffered": 5}))
    try:
        pq = transport.priority_queue(_name(), levels=2, aging_interval=timedelta(hours=1))
        for i in range(20):
            await pq.enqueue(WorkRequest(task="t", payload=i), priority=1)
        urgent = [await pq.enqueue(WorkRequest(task="t", payload=i), priority=0) for i in range(2)]
        started = time.monotonic()
        first = await pq.poll(20)
        assert first is not None
        # Level 1 counted as loaded when it paused at max_buffered, not after
        # the deadline for a missing assignment.
        assert time.monotonic() - started < 10
        second = await pq.poll(10)
        assert second is not None
        assert [first.request.request_id, second.request.request_id] == [
            r.request_id for r in urgent
        ]
        got = [first, second]
        while len(got) < 22:
            delivery = await pq.poll(10)
            assert delivery is not None
            got.append(delivery)
        for delivery in got:
            assert await delivery.ack()
    finally:
        await transport.aclose()


async def test_a_level_that_joined_its_group_earlier_is_not_served_first(
    kafka_config_factory: Any,
) -> None:
    from datetime import timedelta

    from transport import PriorityRequestQueue

    name = _name()
    producer = await connect(kafka_config_factory())
    try:
        pq = producer.priority_queue(name, levels=3, aging_interval=timedelta(hours=1))
        low = [(await pq.enqueue(WorkRequest(task="t"), priority=2)).request_id for _ in range(3)]
        high = [(await pq.enqueue(WorkRequest(task="t"), priority=0)).request_id for _ in range(3)]
    finally:
        await producer.aclose()
    transport = await connect(kafka_config_factory())
    try:
        worker = transport.priority_queue(name, levels=3, aging_interval=timedelta(hours=1))
        assert isinstance(worker, PriorityRequestQueue)
        # Level 2's consumer joins its group and loads its backlog first (as
        # when levels start at different times); levels 0 and 1 join only
        # with the priority queue's first poll, well after.
        level2 = worker._queues[2]
        assert await level2.caught_up(20), "level 2 did not load its backlog within 20 s"
        got: list[str] = []
        for n in range(6):
            delivery = await worker.poll(10)
            assert delivery is not None, f"poll {n + 1}: nothing within 10 s; got {got}"
            got.append(delivery.request.request_id)
            assert await delivery.ack()
        assert got == high + low, "level 2 was served before level 0's backlog had arrived"
    finally:
        await transport.aclose()


async def test_the_head_seen_from_outside_the_group_is_the_oldest_request_not_committed(
    kafka_config_factory: Any,
) -> None:
    """A process that is not a member (``transport top``, ``stats``) reads
    the first record at the committed offset: a request leased by a worker
    still counts until its ack is committed; the worker's own stats, which
    know the lease, already show the next one. A delayed nack is not waiting."""
    from datetime import UTC, datetime, timedelta

    config = kafka_config_factory()
    worker = await connect(config)
    observer = await connect(config)
    name = _name()
    try:
        queue = worker.request_queue(name)
        outside = observer.request_queue(name)
        first = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
        second = first + timedelta(minutes=5)
        await queue.enqueue(WorkRequest(request_id="h1", task="t", enqueued_at=first))
        await queue.enqueue(WorkRequest(request_id="h2", task="t", enqueued_at=second))
        delivery = await queue.poll(30)
        assert delivery is not None and delivery.request.request_id == "h1"
        assert (await queue.stats()).head_enqueued_at == second, "the member knows h1 is leased"
        assert (await outside.stats()).head_enqueued_at == first, "not committed yet"
        assert await delivery.ack()
        assert (await outside.stats()).head_enqueued_at == second, "h1's ack is committed"
        later = await queue.poll(30)
        assert later is not None and later.request.request_id == "h2"
        assert await later.nack(delay=3600)
        # h2 is now a re-produced copy due in an hour, the original settled.
        assert (await outside.stats()).head_enqueued_at is None, "nothing is due"
        assert (await queue.stats()).head_enqueued_at is None, "held on the delay timer"
    finally:
        await observer.aclose()
        await worker.aclose()


async def test_a_batch_poll_counts_its_deliveries_in_one_round_and_a_clean_close_withdraws_the_rest(
    kafka_config_factory: Any,
) -> None:
    """``poll_many`` takes from the buffer with the whole batch as demand: its
    delivery counts are written ahead in rounds (one state record for many),
    and the counts written for requests it did not hand out are withdrawn by
    a clean close, so the next consumer sees them at attempt 1. ``ack_many``
    makes the batch durable with one commit: nothing acked comes back."""
    config = kafka_config_factory()
    name = _name()
    transport = await connect(config)
    try:
        queue = transport.request_queue(name)
        sent = [await queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(60)]
        got: list[Delivery] = []
        deadline = time.monotonic() + 30
        while len(got) < 25 and time.monotonic() < deadline:
            got += await queue.poll_many(25 - len(got), 15)
        assert len(got) == 25 and all(d.attempt == 1 for d in got)
        assert [d.request.request_id for d in got] == [r.request_id for r in sent[:25]]
        assert await queue.ack_many(got) == [True] * 25
        assert await queue.ack_many(got[:3]) == [False] * 3  # settled already
        ahead = sum(1 for r in queue._engine.ready if r.reserved)  # type: ignore[attr-defined]
        assert ahead > 0, "nothing was counted ahead for the batch"
    finally:
        await transport.aclose()
    transport = await connect(config)
    try:
        queue = transport.request_queue(name)
        rest: list[Delivery] = []
        deadline = time.monotonic() + 30
        while len(rest) < 35 and time.monotonic() < deadline:
            rest += await queue.poll_many(50, 15)
        ids = [d.request.request_id for d in rest]
        assert ids == [r.request_id for r in sent[25:]], "lost, duplicated or acked ones back"
        assert [d.attempt for d in rest] == [1] * 35, "a clean close left counts behind"
        assert await queue.ack_many(rest) == [True] * 35
    finally:
        await transport.aclose()


async def test_an_ack_cancelled_while_it_waits_for_the_commit_leaves_the_round_to_the_others(
    kafka_config_factory: Any,
) -> None:
    """Acks share one commit round; each waits on a future of its own, so a
    cancelled ack (its handler's task cancelled) does not cancel the round:
    the other ack made with it still returns True once the commit covers it."""
    transport = await connect(kafka_config_factory())
    try:
        queue = transport.request_queue(_name())
        await queue.enqueue_many([WorkRequest(task="t", payload=i) for i in range(2)])
        held: list[Delivery] = []
        deadline = time.monotonic() + 30
        while len(held) < 2:
            assert time.monotonic() < deadline, "the requests did not come"
            held += await queue.poll_many(2 - len(held), 15)
        engine = queue._engine  # type: ignore[attr-defined]
        first = asyncio.create_task(held[0].ack())
        second = asyncio.create_task(held[1].ack())
        await asyncio.sleep(0)  # one loop step: both run to their wait for the round
        assert len(engine._round_waiters) == 2
        round_ = engine._next_commit
        first.cancel()
        assert await second is True
        with pytest.raises(asyncio.CancelledError):
            await first
        assert not round_.cancelled()
        # Settled before it was cancelled: the commit covered it too.
        assert await _committed(transport, queue) == 2
    finally:
        await transport.aclose()


async def test_counts_reserved_ahead_stay_within_twice_the_demand(
    kafka_config_factory: Any,
) -> None:
    """A ``kill -9`` adds an attempt to the records counted ahead and not
    handed out: at most twice the demand (polls in progress, the rest of a
    batch, leases held). A round counting ahead after a batch was handed out
    counts those an earlier round reserved as part of it (it added twice
    the demand on top of them: 48 reserved with 16 leases held)."""
    config = kafka_config_factory()
    transport = await connect(config)
    try:
        queue = transport.request_queue(_name())
        await queue.enqueue_many([WorkRequest(task="t", payload=i) for i in range(200)])
        engine = queue._engine  # type: ignore[attr-defined]
        held: list[Delivery] = []
        deadline = time.monotonic() + 30
        for target in (16, 32, 48):  # batches of 16, all held: the demand is the leases
            while len(held) < target:
                assert time.monotonic() < deadline, "the batches did not come"
                held += await queue.poll_many(target - len(held), 15)
            while engine._reserving is not None and not engine._reserving.done():
                await asyncio.shield(engine._reserving)
            ahead = sum(1 for r in engine.ready if r.reserved)
            assert 0 < ahead <= 2 * engine._demand(), (ahead, engine._demand())
        assert await queue.ack_many(held) == [True] * len(held)
    finally:
        await transport.aclose()


async def test_the_body_limit_is_the_producers_and_a_request_at_it_can_be_dead_lettered(
    kafka_config_factory: Any,
) -> None:
    # librdkafka's message.max.bytes (1,000,000 by default) is below the
    # default max_payload_bytes (1 MiB): a request between the two was
    # accepted, then refused by the client with MSG_SIZE_TOO_LARGE; one just
    # under it could not be dead-lettered (the dead letter wraps it with its
    # error). The library's limit is now the producer's less 8 KiB.
    from transport.errors import PayloadTooLargeError
    from transport_kafka._config import RECORD_ALLOWANCE

    transport = await connect(kafka_config_factory())
    try:
        assert isinstance(transport, KafkaTransport)
        queue = transport.request_queue(_name(), max_attempts=1)
        limit = queue.max_payload_bytes
        assert limit == 1_000_000 - RECORD_ALLOWANCE
        with pytest.raises(PayloadTooLargeError):
            await queue.enqueue(WorkRequest(task="t", payload="x" * 995_000))
        edge = WorkRequest(task="t", payload="x" * (limit - 400))
        await queue.enqueue(edge)
        delivery = await queue.poll(30)
        assert delivery is not None and delivery.request.request_id == edge.request_id
        assert await delivery.dead_letter("E" * 10_000)  # cut to 4 KiB in the record
        [dead] = await queue.dead_letters()
        assert dead.request_id == edge.request_id and len(dead.error.encode()) <= 4096
    finally:
        await transport.aclose()


async def test_a_body_too_large_for_its_dead_letter_does_not_block_the_queue(
    kafka_config_factory: Any,
) -> None:
    """Another program's undecodable body near the producer's limit: its
    dead letter (the body as base64, a third larger) was refused
    (MSG_SIZE_TOO_LARGE) at every poll, so no request of the queue was
    delivered any more. It is dead-lettered without the body."""
    transport = await connect(kafka_config_factory())
    try:
        assert isinstance(transport, KafkaTransport)
        name = _name()
        queue = transport.request_queue(name)
        await transport.inject_raw(name, b"\x80" * 900_000)
        valid = await queue.enqueue(WorkRequest(task="t", payload=1))
        delivery = await queue.poll(30)
        assert delivery is not None and delivery.request.request_id == valid.request_id
        assert await delivery.ack()
        [dead] = await queue.dead_letters()
        assert dead.raw is None and "900,000 bytes, was too large to keep" in dead.error
    finally:
        await transport.aclose()


async def test_a_request_being_counted_is_not_dead_lettered_as_exhausted(
    kafka_config_factory: Any,
) -> None:
    """A record that a round of delivery counts has picked, while the round's
    state write is in flight, is not yet reserved, but its count already
    includes the coming delivery. A poll that met it at the head of the
    buffer took that count for a delivery made: on its last attempt the
    request was dead-lettered "not acknowledged after N deliveries" without
    that delivery (max_attempts=1, 16 pollers, 4,000 requests: 11 never
    handed out). The state writes are slowed here so that polls always find
    a round in flight."""
    config = kafka_config_factory()
    transport = await connect(config)
    try:
        queue = transport.request_queue(_name(), max_attempts=1)
        await queue.enqueue_many([WorkRequest(task="t", payload=i) for i in range(120)])
        engine = queue._engine  # type: ignore[attr-defined]
        produce = engine.clients.produce

        async def slow_state_writes(topic: str, *args: Any, **kwargs: Any) -> Any:
            if topic == engine.topics.state:
                await asyncio.sleep(0.05)  # a slow broker: the round stays in flight
            return await produce(topic, *args, **kwargs)

        engine.clients.produce = slow_state_writes
        first = await queue.poll(30)
        assert first is not None and first.attempt == 1
        attempts: list[int] = [first.attempt]
        acks: list[asyncio.Task[bool]] = [asyncio.create_task(first.ack())]
        async with asyncio.timeout(30):
            while len(engine.ready) < 119:  # the whole backlog fetched
                await engine._changed.wait()  # set as records arrive

        async def poller() -> None:
            while len(attempts) < 120:
                delivery = await queue.poll(2)
                if delivery is None:
                    return
                attempts.append(delivery.attempt)
                acks.append(asyncio.create_task(delivery.ack()))

        async with asyncio.timeout(60):
            await asyncio.gather(*(poller() for _ in range(8)))
            assert all(await asyncio.gather(*acks))
        dead = await queue.dead_letters(200)
        assert [d.error for d in dead] == [], "dead-lettered without their delivery"
        assert sorted(attempts) == [1] * 120
    finally:
        await transport.aclose()
