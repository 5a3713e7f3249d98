"""What the Kafka backend writes, read back with a raw consumer, is what
docs/wire.md says: topic names (``_`` doubled), keys, the ``ae-*`` headers of
a nack copy, and bodies that validate against docs/schemas/."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient
from jsonschema import Draft202012Validator

from transport import WorkRequest, connect

pytestmark = pytest.mark.broker

SCHEMAS = Path(__file__).resolve().parent.parent.parent / "docs" / "schemas"


def _errors(stem: str, body: bytes) -> list[str]:
    schema = json.loads((SCHEMAS / f"{stem}.schema.json").read_text(encoding="utf-8"))
    return [e.message for e in Draft202012Validator(schema).iter_errors(json.loads(body))]


def _read(bootstrap: str, topic: str, count: int | None, timeout: float = 30.0) -> list[Any]:
    """The first ``count`` records of partition 0 of ``topic`` (``None``: up
    to its high watermark), without joining a group."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"wire-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        if count is None:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout)
            count = high - low
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


async def test_kafka_topics_headers_and_bodies_are_as_documented(
    kafka_config_factory: Any, kafka_bootstrap: str
) -> None:
    ns = f"w_{uuid.uuid4().hex[:8]}"
    config = kafka_config_factory(namespace=ns)
    doubled = ns.replace("_", "__")
    requests_topic = f"{doubled}.eu__orders.requests"
    request = WorkRequest(task="cook", payload={"dish": "soup"})
    async with await connect(config) as transport:
        queue = transport.request_queue("eu_orders")
        await queue.enqueue(request)
        delivery = await queue.poll(timeout=30)
        assert delivery is not None
        assert await delivery.nack(delay=0.5, error="too hot")
        delivery = await queue.poll(timeout=30)
        assert delivery is not None and delivery.attempt == 2
        assert await delivery.dead_letter("burnt")

        original, copy = await asyncio.to_thread(_read, kafka_bootstrap, requests_topic, 2)
        for record in (original, copy):
            assert record.key() == request.request_id.encode()
            assert _errors("WorkRequest", record.value()) == []
        assert original.headers() in (None, [])
        assert copy.value() == original.value()  # the body is copied unchanged
        headers = dict(copy.headers() or [])
        assert set(headers) == {"ae-attempts", "ae-request-id", "ae-error", "ae-not-before"}
        assert headers["ae-attempts"] == b"1"
        assert headers["ae-request-id"] == request.request_id.encode()
        assert headers["ae-error"] == b"too hot"
        assert int(headers["ae-not-before"]) > original.timestamp()[1]

        (dead,) = await asyncio.to_thread(_read, kafka_bootstrap, f"{doubled}.eu__orders.dlq", 1)
        assert dead.key() == f"{request.request_id}.0.1".encode()  # the copy's offset
        assert _errors("DeadLetter", dead.value()) == []
        assert json.loads(dead.value())["error"] == "burnt"

        # Every delivery is counted in the state topic before it is handed out.
        state = await asyncio.to_thread(_read, kafka_bootstrap, f"{doubled}.eu__orders.state", None)
        assert any(record.value() is not None for record in state)
        for record in state:
            if record.value() is None:  # a dropped marker
                continue
            key = record.key().decode()
            partition, _, rest = key.partition(":")
            assert partition == "0"
            if rest.startswith("r"):
                assert _errors("KafkaDeliveryRound", record.value()) == []
            elif json.loads(record.value()).keys() == {"s"}:
                assert _errors("KafkaSettledMarker", record.value()) == []
            else:
                assert _errors("KafkaDeliveryCount", record.value()) == []

        registry = transport.delivery_registry("front_desk")
        await registry.register("req-1")
        registry_topic = f"{doubled}.registry.delivery.front__desk"
        (kept,) = await asyncio.to_thread(_read, kafka_bootstrap, registry_topic, 1)
        assert kept.key() == b"p.req-1"
        assert _errors("DeliveryRecord", kept.value()) == []
        # A checkpoint as the registry's view writes it (here on demand),
        # once the view has applied the registration: it follows the topic
        # in the background, and had not yet in one CI run (no checkpoint).
        await registry._view.settled(1)
        checkpoint = registry._view._checkpoint()
        assert checkpoint is not None
        await registry._log.save_checkpoint(checkpoint)
        (saved,) = await asyncio.to_thread(
            _read, kafka_bootstrap, f"{registry_topic}.checkpoint", 1
        )
        assert saved.key() == b"checkpoint"
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        [description] = admin.describe_topics(TopicCollection([registry_topic])).values()
        topic_id = str(description.result(10).topic_id)
        assert dict(saved.headers() or []) == {"ae-topic-id": topic_id.encode()}
        body = json.loads(saved.value())
        assert body["version"] == 1 and base64.b64decode(body["resume"]) == b"0:0"
        [[key, position, value]] = body["records"]
        assert key == "p.req-1" and base64.b64decode(position) == b"0:0"
        assert base64.b64decode(value) == kept.value()

        position = await transport.event_log().append("audit", {"x": 1}, key="k")
        (event,) = await asyncio.to_thread(
            _read, kafka_bootstrap, f"{doubled}.stream.audit.events", 1
        )
        assert str(event.offset()) == position
        assert event.key() == b"k"
        assert _errors("LogEvent", event.value()) == []
        body = json.loads(event.value())
        assert body["position"] == ""
        appended_at = datetime.fromisoformat(body["appended_at"])
        assert event.timestamp()[1] == round(appended_at.timestamp() * 1000)
