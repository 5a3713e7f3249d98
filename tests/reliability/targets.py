"""Backends the reliability suite runs against, each started on demand."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from transport import TransportConfig
from transport.testing.harness import BackendHarness
from transport_inprocess import SqliteTransport


@contextlib.asynccontextmanager
async def sqlite_target() -> AsyncIterator[BackendHarness]:
    with tempfile.TemporaryDirectory(prefix="reliability-sqlite-") as tmp:
        config = TransportConfig(
            url=f"sqlite:///{Path(tmp) / 'reliability.db'}", options={"poll_interval": 0.02}
        )
        harness = BackendHarness(config, SqliteTransport.capabilities)
        harness.lease_seconds = 1.0
        harness.embedded = True
        yield harness


@contextlib.asynccontextmanager
async def nats_target() -> AsyncIterator[BackendHarness]:
    from tests.nats.conftest import NatsHarness
    from transport.testing.brokers import NatsServer

    with tempfile.TemporaryDirectory(prefix="reliability-nats-") as tmp:
        server = NatsServer(Path(tmp))
        server.start()
        try:
            config = TransportConfig(
                url=server.url,
                namespace=f"rel{uuid.uuid4().hex[:8]}",
                options={"pull_expires": 2.0, "request_timeout": 3.0, "reconnect_time_wait": 0.1},
            )
            yield NatsHarness(config, server)
        finally:
            server.stop()


@contextlib.asynccontextmanager
async def pulsar_target() -> AsyncIterator[BackendHarness]:
    from tests.pulsar.conftest import PulsarHarness, make_config
    from transport.testing.brokers import PulsarLiteBroker

    with tempfile.TemporaryDirectory(prefix="reliability-pulsar-") as tmp:
        broker = PulsarLiteBroker(Path(tmp))
        broker.start()
        try:
            yield PulsarHarness(make_config(broker.url), broker)
        finally:
            broker.stop()


@contextlib.asynccontextmanager
async def kafka_target() -> AsyncIterator[BackendHarness]:
    import os

    from tests.kafka.conftest import KafkaHarness, kafka_config
    from transport.testing.brokers import TansuBroker
    from transport_kafka import KafkaOptions, KafkaTransport

    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None if external else TansuBroker()
    if broker is not None:
        broker.start()
    try:
        bootstrap = external or (broker.bootstrap if broker else "")
        # The library's default partition count (the tests' TEST_OPTIONS pin
        # one partition for the strict-FIFO scenarios): what users run.
        partitions = KafkaOptions().partitions
        config = kafka_config(
            bootstrap, f"rel{uuid.uuid4().hex[:8]}", options={"partitions": partitions}
        )
        yield KafkaHarness(config, KafkaTransport.capabilities_for(partitions), broker)
    finally:
        if broker is not None:
            broker.kill()


@contextlib.asynccontextmanager
async def redis_target() -> AsyncIterator[BackendHarness]:
    from tests.redis.conftest import RedisHarness
    from transport.testing.brokers import RedisServer

    with tempfile.TemporaryDirectory(prefix="reliability-redis-") as tmp:
        server = RedisServer(Path(tmp))  # append-only file, appendfsync always
        server.start()
        try:
            config = TransportConfig(
                url=server.url,
                namespace=f"rel{uuid.uuid4().hex[:8]}",
                options={"request_timeout": 3.0, "connect_timeout": 2.0, "claim_interval": 0.1},
            )
            yield RedisHarness(config, server)
        finally:
            server.stop()


@contextlib.asynccontextmanager
async def nats_cluster_target() -> AsyncIterator[Any]:
    """Three nats-server processes forming one JetStream cluster (its own
    scenarios: ``tests.reliability._cluster``)."""
    from transport.testing.brokers import NatsCluster

    with tempfile.TemporaryDirectory(prefix="reliability-nats-cluster-") as tmp:
        cluster = NatsCluster(Path(tmp))
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()


TARGETS: dict[str, Callable[[], Any]] = {
    "sqlite": sqlite_target,
    "nats": nats_target,
    "pulsar": pulsar_target,
    "kafka": kafka_target,
    "redis": redis_target,
    "nats-cluster": nats_cluster_target,
}
