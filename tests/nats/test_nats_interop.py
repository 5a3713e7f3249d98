"""Raw nats-py (no ``transport_nats``) on what docs/wire.md names.

JetStream: a request published to ``NS.q.Q`` in stream ``NS__Q`` (headers
``Nats-Msg-Id`` and ``Nats-Expected-Stream``) is answered by an ``Ensemble``
on ``nats://`` once registered (a ``pending`` ``DeliveryRecord`` put at key
``p.<id>`` of bucket ``NS__delivery__R``); a KV watch of ``c.<id>`` sees the
completed ``DeliveryRecord`` and a KV get of ``NS__capability__capabilities`` the
ensemble's ``Capability``.

Bus: core NATS publish and subscribe in both directions with
``transport.event_bus()``, and request/reply both ways (a raw ``nc.request``
answered by ``bus.serve``, a ``bus.request`` answered by a raw responder).

A subscription is known to the server only after a round trip that follows
its SUB: nats-py 2.16's ``flush()`` writes its PING straight to the socket
while the SUB still waits in the client's pending buffer for the flusher
task, so the PONG can come back before the server has the SUB, and a message
another connection publishes in that gap is not delivered (measured: 13 of
300 raw subscribe+flush, then publish from another connection; 5 of 300
``bus.subscribe`` then a foreign publish, before the library waited for a
second round trip). Raw subscribers here synchronise on a second flush
(:func:`_registered`); the bus's own ``subscribe`` and ``serve`` are trusted
to return only once the server has the subscription.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from tests._interop import (
    ENSEMBLE,
    PLAN,
    REPLY_TO,
    TASK,
    check_capability,
    check_completed,
    foreign_payload,
    foreign_registration,
    foreign_request,
    foreign_request_id,
    kitchen,
    registration_key,
    response_key,
    schema_errors,
)
from transport import Event, TransportConfig, connect

pytestmark = pytest.mark.broker

WAIT_S = 30.0


def _wire_subject(config: TransportConfig, subject: str) -> str:
    """The NATS subject a bus subject travels on (docs/wire.md, "bus subject"):
    the subject as written (no ``bus_prefix`` is set here)."""
    assert not config.options.get("bus_prefix")
    return subject


async def _registered(nc: Client) -> None:
    """Return once the server has every SUB ``nc`` sent so far: the first
    flush's round trip lets the flusher task write the pending SUB, the
    second PING goes out after it (see the module docstring)."""
    await nc.flush()
    await nc.flush()


@pytest.fixture
async def raw(nats_config: TransportConfig) -> AsyncIterator[Client]:
    """A plain nats-py connection, nothing of this library."""
    nc = await nats.connect(nats_config.url)
    try:
        yield nc
    finally:
        await nc.close()


def _is_completed(value: bytes | None) -> bool:
    """A KV value that is a completed record (a delete has no value)."""
    return bool(value) and json.loads(value or b"")["state"] == "completed"


def _foreign_event(subject: str, data: Any) -> tuple[str, bytes]:
    """An ``Event`` body as another program writes it: the fields it cares
    about, by hand."""
    event_id = uuid.uuid4().hex
    body = {"id": event_id, "subject": subject, "data": data, "headers": {"origin": "foreign"}}
    return event_id, json.dumps(body).encode()


async def test_raw_jetstream_request_is_answered_by_an_ensemble(
    nats_config: TransportConfig, raw: Client
) -> None:
    ns = nats_config.namespace
    request_id = foreign_request_id()
    payload = foreign_payload("nats-py")
    js = raw.jetstream()
    async with await connect(nats_config) as transport:
        await transport.provision(PLAN)
        registry = await js.key_value(f"{ns}__delivery__{REPLY_TO}")
        # Registered before it is sent: a request nobody awaits is not run.
        await registry.put(registration_key(request_id), foreign_registration(request_id))
        watcher = await registry.watch(response_key(request_id))
        try:
            async with kitchen(transport).serving():
                ack = await js.publish(
                    f"{ns}.q.{ENSEMBLE}",
                    foreign_request(request_id, payload),
                    stream=f"{ns}__{ENSEMBLE}",  # sent as Nats-Expected-Stream
                    headers={"Nats-Msg-Id": request_id},
                )
                assert (ack.stream, ack.duplicate) == (f"{ns}__{ENSEMBLE}", None)

                async with asyncio.timeout(WAIT_S):
                    while True:
                        entry = await watcher.updates(timeout=WAIT_S)
                        if entry is not None and _is_completed(entry.value):
                            break
                assert entry.key == response_key(request_id)
                check_completed(entry.value, request_id, payload)
                # What a plain get returns is the same record.
                got = await registry.get(response_key(request_id))
                assert got.value == entry.value

                capabilities = await js.key_value(f"{ns}__capability__capabilities")
                advertised = await capabilities.get(f"{ENSEMBLE}.{TASK}")
                assert advertised.value is not None
                check_capability(advertised.value)
        finally:
            await watcher.stop()


async def test_raw_publish_reaches_a_bus_subscriber(
    nats_config: TransportConfig, raw: Client
) -> None:
    async with await connect(nats_config) as transport:
        bus = transport.event_bus()
        async with await bus.subscribe("agent.events.*") as subscription:
            event_id, body = _foreign_event("agent.events.kitchen", {"n": 1, "from": "raw"})
            await raw.publish(_wire_subject(nats_config, "agent.events.kitchen"), body)
            await raw.flush()
            event = await subscription.next(timeout=WAIT_S)
    assert event is not None, "the raw publish did not reach the bus subscriber"
    assert (event.id, event.subject, event.data) == (
        event_id,
        "agent.events.kitchen",
        {"n": 1, "from": "raw"},
    )
    assert (event.headers, event.reply_to) == ({"origin": "foreign"}, None)


async def test_bus_publish_reaches_a_raw_subscriber(
    nats_config: TransportConfig, raw: Client
) -> None:
    received: asyncio.Queue[Msg] = asyncio.Queue()
    sub = await raw.subscribe(_wire_subject(nats_config, "agent.events.*"), cb=received.put)
    await _registered(raw)  # the interest is on the server before the bus publishes
    try:
        async with await connect(nats_config) as transport:
            await transport.event_bus().publish(
                "agent.events.kitchen", {"n": 2}, headers={"origin": "bus"}
            )
            async with asyncio.timeout(WAIT_S):
                msg = await received.get()
    finally:
        await sub.unsubscribe()
    assert msg.subject == _wire_subject(nats_config, "agent.events.kitchen")
    assert schema_errors("Event", msg.data) == []
    event = json.loads(msg.data)
    assert (event["subject"], event["data"], event["headers"], event["reply_to"]) == (
        "agent.events.kitchen",
        {"n": 2},
        {"origin": "bus"},
        None,
    )


async def test_raw_request_is_answered_by_bus_serve(
    nats_config: TransportConfig, raw: Client
) -> None:
    async def add(event: Event) -> dict[str, Any]:
        return {"sum": sum(event.data["terms"]), "asked": event.id}

    async with await connect(nats_config) as transport:
        bus = transport.event_bus()
        server = await bus.serve("tools.add", add)
        try:
            event_id, body = _foreign_event("tools.add", {"terms": [1, 2, 39]})
            reply = await raw.request(_wire_subject(nats_config, "tools.add"), body, timeout=WAIT_S)
        finally:
            server.cancel()
    assert schema_errors("Event", reply.data) == []
    answer = json.loads(reply.data)
    assert (answer["subject"], answer["data"]) == ("tools.add", {"sum": 42, "asked": event_id})


async def test_bus_request_is_answered_by_a_raw_responder(
    nats_config: TransportConfig, raw: Client
) -> None:
    asked: list[dict[str, Any]] = []

    async def respond(msg: Msg) -> None:
        request = json.loads(msg.data)
        asked.append(request)
        _, body = _foreign_event("tools.double", {"doubled": request["data"]["x"] * 2})
        await msg.respond(body)

    sub = await raw.subscribe(_wire_subject(nats_config, "tools.double"), cb=respond)
    await _registered(raw)
    try:
        async with await connect(nats_config) as transport:
            reply = await transport.event_bus().request("tools.double", {"x": 21}, timeout=WAIT_S)
    finally:
        await sub.unsubscribe()
    assert (reply.subject, reply.data, reply.headers) == (
        "tools.double",
        {"doubled": 42},
        {"origin": "foreign"},
    )
    (request,) = asked
    assert schema_errors("Event", json.dumps(request)) == []
    assert (request["subject"], request["reply_to"]) == ("tools.double", None)
