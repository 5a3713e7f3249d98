"""``WorkRequest.ordering_key`` on Kafka: it is the record key, so the
requests of one key share a partition and are handed out in enqueue order,
also after a nack or a requeue from the dead letters."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from transport import WorkRequest, connect
from transport_kafka import KafkaDelivery, KafkaRequestQueue, KafkaTransport

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]

KEYS = ("alpha", "bravo", "charlie")


def _name() -> str:
    return f"ok{uuid.uuid4().hex[:10]}"


def _partition(delivery: KafkaDelivery) -> int:
    return delivery._lease.record.partition


async def _take(queue: KafkaRequestQueue, n: int) -> list[KafkaDelivery]:
    got: list[KafkaDelivery] = []
    while len(got) < n:
        delivery = await queue.poll(20)
        assert delivery is not None, f"only {len(got)} of {n} delivered"
        assert isinstance(delivery, KafkaDelivery)
        got.append(delivery)
    return got


async def test_requests_of_one_ordering_key_share_a_partition_and_keep_their_order(
    kafka_config_factory: Any,
) -> None:
    transport = await connect(kafka_config_factory(options={"partitions": 3}))
    assert isinstance(transport, KafkaTransport)
    try:
        queue = transport.request_queue(_name())
        assert isinstance(queue, KafkaRequestQueue)
        sent = [
            await queue.enqueue(WorkRequest(task="t", payload=i, ordering_key=KEYS[i % 3]))
            for i in range(30)
        ]
        assert await transport.clients.partitions(queue.topics.requests) == [0, 1, 2]
        delivered: dict[str, list[str]] = {key: [] for key in KEYS}
        partitions: dict[str, set[int]] = {key: set() for key in KEYS}
        for delivery in await _take(queue, 30):
            key = delivery.request.ordering_key
            assert key is not None
            delivered[key].append(delivery.request.request_id)
            partitions[key].add(_partition(delivery))
            assert await delivery.ack()
        assert await queue.poll(0.5) is None
        for key in KEYS:
            expected = [r.request_id for r in sent if r.ordering_key == key]
            assert len(expected) == 10
            assert delivered[key] == expected, f"key {key!r} out of order"
            assert len(partitions[key]) == 1, f"key {key!r} on partitions {partitions[key]}"
        # The keys themselves spread over the partitions (the test would
        # prove little if all of them hashed to one).
        assert len(set().union(*partitions.values())) > 1
    finally:
        await transport.aclose()


async def test_nack_and_requeue_keep_a_request_on_its_keys_partition(
    kafka_config_factory: Any,
) -> None:
    transport = await connect(kafka_config_factory(options={"partitions": 3}))
    assert isinstance(transport, KafkaTransport)
    try:
        queue = transport.request_queue(_name(), max_attempts=2)
        assert isinstance(queue, KafkaRequestQueue)
        sent = [
            await queue.enqueue(WorkRequest(task="t", payload=i, ordering_key="bravo"))
            for i in range(6)
        ]
        first = await _take(queue, 6)
        home = {_partition(d) for d in first}
        assert len(home) == 1
        for delivery in first:  # attempt 1 of 2: re-produced to the topic
            assert await delivery.nack(error="again")
        second = await _take(queue, 6)
        assert [d.request.request_id for d in second] == [r.request_id for r in sent]
        assert {_partition(d) for d in second} == home
        for delivery in second:  # the last attempt: dead-lettered
            assert await delivery.nack(error="give up")
        assert len(await queue.dead_letters()) == 6
        assert await queue.requeue_dead_letters() == 6
        third = await _take(queue, 6)
        assert [d.request.request_id for d in third] == [r.request_id for r in sent]
        assert {_partition(d) for d in third} == home
        assert all(d.attempt == 1 and d.request.ordering_key == "bravo" for d in third)
        for delivery in third:
            assert await delivery.ack()
    finally:
        await transport.aclose()
