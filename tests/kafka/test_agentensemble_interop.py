"""Kafka end to end with the AgentEnsemble (Java) codec: records produced
byte for byte as the Java ``KafkaRequestQueue`` writes them (a plain
producer: topic ``agentensemble.<queue>``, key ``requestId``, Jackson JSON
value) are served by an :class:`Ensemble`, whose Java-shaped response lands
on the topic the request's ``TOPIC`` delivery names, keyed by ``requestId``,
as the Java ``KafkaTopicDelivery`` writes it; a Python caller's request is
on the wire exactly as Jackson writes the same record; a bad Java record is
dead-lettered with the reason and its bytes.

The Java side's queue name is ``<queue>.requests``: its topic
``<prefix><queue name>`` is then this library's request topic
``<namespace>.<queue>.requests`` with namespace ``agentensemble``."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from transport import Ensemble, ProvisionPlan, TaskContext, WorkRequest, connect
from transport.interop import agentensemble as ae

pytestmark = pytest.mark.broker

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _java_request(request_id: str, reply_topic: str) -> bytes:
    # new WorkRequest(requestId, "front-desk-java", "check-inventory", "Check tomatoes",
    #   Priority.HIGH, Duration.ofMinutes(10), new DeliverySpec(TOPIC, replyTopic),
    #   new TraceContext(TRACEPARENT, null), null, null, null)
    return (
        f'{{"requestId":"{request_id}","from":"front-desk-java","task":"check-inventory",'
        f'"context":"Check tomatoes","priority":"HIGH","deadline":600.000000000,'
        f'"delivery":{{"method":"TOPIC","address":"{reply_topic}"}},'
        f'"traceContext":{{"traceparent":"{TRACEPARENT}"}}}}'
    ).encode()


def _produce(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    """What the Java KafkaRequestQueue does: one record, String key and value."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    errors: list[Any] = []
    producer.produce(topic, value=value, key=key, on_delivery=lambda err, _m: errors.append(err))
    assert producer.flush(30) == 0
    assert errors == [None]


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    futures[topic].result(30)


def _read(bootstrap: str, topic: str, count: int, timeout: float = 60.0) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"java-side-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                records.append(msg)
        assert len(records) == count, f"{topic}: {len(records)} of {count} records"
        return records
    finally:
        consumer.close()


async def test_a_java_request_is_served_and_answered_on_its_delivery_topic(
    kafka_config_factory: Any, kafka_bootstrap: str
) -> None:
    queue = f"kitchen{uuid.uuid4().hex[:8]}"
    reply_topic = f"agentensemble.replies-{uuid.uuid4().hex[:8]}"
    config = kafka_config_factory(namespace="agentensemble", request_codec="agentensemble")
    async with await connect(config) as transport:
        await transport.provision(ProvisionPlan(queues={queue: 1}))
        await asyncio.to_thread(_create_topic, kafka_bootstrap, reply_topic)
        kitchen = Ensemble(
            queue,
            transport=transport,
            concurrency=1,
            advertise=False,
            respond=ae.AgentEnsembleResponder(transport),
        )
        seen: list[WorkRequest] = []

        @kitchen.task("check-inventory")
        async def check(ctx: TaskContext) -> str:
            seen.append(ctx.request)
            return f"checked: {ctx.payload}"

        good = _java_request("5b1e0c9a-8f7d-4c3b-a2e1-0d9c8b7a6f5e", reply_topic)
        bad = b'{"requestId":"r-bad","from":"front-desk-java","task":"t","priority":"URGENT"}'
        # The Java side: config.topicPrefix() + queueName with queueName "<queue>.requests".
        java_topic = "agentensemble." + f"{queue}.requests"
        await asyncio.to_thread(_produce, kafka_bootstrap, java_topic, b"r-bad", bad)
        await asyncio.to_thread(
            _produce, kafka_bootstrap, java_topic, b"5b1e0c9a-8f7d-4c3b-a2e1-0d9c8b7a6f5e", good
        )
        async with kitchen.serving():
            [reply] = await asyncio.to_thread(_read, kafka_bootstrap, reply_topic, 1)
            handle = transport.request_queue(queue)
            for _ in range(200):
                if await handle.dead_letters():
                    break
                await asyncio.sleep(0.1)
            dead = await handle.dead_letters()
    assert reply.key() == b"5b1e0c9a-8f7d-4c3b-a2e1-0d9c8b7a6f5e"
    value = reply.value()
    # new WorkResponse(id, "COMPLETED", "checked: Check tomatoes", null, <ms>) as Jackson writes it
    prefix = (
        b'{"requestId":"5b1e0c9a-8f7d-4c3b-a2e1-0d9c8b7a6f5e","status":"COMPLETED",'
        b'"result":"checked: Check tomatoes","durationMs":'
    )
    assert value.startswith(prefix) and value.endswith(b"}")
    assert value[len(prefix) : -1].isdigit()
    [request] = seen
    assert request.priority == 1 and request.headers["traceparent"] == TRACEPARENT
    assert request.deadline is not None and request.enqueued_at is not None
    [letter] = dead
    assert letter.request is None and letter.raw_bytes() == bad
    assert "priority" in letter.error and "URGENT" in letter.error


