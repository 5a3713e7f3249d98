"""The whole conformance suite on ``pulsar://`` against pulsar-lite (or the
broker named by ``PULSAR_SERVICE_URL``)."""

from __future__ import annotations

import pytest

from transport.testing import (
    BrokerRestartConformance,
    CapabilityRegistryConformance,
    CleanRestartConformance,
    CrashConformance,
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
from transport_pulsar import PulsarTransport

from .conftest import PulsarHarness, PulsarLiteBroker, make_config


class TestPulsarQueue(RequestQueueConformance): ...


class TestPulsarPriority(PriorityQueueConformance): ...


class TestPulsarPriorityAsQueue(PriorityAsRequestQueueConformance): ...


class TestPulsarDeliveryRegistry(DeliveryRegistryConformance): ...


class TestPulsarCapabilityRegistry(CapabilityRegistryConformance): ...


class TestPulsarCrash(CrashConformance):
    """pulsar-lite hands a SIGKILLed consumer's unacknowledged messages to
    the other consumers only after a delay (up to tens of seconds: see the
    README's limits), so the crash scenarios get three times the usual time
    here; against Apache Pulsar they finish as fast as elsewhere."""

    pytestmark = [
        pytest.mark.timeout(480),
        pytest.mark.xfail(
            strict=False,
            reason=(
                "pulsar-lite 0.2 redelivers a SIGKILLed consumer's unacknowledged messages "
                "late (a raw pulsar-client survivor still missed 814 of 2,000 messages 10 s "
                "after 8 kills; all came back within 60 s) and, under load, not always "
                "within these scenarios' time: they fail intermittently on this broker"
            ),
        ),
    ]

    @pytest.fixture
    def transport_harness(
        self, pulsar_url: str, pulsar_broker: PulsarLiteBroker | None
    ) -> PulsarHarness:
        harness = PulsarHarness(make_config(pulsar_url), pulsar_broker)
        harness.timeout_scale = 3.0
        return harness


class TestPulsarEventBus(EventBusConformance): ...


class TestPulsarEventLog(EventLogConformance): ...


class TestPulsarProvisioning(ProvisioningConformance): ...


class TestPulsarBrokerRestart(BrokerRestartConformance): ...


class TestPulsarCleanRestart(CleanRestartConformance): ...


class TestPulsarUnreachable(UnreachableBrokerConformance):
    transport_class = PulsarTransport
    url_template = "pulsar://127.0.0.1:{port}"
    timeout_option = "operation_timeout_seconds"


class TestPulsarNamespaces(NamespaceConformance): ...


class TestPulsarForgottenClose(ForgottenCloseConformance): ...


class TestPulsarForeignMessages(ForeignMessageConformance): ...
