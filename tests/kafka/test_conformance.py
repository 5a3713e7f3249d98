"""The whole conformance suite on ``kafka://`` against Tansu (or the broker
named by ``KAFKA_BOOTSTRAP_SERVERS``). Fixtures: tests/kafka/conftest.py."""

from __future__ import annotations

import pytest

from transport.testing import (
    BrokerRestartConformance,
    CapabilityRegistryConformance,
    CrashConformance,
    DeliveryRegistryConformance,
    EventLogConformance,
    PriorityAsRequestQueueConformance,
    PriorityQueueConformance,
    ProvisioningConformance,
    RequestQueueConformance,
)

pytestmark = pytest.mark.broker


class TestKafkaQueue(RequestQueueConformance): ...


class TestKafkaPriority(PriorityQueueConformance): ...


class TestKafkaPriorityAsQueue(PriorityAsRequestQueueConformance): ...


class TestKafkaDeliveryRegistry(DeliveryRegistryConformance): ...


class TestKafkaCapabilityRegistry(CapabilityRegistryConformance): ...


class TestKafkaCrash(CrashConformance): ...


class TestKafkaEventLog(EventLogConformance): ...


class TestKafkaProvisioning(ProvisioningConformance): ...


class TestKafkaBrokerRestart(BrokerRestartConformance): ...
