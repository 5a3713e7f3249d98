"""What the NATS backend stores, read back with a raw client, is what
docs/wire.md says: stream, subject and bucket names, message ids, and bodies
that validate against docs/schemas/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nats
import pytest
from jsonschema import Draft202012Validator

from transport import Event, TransportConfig, WorkRequest, connect

pytestmark = pytest.mark.broker

SCHEMAS = Path(__file__).resolve().parent.parent.parent / "docs" / "schemas"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _errors(stem: str, body: bytes) -> list[str]:
    schema = json.loads((SCHEMAS / f"{stem}.schema.json").read_text(encoding="utf-8"))
    return [e.message for e in Draft202012Validator(schema).iter_errors(json.loads(body))]


async def test_nats_objects_and_bodies_are_as_documented(
    nats_config: TransportConfig, namespace: str
) -> None:
    ns = namespace
    nc = await nats.connect(nats_config.url)
    try:
        js = nc.jetstream()
        async with await connect(nats_config) as transport:
            queue = transport.request_queue("orders")
            first = WorkRequest(task="cook", headers={"traceparent": TRACEPARENT})
            await queue.enqueue(first)
            # Another program's message, between two of the library's.
            await js.publish(f"{ns}.q.orders", b"not json", stream=f"{ns}__orders")
            second = WorkRequest(task="cook", payload={"dish": "soup"})
            await queue.enqueue(second)

            # A request waiting in the stream: its body and message id.
            raw = await js.get_msg(f"{ns}__orders", 3)
            assert raw.subject == f"{ns}.q.orders"
            assert raw.headers is not None
            assert raw.headers["Nats-Msg-Id"] == second.request_id
            assert raw.headers["Nats-Expected-Stream"] == f"{ns}__orders"
            assert _errors("WorkRequest", raw.data or b"") == []

            delivery = await queue.poll(timeout=10)
            assert delivery is not None and delivery.request.request_id == first.request_id
            assert await delivery.dead_letter("burnt")
            # The foreign body is dead-lettered before the next request is handed out.
            delivery = await queue.poll(timeout=10)
            assert delivery is not None and delivery.request.request_id == second.request_id
            assert await delivery.ack()

            dead = [await js.get_msg(f"{ns}__orders__dlq", seq) for seq in (1, 2)]
            for msg in dead:
                assert msg.subject == f"{ns}.dlq.orders"
                assert msg.headers is not None
                assert msg.headers["Nats-Msg-Id"].startswith(f"dlq-{ns}__orders-")
                assert _errors("DeadLetter", msg.data or b"") == []
            burnt, foreign = (json.loads(msg.data or b"") for msg in dead)
            assert (burnt["request_id"], burnt["error"]) == (first.request_id, "burnt")
            assert (foreign["request"], foreign["request_id"], foreign["raw"]) == (
                None,
                None,
                "not json",
            )

            registry = transport.delivery_registry("front-desk")
            await registry.register("req-1")
            bucket = f"{ns}__delivery__front-desk"
            raw = await js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.p.req-1")
            assert _errors("DeliveryRecord", raw.data or b"") == []
            assert json.loads(raw.data or b"")["state"] == "pending"

            position = await transport.event_log().append("audit", {"x": 1}, key="k")
            raw = await js.get_msg(f"{ns}__log__audit", int(position))
            assert raw.subject == f"{ns}.log.audit"
            assert _errors("NatsLogRecord", raw.data or b"") == []

            sub = await nc.subscribe("agent.events.kitchen")  # the subject as written
            await nc.flush()
            await nc.flush()  # one flush can overtake the SUB (see NatsContext.round_trip)
            await transport.event_bus().publish("agent.events.kitchen", {"n": 1})
            msg = await sub.next_msg(timeout=10)
            assert msg is not None, "no bus event reached a plain NATS subscriber in 10 s"
            assert _errors("Event", msg.data) == []
            event = json.loads(msg.data)
            assert (event["subject"], event["reply_to"]) == ("agent.events.kitchen", None)
    finally:
        await nc.close()


async def test_plain_nats_clients_and_the_bus_share_the_documented_subjects(
    nats_config: TransportConfig,
) -> None:
    """With the default (no ``bus_prefix``) a plain NATS client publishing on
    ``plugin.inbound.pricing`` reaches ``bus.subscribe("plugin.inbound.>")``,
    with its own body as the event's data, and a plain ``request`` is
    answered by ``bus.serve``."""
    transport = await connect(nats_config)
    nc = await nats.connect(nats_config.url)
    bus = transport.event_bus()
    try:
        subscription = await bus.subscribe("plugin.inbound.>")
        await nc.publish("plugin.inbound.pricing", b'{"dish": "soup"}', headers={"x-from": "plain"})
        await nc.publish("plugin.inbound.stock", b"just text")
        first = await subscription.next(timeout=10)
        second = await subscription.next(timeout=10)
        assert first is not None and second is not None
        assert (first.subject, first.data, first.headers) == (
            "plugin.inbound.pricing",
            {"dish": "soup"},
            {"x-from": "plain"},
        )
        assert (second.subject, second.data) == ("plugin.inbound.stock", "just text")
        await subscription.aclose()

        async def price(event: Event) -> Any:
            return {"price": 4, "for": event.data}

        server = await bus.serve("plugin.inbound.pricing", price)
        try:
            reply = await nc.request("plugin.inbound.pricing", b'"soup"', timeout=10)
        finally:
            server.cancel()
        answered = json.loads(reply.data)
        assert answered["data"] == {"price": 4, "for": "soup"}
    finally:
        await nc.close()
        await transport.aclose()


async def test_bus_prefix_isolates_buses_on_one_server(nats_config: TransportConfig) -> None:
    isolated = nats_config.model_copy(
        update={"options": {**nats_config.options, "bus_prefix": nats_config.namespace}}
    )
    plain_transport = await connect(nats_config)
    isolated_transport = await connect(isolated)
    nc = await nats.connect(nats_config.url)
    try:
        mine = await isolated_transport.event_bus().subscribe("agent.events.>")
        raw = await nc.subscribe(f"{nats_config.namespace}.agent.events.>")
        await nc.flush()
        await nc.flush()  # one flush can overtake the SUB (see NatsContext.round_trip)
        await plain_transport.event_bus().publish("agent.events.kitchen", "unprefixed")
        await isolated_transport.event_bus().publish("agent.events.kitchen", "prefixed")
        got = await mine.next(timeout=10)
        assert got is not None and (got.subject, got.data) == ("agent.events.kitchen", "prefixed")
        # The unprefixed one was published first: had it crossed, it would
        # have arrived first.
        assert await mine.next(timeout=0.5) is None
        wire = await raw.next_msg(timeout=10)
        assert wire.subject == f"{nats_config.namespace}.agent.events.kitchen"
        await mine.aclose()
    finally:
        await nc.close()
        await isolated_transport.aclose()
        await plain_transport.aclose()


async def test_a_subscription_sees_the_first_event_published_after_it_returns(
    nats_config: TransportConfig,
) -> None:
    """``subscribe`` returns once the server has the subscription: an event
    another connection publishes right after it is never missed. With a
    single nats-py flush the PING went out ahead of the buffered SUB, and
    under load 5 of 300 such events were missed; the race is in the server's
    handling of two connections, so an idle machine rarely shows it."""
    transport = await connect(nats_config)
    other = await nats.connect(nats_config.url)
    bus = transport.event_bus()
    try:
        for n in range(200):
            subject = f"race.s{n}"
            subscription = await bus.subscribe(subject)
            await other.publish(subject, json.dumps(n).encode())
            await other.flush()
            event = await subscription.next(timeout=5)
            await subscription.aclose()
            assert event is not None and event.data == n, f"event {n} of 200 was missed"
    finally:
        await other.close()
        await transport.aclose()


async def test_a_claim_deletes_once_and_survives_a_stale_hint(nats_config: TransportConfig) -> None:
    """``claim`` deletes conditionally on the value's revision: a second
    claim of the same value finds it gone; a hint older than the value
    (written again since) costs a read, not the claim."""
    transport = await connect(nats_config)
    try:
        registry = transport.delivery_registry("claims")  # kept: its log closes with it
        log_ = registry._log
        kv = await log_._bucket()
        await log_.put("c.x", b"1")
        stale = str((await kv.get("c.x")).revision).encode()
        await log_.put("c.x", b"2")  # written again: the hint is stale
        await log_.put("p.x", b"p")
        assert await log_.claim("c.x", also=("p.x",), position=stale) is True
        assert await log_.get_many(["c.x", "p.x"]) == [None, None]
        await log_.put("c.y", b"1")
        current = str((await kv.get("c.y")).revision).encode()
        assert await log_.claim("c.y", position=current) is True
        assert await log_.claim("c.y", position=current) is False  # claimed already
        assert await log_.claim("c.y") is False
        assert await log_.claim("c.never") is False
    finally:
        await transport.aclose()
