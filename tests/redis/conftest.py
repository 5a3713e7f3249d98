"""Fixtures for the Redis backend: a real redis-server (Debian's package,
``apt-get install redis-server``) on a free loopback port with the
append-only file fsynced on every write, or an external server named by
``REDIS_URL`` (then broker restarts are not tested)."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from transport import Transport, TransportConfig
from transport.testing import BackendHarness
from transport.testing.brokers import RedisServer
from transport_redis import RedisTransport
from transport_redis._client import keys


class RedisHarness(BackendHarness):
    lease_seconds = 1.0
    timeout_scale = 1.0

    def __init__(self, config: TransportConfig, server: RedisServer | None) -> None:
        super().__init__(config, RedisTransport.capabilities)
        self.server = server
        # An external REDIS_URL server can be neither stopped nor restarted.
        self.can_restart_broker = self.can_stop_broker = server is not None

    async def inject_raw(self, transport: Transport, queue_name: str, data: bytes) -> None:
        # Written as another program would: one XADD with the body field.
        assert isinstance(transport, RedisTransport)
        stream = keys.queue(transport.config.namespace, queue_name)
        await transport.client.redis.xadd(stream, {"body": data})

    async def restart_broker(self) -> None:
        assert self.server is not None, "an external REDIS_URL server cannot be restarted"
        await asyncio.to_thread(self.server.restart)

    async def stop_broker(self) -> None:
        assert self.server is not None, "an external REDIS_URL server cannot be stopped"
        await asyncio.to_thread(self.server.kill)

    async def start_broker(self) -> None:
        assert self.server is not None
        await asyncio.to_thread(self.server.start)


def _have_redis() -> bool:
    return bool(os.environ.get("REDIS_URL")) or shutil.which("redis-server") is not None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | None]:
    if os.environ.get("REDIS_URL"):
        yield None
        return
    if not _have_redis():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer | None) -> str:
    return redis_server.url if redis_server is not None else os.environ["REDIS_URL"]


@pytest.fixture
def namespace() -> str:
    """Each test gets its own namespace: keys never collide."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def redis_config(redis_url: str, namespace: str) -> TransportConfig:
    return TransportConfig(
        url=redis_url,
        namespace=namespace,
        options={"request_timeout": 3.0, "connect_timeout": 2.0, "claim_interval": 0.1},
    )


@pytest.fixture
def transport_harness(
    redis_config: TransportConfig, redis_server: RedisServer | None
) -> RedisHarness:
    return RedisHarness(redis_config, redis_server)


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    return tmp_path
