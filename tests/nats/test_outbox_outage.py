"""``Network.send`` with an outbox through a real broker outage: the
nats-server process is killed (SIGKILL) while a caller sends, and started
again (same port and store) later. Nothing is simulated: capability lookup,
inbox registration and the enqueue itself fail because the server is gone."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tenacity import wait_fixed

from transport import (
    Ensemble,
    Network,
    Outbox,
    TaskContext,
    Transport,
    TransportConfig,
    connect,
)
from transport.errors import TransientTransportError
from transport.testing._util import Budget
from transport.testing.brokers import NatsServer

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    if os.environ.get("NATS_URL"):
        pytest.skip("an external NATS_URL server cannot be killed by the test")
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_network_with_an_outbox_sends_and_collects_through_a_killed_broker(
    own_server: NatsServer, tmp_path: Path, namespace: str, budget: Budget
) -> None:
    transport = await _quick_reconnecting(own_server, namespace)
    outbox = Outbox(transport, tmp_path / "outbox.db", retry_wait=wait_fixed(0.2))
    try:
        network = Network(transport, caller="desk", outbox=outbox, register_timeout=0.5)
        await asyncio.to_thread(own_server.kill)
        try:
            async with asyncio.timeout(10):
                pending = await network.send("kitchen", "cook", {"dish": "soup"})
        except TimeoutError:
            pytest.fail("Network.send with an outbox blocked for 10 s while the broker was down")
        assert await outbox.depth() == 1, (
            "the request should wait in the outbox while the broker is down"
        )
        await asyncio.to_thread(own_server.start)
        await outbox.flush(timeout=budget.left(30))
        assert await outbox.depth() == 0
        kitchen = Ensemble("kitchen", transport=transport, concurrency=1, advertise=False)

        @kitchen.task("cook")
        async def cook(ctx: TaskContext) -> str:
            return str(ctx.payload["dish"])

        async with kitchen:
            response = await pending.result(timeout=budget.left(30))
        assert await outbox.dead_letters() == []
        assert response.status == "completed"
        assert response.result == "soup"
    finally:
        await outbox.aclose()
        await transport.aclose()


async def _quick_reconnecting(server: NatsServer, namespace: str) -> Transport:
    """A client that notices an outage within a second and reconnects fast."""
    return await connect(
        TransportConfig(
            url=server.url,
            namespace=namespace,
            options={"request_timeout": 1.0, "reconnect_time_wait": 0.1},
        )
    )


async def test_event_appends_and_bus_publishes_wait_in_the_outbox_through_a_killed_broker(
    own_server: NatsServer, tmp_path: Path, namespace: str, budget: Budget
) -> None:
    """Appends (and, opted into, publishes) stored while nats-server is dead
    reach the log and the bus once it is back, in the order stored."""
    transport = await _quick_reconnecting(own_server, namespace)
    outbox = Outbox(transport, tmp_path / "outbox.db", retry_wait=wait_fixed(0.2))
    log = transport.event_log()
    await log.append("audit", {"n": 0})  # the stream exists before the outage
    bus = transport.event_bus()
    subscription = await bus.subscribe("kitchen.orders.>")
    seen: list[object] = []

    async def collect() -> None:
        async for event in subscription:
            seen.append(event.data)
            if len(seen) == 3:
                return

    collector = asyncio.create_task(collect())
    try:
        await asyncio.to_thread(own_server.kill)
        async with asyncio.timeout(10):  # stored locally: never waits for the broker
            for n in (1, 2, 3):
                await outbox.append("audit", {"n": n}, key=f"k{n}", headers={"x-n": str(n)})
                await outbox.publish(f"kitchen.orders.o{n}", n)
        assert await outbox.depth() == 6
        await asyncio.to_thread(own_server.start)
        await outbox.flush(timeout=budget.left(30))
        async with asyncio.timeout(budget.left(30)):
            await collector
        assert seen == [1, 2, 3]
        reader = await log.read("audit", "earliest")
        events = []
        async with asyncio.timeout(budget.left(30)):
            while len(events) < 4:
                events.append(await anext(reader))
        await reader.aclose()
        assert [e.data for e in events] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}]
        assert [e.key for e in events[1:]] == ["k1", "k2", "k3"]
        assert [e.headers.get("x-n") for e in events[1:]] == ["1", "2", "3"]
        assert await outbox.dead_events() == []
    finally:
        collector.cancel()
        await subscription.aclose()
        await outbox.aclose()
        await transport.aclose()


async def test_bus_publishes_are_held_while_the_client_reconnects(
    own_server: NatsServer, tmp_path: Path, namespace: str, budget: Budget
) -> None:
    """nats-py buffers a publish while it reconnects and never raises: the
    outbox took three publishes as sent during an outage ("flushed", depth 0)
    and none reached the subscriber. A publish now fails while the client is
    not connected, so the outbox holds the line until the server is back."""
    transport = await _quick_reconnecting(own_server, namespace)
    outbox = Outbox(transport, tmp_path / "outbox.db", retry_wait=wait_fixed(0.2))
    bus = transport.event_bus()
    subscription = await bus.subscribe("kitchen.orders.>")
    try:
        await asyncio.to_thread(own_server.kill)
        for n in (1, 2, 3):
            await outbox.publish(f"kitchen.orders.o{n}", n)
        async with asyncio.timeout(budget.left(20)):
            while outbox.outage_failures < 2:  # noqa: ASYNC110 - tried, and held the line
                await asyncio.sleep(0.05)
        assert await outbox.depth() == 3
        with pytest.raises(TransientTransportError, match="not connected"):
            await bus.publish("kitchen.orders.direct", 0)
        await asyncio.to_thread(own_server.start)
        await outbox.flush(timeout=budget.left(30))
        seen = []
        async with asyncio.timeout(budget.left(30)):
            while len(seen) < 3:
                event = await anext(subscription)
                seen.append(event.data)
        assert seen == [1, 2, 3]
    finally:
        await subscription.aclose()
        await outbox.aclose()
        await transport.aclose()
