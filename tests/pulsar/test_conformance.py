"""The whole conformance suite on ``pulsar://`` against pulsar-lite (or the
broker named by ``PULSAR_SERVICE_URL``)."""

from __future__ import annotations

from transport.testing import (
    CapabilityRegistryConformance,
    CrashConformance,
    DeliveryRegistryConformance,
    EventBusConformance,
    EventLogConformance,
    PriorityAsRequestQueueConformance,
    PriorityQueueConformance,
    RequestQueueConformance,
)


class TestPulsarQueue(RequestQueueConformance): ...


class TestPulsarPriority(PriorityQueueConformance): ...


class TestPulsarPriorityAsQueue(PriorityAsRequestQueueConformance): ...


class TestPulsarDeliveryRegistry(DeliveryRegistryConformance): ...


class TestPulsarCapabilityRegistry(CapabilityRegistryConformance): ...


class TestPulsarCrash(CrashConformance): ...


class TestPulsarEventBus(EventBusConformance): ...


class TestPulsarEventLog(EventLogConformance): ...
