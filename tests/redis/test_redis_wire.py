"""What the Redis backend stores, read back with a raw client (plain
redis-py, no library code), is what docs/wire.md says: key and channel
names, entry fields, and bodies that validate against docs/schemas/."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from jsonschema import Draft202012Validator

from transport import TransportConfig, WorkRequest, WorkResponse, connect

pytestmark = [pytest.mark.asyncio, pytest.mark.broker, pytest.mark.timeout(90)]

SCHEMAS = Path(__file__).resolve().parent.parent.parent / "docs" / "schemas"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _errors(stem: str, body: bytes) -> list[str]:
    schema = json.loads((SCHEMAS / f"{stem}.schema.json").read_text(encoding="utf-8"))
    return [e.message for e in Draft202012Validator(schema).iter_errors(json.loads(body))]


async def test_redis_objects_and_bodies_are_as_documented(
    redis_config: TransportConfig, namespace: str
) -> None:
    ns = namespace
    raw = aioredis.Redis.from_url(redis_config.url)
    try:
        async with await connect(redis_config) as transport:
            queue = transport.request_queue("orders", max_attempts=2)
            first = WorkRequest(task="cook", headers={"traceparent": TRACEPARENT})
            await queue.enqueue(first)
            # Another program's entry, between two of the library's.
            await raw.xadd(f"{ns}:q:{{orders}}", {"body": b"not json"})
            await queue.enqueue(WorkRequest(task="serve"))
            entries = await raw.xrange(f"{ns}:q:{{orders}}")
            assert [set(fields) for _, fields in entries] == [{b"body"}] * 3
            assert _errors("WorkRequest", entries[0][1][b"body"]) == []
            assert json.loads(entries[0][1][b"body"])["headers"]["traceparent"] == TRACEPARENT

            got = await queue.poll(10)
            assert got is not None and got.request.request_id == first.request_id
            assert await got.nack(error="oven cold")
            *_, (_, renacked) = await raw.xrange(f"{ns}:q:{{orders}}")  # re-added at the end
            assert (renacked[b"attempts"], renacked[b"error"]) == (b"1", b"oven cold")
            serve = await queue.poll(10)  # the foreign entry was dead-lettered on the way
            assert serve is not None and serve.request.task == "serve"
            await serve.ack()
            again = await queue.poll(10)
            assert again is not None and again.attempt == 2
            assert await again.dead_letter("burnt")
            dead = await raw.xrange(f"{ns}:q:{{orders}}:dlq")
            assert [set(f) for _, f in dead] == [
                {b"body", b"error", b"attempts", b"request_id", b"source"}
            ] * 2
            foreign, burnt = dead[0][1], dead[1][1]
            assert (foreign[b"body"], foreign[b"request_id"]) == (b"not json", b"")
            assert (burnt[b"error"], burnt[b"attempts"]) == (b"burnt", b"2")
            assert burnt[b"request_id"] == first.request_id.encode()
            assert await raw.xlen(f"{ns}:q:{{orders}}") == 0

            registry = transport.delivery_registry("caller")
            await registry.register("r-1")
            await registry.complete("r-1", WorkResponse(request_id="r-1", status="completed"))
            record = await raw.hget(f"{ns}:kv:{{delivery:caller}}", "p.r-1")
            assert record is not None and _errors("DeliveryRecord", record) == []
            changes = await raw.xrange(f"{ns}:kv:{{delivery:caller}}:log")
            assert [f[b"key"] for _, f in changes] == [b"p.r-1", b"c.r-1"]

            log = transport.event_log()
            position = await log.append("audit", {"n": 1}, key="k", headers={"h": "v"})
            [(entry_id, fields)] = await raw.xrange(f"{ns}:log:{{audit}}")
            assert entry_id.decode() == position
            assert json.loads(fields[b"event"]) == {
                "schema_version": 1,
                "data": {"n": 1},
                "key": "k",
                "headers": {"h": "v"},
            }
            reader = await log.read("audit", "earliest", cursor="c1")
            assert await reader.next(10) is not None
            await reader.aclose()
            assert await raw.hget(f"{ns}:log:{{audit}}:cursors", "c1") == position.encode()

            bus = transport.event_bus()
            sub = await bus.subscribe("kitchen.*")
            listener = raw.pubsub()
            await listener.subscribe(f"{ns}:ev:kitchen.ready")
            await listener.get_message(timeout=5)  # the subscribe confirmation
            await bus.publish("kitchen.ready", {"dish": "soup"})
            message = None
            for _ in range(50):
                message = await listener.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if message is not None:
                    break
            assert message is not None, "the library's publish never reached a raw subscriber"
            assert _errors("Event", message["data"]) == []
            event = await sub.next(10)
            assert event is not None and event.data == {"dish": "soup"}
            # A raw publisher's event reaches a library subscription.
            raw_event = {
                "id": "e1",
                "subject": "kitchen.other",
                "data": 7,
                "published_at": "2026-01-01T00:00:00Z",
            }
            await raw.publish(f"{ns}:ev:kitchen.other", json.dumps(raw_event))
            other = await sub.next(10)
            assert other is not None and (other.subject, other.data) == ("kitchen.other", 7)
            await listener.aclose()
            await asyncio.sleep(0)
    finally:
        await raw.aclose()
