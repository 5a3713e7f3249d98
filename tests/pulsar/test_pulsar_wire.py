"""What the Pulsar backend writes, read back with a plain reader, is what
docs/wire.md says: topic names, partition keys, the ``ae-*`` properties of a
nack copy and of keyed-topic deletes, and bodies that validate against
docs/schemas/."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.pulsar.conftest import make_config
from transport import WorkRequest, connect
from transport_pulsar import PulsarTransport

pytestmark = pytest.mark.broker

SCHEMAS = Path(__file__).resolve().parent.parent.parent / "docs" / "schemas"


def _errors(stem: str, body: bytes) -> list[str]:
    schema = json.loads((SCHEMAS / f"{stem}.schema.json").read_text(encoding="utf-8"))
    return [e.message for e in Draft202012Validator(schema).iter_errors(json.loads(body))]


async def _read_all(transport: PulsarTransport, topic: str) -> list[Any]:
    """Every message of ``topic`` up to its last one (markers included)."""
    reader = await transport.client.create_reader(topic)
    try:
        messages = []
        while await reader.has_message_available():
            message = await reader.read_next(30)
            assert message is not None
            messages.append(message)
        return messages
    finally:
        await reader.close(5)


async def test_pulsar_topics_properties_and_bodies_are_as_documented(pulsar_url: str) -> None:
    config = make_config(pulsar_url)
    ns = config.namespace
    base = f"persistent://public/default/{ns}"
    request = WorkRequest(task="cook", payload={"dish": "soup"})
    transport = await connect(config)
    assert isinstance(transport, PulsarTransport)
    try:
        queue = transport.request_queue("orders")
        await queue.enqueue(request)
        delivery = await queue.poll(timeout=30)
        assert delivery is not None
        assert await delivery.nack(delay=0.5, error="too hot")
        delivery = await queue.poll(timeout=30)
        assert delivery is not None and delivery.attempt == 2
        assert await delivery.dead_letter("burnt")

        assert transport.topic("q", "orders") == f"{base}.q.orders"
        original, copy = await _read_all(transport, f"{base}.q.orders")
        for message in (original, copy):
            assert message.partition_key() == request.request_id
            assert _errors("WorkRequest", bytes(message.data())) == []
        assert not any(name.startswith("ae-") for name in original.properties())
        assert bytes(copy.data()) == bytes(original.data())
        properties = copy.properties()
        assert set(properties) == {
            "ae-attempts",
            "ae-request-id",
            "ae-error",
            "ae-not-before",
        }
        assert properties["ae-attempts"] == "1"
        assert properties["ae-request-id"] == request.request_id
        assert properties["ae-error"] == "too hot"
        assert int(properties["ae-not-before"]) > original.publish_timestamp()

        dead = [m for m in await _read_all(transport, f"{base}.q.orders__dlq") if m.data()]
        assert len(dead) == 1
        assert re.fullmatch(rf"{request.request_id}\.[0-9a-f]{{32}}", dead[0].partition_key())
        assert _errors("DeadLetter", bytes(dead[0].data())) == []

        counts = await _read_all(transport, f"{base}.q.orders__attempts")
        written = [m for m in counts if m.data()]
        assert written, "every hand-out is counted before it happens"
        for message in written:
            assert _errors("PulsarHandoutCount", bytes(message.data())) == []
        for message in counts:
            if not message.data() and "ae-marker" not in message.properties():
                assert message.properties() == {"ae-tombstone": "1"}
                assert message.partition_key()

        registry = transport.delivery_registry("front-desk")
        await registry.register("req-1")
        records = [
            m for m in await _read_all(transport, f"{base}.kv.delivery.front-desk") if m.data()
        ]
        assert [m.partition_key() for m in records] == ["p.req-1"]  # the registration
        assert _errors("DeliveryRecord", bytes(records[0].data())) == []

        await transport.event_log().append("audit", {"x": 1}, key="k")
        (event,) = await _read_all(transport, f"{base}.log.audit")
        assert event.partition_key() == "k"
        assert _errors("LogEvent", bytes(event.data())) == []
        assert json.loads(bytes(event.data()))["position"] == "0"
    finally:
        await transport.aclose()


async def test_a_copy_written_by_an_earlier_release_keeps_its_error(pulsar_url: str) -> None:
    """Before schema version 1 a nack copy carried its error as
    ``ae-last-error``: such a copy still in a topic keeps its error when it is
    copied again (now as ``ae-error``)."""
    config = make_config(pulsar_url)
    topic = f"persistent://public/default/{config.namespace}.q.legacy"
    transport = await connect(config)
    assert isinstance(transport, PulsarTransport)
    try:
        queue = transport.request_queue("legacy")
        await queue.stats()  # the subscription exists before the copy is written
        request = WorkRequest(task="cook")
        producer = await transport.client.create_producer(topic)
        try:
            await producer.send(
                json.dumps(json.loads(request.model_dump_json())).encode(),
                key=request.request_id,
                properties={
                    "ae-attempts": "1",
                    "ae-request-id": request.request_id,
                    "ae-last-error": "burnt the first time",
                },
            )
        finally:
            await producer.close(5)
        delivery = await queue.poll(timeout=30)
        assert delivery is not None
        assert (delivery.request.request_id, delivery.attempt) == (request.request_id, 2)
        assert await delivery.nack(delay=0.2)  # no new error: the copy keeps the old one
        again = await queue.poll(timeout=30)
        assert again is not None and again.attempt == 3
        assert await again.ack()
        copies = [m for m in await _read_all(transport, topic) if "ae-attempts" in m.properties()]
        assert copies[-1].properties()["ae-error"] == "burnt the first time"
        assert "ae-last-error" not in copies[-1].properties()
    finally:
        await transport.aclose()