async def test_a_python_callers_request_is_on_the_wire_as_jackson_writes_it(
    kafka_config_factory: Any, kafka_bootstrap: str
) -> None:
    queue = f"pantry{uuid.uuid4().hex[:8]}"
    config = kafka_config_factory(namespace="agentensemble", request_codec="agentensemble")
    async with await connect(config) as transport:
        request = WorkRequest(
            request_id="c0ffee00-1111-4222-8333-444455556666",
            task="count-stock",
            payload="How many tomatoes?",
            priority=3,
            headers={
                **ae.java_headers("py-caller", delivery=("TOPIC", "agentensemble.py-replies")),
                "traceparent": TRACEPARENT,
            },
        )
        await transport.request_queue(queue).enqueue(request)
    # What a Java KafkaRequestQueue consuming queue name "<queue>.requests" reads.
    [record] = await asyncio.to_thread(_read, kafka_bootstrap, f"agentensemble.{queue}.requests", 1)
    assert record.key() == b"c0ffee00-1111-4222-8333-444455556666"
    # new WorkRequest(id, "py-caller", "count-stock", "How many tomatoes?", Priority.LOW,
    #   null, new DeliverySpec(TOPIC, "agentensemble.py-replies"),
    #   new TraceContext(TRACEPARENT, null), null, null, null)
    assert record.value() == (
        b'{"requestId":"c0ffee00-1111-4222-8333-444455556666","from":"py-caller",'
        b'"task":"count-stock","context":"How many tomatoes?","priority":"LOW",'
        b'"delivery":{"method":"TOPIC","address":"agentensemble.py-replies"},'
        b'"traceContext":{"traceparent":"' + TRACEPARENT.encode() + b'"}}'
    )


async def test_a_java_ensembles_response_reaches_a_python_caller_through_an_event_log(
    kafka_config_factory: Any, kafka_bootstrap: str
) -> None:
    queue = f"pantry{uuid.uuid4().hex[:8]}"
    stream = f"replies{uuid.uuid4().hex[:8]}"
    reply_topic = f"agentensemble.stream.{stream}.events"  # the Kafka topic of that stream
    config = kafka_config_factory(namespace="agentensemble", request_codec="agentensemble")
    async with await connect(config) as transport:
        await transport.provision(ProvisionPlan(event_streams=[stream]))
        request = WorkRequest(
            task="count-stock",
            payload="How many tomatoes?",
            headers=ae.java_headers("py-caller", delivery=("TOPIC", reply_topic)),
        )
        await transport.request_queue(queue).enqueue(request)

        # The Java ensemble: KafkaRequestQueue.dequeue("<queue>.requests") reads the
        # record, and KafkaTopicDelivery produces the response to delivery.address.
        [record] = await asyncio.to_thread(
            _read, kafka_bootstrap, f"agentensemble.{queue}.requests", 1
        )
        java_view = json.loads(record.value())
        assert java_view["delivery"] == {"method": "TOPIC", "address": reply_topic}
        # new WorkResponse(requestId, "COMPLETED", "42 tomatoes", null, 7L)
        answer = (
            f'{{"requestId":"{java_view["requestId"]}","status":"COMPLETED",'
            f'"result":"42 tomatoes","durationMs":7}}'
        ).encode()
        await asyncio.to_thread(
            _produce, kafka_bootstrap, reply_topic, java_view["requestId"].encode(), answer
        )

        async with transport.event_log() as log:
            reader = await log.read(stream)
            event = await reader.next(timeout=30)
    assert event is not None
    response = ae.decode_response(event.data)
    assert response.request_id == request.request_id
    assert (response.status, response.result, response.duration_ms) == (
        "completed",
        "42 tomatoes",
        7.0,
    )
