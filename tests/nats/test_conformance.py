"""The whole conformance suite on ``nats://`` (a real nats-server)."""

from __future__ import annotations

import pytest

from transport import TransportConfig
from transport.testing import (
    BrokerRestartConformance,
    CapabilityRegistryConformance,
    CleanRestartConformance,
    CrashConformance,
    DefaultConfigurationConformance,
    DeliveryRegistryConformance,
    EventBusConformance,
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
from transport_nats import NatsTransport


class TestNatsQueue(RequestQueueConformance): ...


class TestNatsPriority(PriorityQueueConformance): ...


class TestNatsPriorityAsQueue(PriorityAsRequestQueueConformance): ...


class TestNatsDeliveryRegistry(DeliveryRegistryConformance): ...


class TestNatsCapabilityRegistry(CapabilityRegistryConformance): ...


class TestNatsCrash(CrashConformance): ...


class TestNatsEventBus(EventBusConformance): ...


class TestNatsEventLog(EventLogConformance): ...


class TestNatsProvisioning(ProvisioningConformance): ...


def _with_prefetch(config: TransportConfig, prefetch: int) -> TransportConfig:
    return config.model_copy(update={"options": {**config.options, "prefetch": prefetch}})


class TestNatsQueuePrefetch(RequestQueueConformance):
    """The queue contract again with a prefetch buffer (leases of buffered
    requests kept alive, handed back on close)."""

    @pytest.fixture
    def nats_config(self, nats_config: TransportConfig) -> TransportConfig:
        return _with_prefetch(nats_config, 8)

    # Input checks that refuse before anything is sent or pulled: a prefetch
    # buffer changes none of them, and TestNatsQueue runs them.
    test_unsafe_queue_names_are_rejected = None
    test_oversize_payload_is_rejected_before_anything_is_stored = None
    test_non_json_payload_is_rejected = None
    test_negative_poll_timeout_is_rejected = None


class TestNatsPriorityPrefetch(PriorityQueueConformance):
    @pytest.fixture
    def nats_config(self, nats_config: TransportConfig) -> TransportConfig:
        return _with_prefetch(nats_config, 8)


class TestNatsBrokerRestart(BrokerRestartConformance): ...


class TestNatsCleanRestart(CleanRestartConformance): ...


class TestNatsCleanRestartPrefetch(CleanRestartConformance):
    """Clean restarts with a prefetch buffer: the buffered requests a closing
    handle gives back never handed out use no attempt."""

    @pytest.fixture
    def nats_config(self, nats_config: TransportConfig) -> TransportConfig:
        return _with_prefetch(nats_config, 8)


class TestNatsUnreachable(UnreachableBrokerConformance):
    transport_class = NatsTransport
    url_template = "nats://127.0.0.1:{port}"
    timeout_option = "connect_timeout"


class TestNatsNamespaces(NamespaceConformance): ...


class TestNatsForgottenClose(ForgottenCloseConformance): ...


class TestNatsForeignMessages(ForeignMessageConformance): ...


class TestNatsDefaultConfiguration(DefaultConfigurationConformance):
    """Default settings and a user's poll(timeout=5) loop (no test tuning)."""
