"""The whole conformance suite on ``nats://`` (a real nats-server)."""

from __future__ import annotations

import pytest

from transport import TransportConfig
from transport.testing import (
    BrokerRestartConformance,
    CapabilityRegistryConformance,
    CrashConformance,
    DefaultConfigurationConformance,
    DeliveryRegistryConformance,
    EventBusConformance,
    EventLogConformance,
    PriorityAsRequestQueueConformance,
    PriorityQueueConformance,
    RequestQueueConformance,
)


class TestNatsQueue(RequestQueueConformance): ...


class TestNatsPriority(PriorityQueueConformance): ...


class TestNatsPriorityAsQueue(PriorityAsRequestQueueConformance): ...


class TestNatsDeliveryRegistry(DeliveryRegistryConformance): ...


class TestNatsCapabilityRegistry(CapabilityRegistryConformance): ...


class TestNatsCrash(CrashConformance): ...


class TestNatsEventBus(EventBusConformance): ...


class TestNatsEventLog(EventLogConformance): ...


def _with_prefetch(config: TransportConfig, prefetch: int) -> TransportConfig:
    return config.model_copy(update={"options": {**config.options, "prefetch": prefetch}})


class TestNatsQueuePrefetch(RequestQueueConformance):
    """The queue contract again with a prefetch buffer (leases of buffered
    requests kept alive, handed back on close)."""

    @pytest.fixture
    def nats_config(self, nats_config: TransportConfig) -> TransportConfig:
        return _with_prefetch(nats_config, 8)


class TestNatsPriorityPrefetch(PriorityQueueConformance):
    @pytest.fixture
    def nats_config(self, nats_config: TransportConfig) -> TransportConfig:
        return _with_prefetch(nats_config, 8)


class TestNatsBrokerRestart(BrokerRestartConformance): ...


class TestNatsDefaultConfiguration(DefaultConfigurationConformance):
    """Default settings and a user's poll(timeout=5) loop (no test tuning)."""
