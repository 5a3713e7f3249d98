"""The whole conformance suite on ``memory://``."""

from __future__ import annotations

import uuid

import pytest

from transport import Transport, TransportConfig
from transport.testing import (
    BackendHarness,
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
)
from transport_inprocess import MemoryRequestQueue, MemoryTransport, reset_memory


class MemoryHarness(BackendHarness):
    lease_seconds = 0.5
    embedded = True

    async def inject_raw(self, transport: Transport, queue_name: str, data: bytes) -> None:
        assert isinstance(transport, MemoryTransport)
        # The internal constructor: raw targets may be library-owned names.
        queue = transport._open_queue(queue_name, lease_seconds=1.0, max_attempts=1)
        assert isinstance(queue, MemoryRequestQueue)
        queue.inject_raw(data)


@pytest.fixture
def transport_harness() -> object:
    name = f"conformance-{uuid.uuid4().hex[:8]}"
    yield MemoryHarness(TransportConfig(url=f"memory://{name}"), MemoryTransport.capabilities)
    reset_memory(name)


class TestMemoryQueue(RequestQueueConformance): ...


class TestMemoryPriority(PriorityQueueConformance): ...


class TestMemoryPriorityAsQueue(PriorityAsRequestQueueConformance): ...


class TestMemoryDeliveryRegistry(DeliveryRegistryConformance): ...


class TestMemoryCapabilityRegistry(CapabilityRegistryConformance): ...


class TestMemoryCrash(CrashConformance): ...


class TestMemoryEventBus(EventBusConformance): ...


class TestMemoryEventLog(EventLogConformance): ...


class TestMemoryCleanRestart(CleanRestartConformance): ...


class TestMemoryNamespaces(NamespaceConformance): ...


class TestMemoryForgottenClose(ForgottenCloseConformance): ...


class TestMemoryForeignMessages(ForeignMessageConformance): ...


class TestMemoryProvisioning(ProvisioningConformance): ...


class TestMemoryDefaultConfiguration(DefaultConfigurationConformance):
    """Default settings and a user's poll(timeout=5) loop (no test tuning)."""
