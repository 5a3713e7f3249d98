"""The backend conformance suite, shipped with the library.

A backend (including a third-party one) runs it by providing a
``transport_harness`` fixture and subclassing the classes below::

    class TestMyQueues(RequestQueueConformance): ...

The pytest plugin (``transport.testing.plugin``) is registered through the
``pytest11`` entry point and supplies the other fixtures.
"""

from transport.testing._crash_suite import CrashConformance
from transport.testing._defaults_suite import DefaultConfigurationConformance
from transport.testing._events_suite import EventBusConformance, EventLogConformance
from transport.testing._lifecycle_suite import (
    CleanRestartConformance,
    ForeignMessageConformance,
    ForgottenCloseConformance,
)
from transport.testing._namespace_suite import NamespaceConformance
from transport.testing._priority_suite import (
    PriorityAsRequestQueueConformance,
    PriorityQueueConformance,
)
from transport.testing._provision_suite import ProvisioningConformance
from transport.testing._queue_suite import RequestQueueConformance
from transport.testing._registry_suite import (
    CapabilityRegistryConformance,
    DeliveryRegistryConformance,
)
from transport.testing._restart_suite import BrokerOutageConformance, BrokerRestartConformance
from transport.testing._unreachable_suite import UnreachableBrokerConformance
from transport.testing.harness import BackendHarness

__all__ = [
    "BackendHarness",
    "BrokerOutageConformance",
    "BrokerRestartConformance",
    "CapabilityRegistryConformance",
    "CleanRestartConformance",
    "CrashConformance",
    "DefaultConfigurationConformance",
    "DeliveryRegistryConformance",
    "EventBusConformance",
    "EventLogConformance",
    "ForeignMessageConformance",
    "ForgottenCloseConformance",
    "NamespaceConformance",
    "PriorityAsRequestQueueConformance",
    "PriorityQueueConformance",
    "ProvisioningConformance",
    "RequestQueueConformance",
    "UnreachableBrokerConformance",
]
