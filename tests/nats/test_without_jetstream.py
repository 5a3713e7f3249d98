"""A nats-server started without ``-js`` (core NATS only): the event bus
works on it; request queues, registries and the event log are refused with
a ``ConfigurationError`` that names ``-js``, up front with ``require`` /
``verify`` or when they are opened."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from transport import ConfigurationError, connect
from transport.testing.brokers import NatsServer

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(Path(tmp_path_factory.mktemp("nats-plain")), jetstream=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_queues_registries_and_the_log_name_the_missing_js(plain_server: NatsServer) -> None:
    transport = await connect(plain_server.url, namespace=f"t{uuid.uuid4().hex[:10]}")
    try:
        opens = {
            "request_queue": lambda: transport.request_queue("orders"),
            "priority_queue": lambda: transport.priority_queue("orders", levels=2),
            "delivery_registry": lambda: transport.delivery_registry("inbox"),
            "capability_registry": transport.capability_registry,
            "event_log": transport.event_log,
        }
        for what, open_ in opens.items():
            with pytest.raises(ConfigurationError, match="-js") as info:
                open_()
            assert "JetStream" in str(info.value), what
        health = await transport.health()
        assert not health.ok
        assert "-js" in health.detail
    finally:
        await transport.aclose()


async def test_require_and_verify_refuse_a_server_without_jetstream(
    plain_server: NatsServer,
) -> None:
    with pytest.raises(ConfigurationError, match="-js"):
        await connect(plain_server.url, verify=True)
    with pytest.raises(ConfigurationError, match="-js"):
        await connect(plain_server.url, require=["persistent"])
    with pytest.raises(ConfigurationError, match="-js"):
        await connect(plain_server.url, require=["event_bus", "event_log"], verify=True)


async def test_the_event_bus_works_without_jetstream(plain_server: NatsServer) -> None:
    transport = await connect(plain_server.url, require=["event_bus"], verify=True)
    try:
        bus = transport.event_bus()
        subject = f"orders.{uuid.uuid4().hex[:8]}"
        async with await bus.subscribe("orders.*") as subscription:
            await bus.publish(subject, {"dish": "soup"})
            event = await subscription.next(timeout=10)
        assert event is not None, "the published event did not arrive within 10 s"
        assert event.subject == subject
        assert event.data == {"dish": "soup"}
    finally:
        await transport.aclose()


async def test_verify_passes_on_a_server_with_jetstream(nats_url: str) -> None:
    transport = await connect(nats_url, verify=True)
    try:
        assert (await transport.health()).ok
    finally:
        await transport.aclose()
