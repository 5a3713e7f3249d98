"""The whole conformance suite on ``kafka://`` against Tansu (or the broker
named by ``KAFKA_BOOTSTRAP_SERVERS``). Fixtures: tests/kafka/conftest.py."""

from __future__ import annotations

import pytest

from tests.kafka.conftest import KafkaHarness, kafka_config
from transport.testing import (
    BrokerOutageConformance,
    BrokerRestartConformance,
    CapabilityRegistryConformance,
    CleanRestartConformance,
    CrashConformance,
    DefaultConfigurationConformance,
    DeliveryRegistryConformance,
    EventLogConformance,
    ForeignMessageConformance,
    ForgottenCloseConformance,
    NamespaceConformance,
    PriorityAsRequestQueueConformance,
    PriorityQueueConformance,
    ProvisioningConformance,
    RequestQueueConformance,
    UnreachableBrokerConformance,
)
from transport.testing.brokers import TansuBroker
from transport_kafka import KafkaTransport

pytestmark = pytest.mark.broker


class TestKafkaQueue(RequestQueueConformance): ...


class TestKafkaPriority(PriorityQueueConformance): ...


class TestKafkaPriorityAsQueue(PriorityAsRequestQueueConformance): ...


class TestKafkaDeliveryRegistry(DeliveryRegistryConformance): ...


class TestKafkaCapabilityRegistry(CapabilityRegistryConformance): ...


class TestKafkaCrash(CrashConformance):
    # A SIGKILLed worker's partition moves after the group's session timeout:
    # the repeated-kill scenario needs about a minute on a loaded machine.
    pytestmark = [pytest.mark.timeout(240)]


class TestKafkaEventLog(EventLogConformance): ...


class TestKafkaProvisioning(ProvisioningConformance): ...


class TestKafkaBrokerRestart(BrokerRestartConformance): ...


class TestKafkaBrokerOutage(BrokerOutageConformance): ...


class TestKafkaCleanRestart(CleanRestartConformance): ...


class TestKafkaUnreachable(UnreachableBrokerConformance):
    transport_class = KafkaTransport
    url_template = "kafka://127.0.0.1:{port}"
    timeout_option = "operation_timeout_s"


class TestKafkaNamespaces(NamespaceConformance): ...


class TestKafkaForgottenClose(ForgottenCloseConformance): ...


class TestKafkaForeignMessages(ForeignMessageConformance): ...


class TestKafkaDefaultConfiguration(DefaultConfigurationConformance):
    """Default settings and a user's poll(timeout=5) loop (no test tuning)."""


# -- the partitioned mode (the default: ``partitions=4``) -------------------------
# Several worker processes share a queue only when its request topic has
# several partitions; the classes above run the strict-FIFO mode (one
# partition, TEST_OPTIONS), these the default (``ordered`` is then false: the
# FIFO checks are skipped, order holds per ordering key).
PARTITIONS = 4


@pytest.fixture
def _partitioned(
    kafka_bootstrap: str, kafka_namespace: str, tansu_broker: TansuBroker | None
) -> KafkaHarness:
    config = kafka_config(kafka_bootstrap, kafka_namespace, options={"partitions": PARTITIONS})
    capabilities = KafkaTransport.capabilities_for(PARTITIONS)
    return KafkaHarness(config, capabilities, tansu_broker)


class _Partitioned:
    @pytest.fixture
    def transport_harness(self, _partitioned: KafkaHarness) -> KafkaHarness:
        return _partitioned


class TestKafkaPartitionedQueue(_Partitioned, RequestQueueConformance): ...


class TestKafkaPartitionedPriority(_Partitioned, PriorityQueueConformance): ...


class TestKafkaPartitionedCrash(_Partitioned, CrashConformance):
    pytestmark = [pytest.mark.timeout(240)]


class TestKafkaPartitionedCleanRestart(_Partitioned, CleanRestartConformance): ...
