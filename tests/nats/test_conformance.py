"""The whole conformance suite on ``nats://`` (a real nats-server)."""

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


class TestNatsQueue(RequestQueueConformance): ...


class TestNatsPriority(PriorityQueueConformance): ...


class TestNatsPriorityAsQueue(PriorityAsRequestQueueConformance): ...


class TestNatsDeliveryRegistry(DeliveryRegistryConformance): ...


class TestNatsCapabilityRegistry(CapabilityRegistryConformance): ...


class TestNatsCrash(CrashConformance): ...


class TestNatsEventBus(EventBusConformance): ...


class TestNatsEventLog(EventLogConformance): ...
