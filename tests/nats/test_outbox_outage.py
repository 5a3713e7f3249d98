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

from transport import Ensemble, Network, Outbox, TaskContext, TransportConfig, connect
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
    config = TransportConfig(
        url=own_server.url,
        namespace=namespace,
        options={"request_timeout": 1.0, "reconnect_time_wait": 0.1},
    )
    transport = await connect(config)
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
