"""The whole conformance suite on ``pulsar://`` against pulsar-lite (or the
broker named by ``PULSAR_SERVICE_URL``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from transport.testing import (
    BrokerOutageConformance,
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
    README's limits; all came back within 60 s when measured). Losing one
    still fails strictly: the scenarios wait for every request up to their
    budget (the 240 s timeout here, less teardown). Only the
    "redelivered within the usual time" checks xfail, with the reason below,
    when pulsar-lite is late; against Apache Pulsar they are plain checks.

    On pulsar-lite the class runs on a broker of its own, started for it, so
    what it proves does not depend on what earlier tests left in the session
    broker. It does not cure pulsar-lite's known loss: a worker killed with
    unread bytes in its socket (a TCP reset) keeps its requests until the
    broker restarts (pinned in test_pulsar_lite_gaps.py); such a kill still
    fails these scenarios."""

    pytestmark = [pytest.mark.timeout(240)]

    @pytest.fixture(scope="class")
    @classmethod
    def crash_broker(
        cls, tmp_path_factory: pytest.TempPathFactory, pulsar_broker: PulsarLiteBroker | None
    ) -> Iterator[PulsarLiteBroker | None]:
        if pulsar_broker is None:  # an external or containerised broker
            yield None
            return
        broker = PulsarLiteBroker(tmp_path_factory.mktemp("pulsar-lite-crash"))
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()

    @pytest.fixture
    def transport_harness(
        self, pulsar_url: str, crash_broker: PulsarLiteBroker | None
    ) -> PulsarHarness:
        url = crash_broker.url if crash_broker is not None else pulsar_url
        harness = PulsarHarness(make_config(url), crash_broker)
        if crash_broker is not None:
            harness.slow_crash_redelivery = (
                "pulsar-lite 0.2 redelivers a SIGKILLed consumer's unacknowledged messages "
                "late (a raw pulsar-client survivor still missed 814 of 2,000 messages 10 s "
                "after 8 kills; all came back within 60 s)"
            )
        return harness


class TestPulsarEventBus(EventBusConformance): ...


class TestPulsarEventLog(EventLogConformance): ...


class TestPulsarProvisioning(ProvisioningConformance): ...


class TestPulsarBrokerRestart(BrokerRestartConformance): ...


class TestPulsarBrokerOutage(BrokerOutageConformance): ...


class TestPulsarCleanRestart(CleanRestartConformance): ...


class TestPulsarUnreachable(UnreachableBrokerConformance):
    transport_class = PulsarTransport
    url_template = "pulsar://127.0.0.1:{port}"
    timeout_option = "operation_timeout_seconds"


class TestPulsarNamespaces(NamespaceConformance): ...


class TestPulsarForgottenClose(ForgottenCloseConformance): ...


class TestPulsarForeignMessages(ForeignMessageConformance): ...


class TestPulsarDefaultConfiguration(DefaultConfigurationConformance):
    """Default settings and a user's poll(timeout=5) loop (no test tuning)."""
