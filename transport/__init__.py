"""Durable, transport-agnostic messaging for networks of agent ensembles.

The SPI (this package) never imports a backend; backends register under the
``transport.backends`` entry-point group and are selected by URL scheme::

    transport = await connect("sqlite:///app.db")      # or kafka://, nats://, pulsar://
    queue = transport.request_queue("kitchen")
    await queue.enqueue(WorkRequest(task="cook", payload={"dish": "soup"}))

    async with connect("sqlite:///app.db") as transport:  # closed when the block ends
        ...

The SPI at a glance (``transport._spi``). A backend subclasses
``Transport`` and implements its hooks, a ``RequestQueue`` with its
``Delivery``, a ``KeyedLog`` and, where it has events, ``EventBus`` /
``EventLog``; callers hold what ``Transport`` opens::

    Transport              health() · verify() · provision() / missing() / doctor() · aclose()
      backend hooks        _open_queue(name, ...) -> RequestQueue
                           _queue_handle(name, ...) (optional: handles sharing a queue)
                           _open_keyed_log(kind, name) -> KeyedLog
                           _open_event_bus() / _open_event_log() (optional)
      request_queue()      RequestQueue: enqueue · poll -> Delivery · stats · dead_letters
                           Delivery: ack · nack · extend · dead_letter
      priority_queue()     PriorityRequestQueue (shared layer: one RequestQueue per level)
      delivery_registry()  DeliveryRegistry (shared layer over a KeyedLog)
      capability_registry() CapabilityRegistry (shared layer over a KeyedLog)
      event_bus()          EventBus: publish · subscribe · request · serve
      event_log()          EventLog: append · read -> EventReader
    KeyedLog               put · delete · get · watch
    models                 WorkRequest · WorkResponse · DeadLetter · QueueStats ·
                           Capability · Event · LogEvent · HealthStatus
    errors                 transport.errors: TransientTransportError /
                           PermanentTransportError and their subclasses

On top of it: the runtime (``transport._runtime``: Ensemble, Network,
Outbox; ``transport.sync`` for blocking code) and operations
(``transport._ops``, ``transport.cli``, ``transport.prometheus``). Backend
authors also get :mod:`transport.kit`; conformance tests live in
:mod:`transport.testing`.
"""

# Imports sort by layer: operations (_ops), runtime (_runtime), SPI (_spi).
from transport._ops.logging import JsonLogFormatter, configure_logging
from transport._ops.tracing import child_traceparent, current_traceparent, new_traceparent
from transport._runtime.ensemble import (
    Ensemble,
    Handler,
    PermanentTaskError,
    RetryTaskError,
    TaskContext,
)
from transport._runtime.network import Network, NoProviderError
from transport._runtime.outbox import Outbox, OutboxDeadEvent, OutboxDeadLetter, OutboxFile
from transport._spi.codec import decode, encode
from transport._spi.config import DEFAULT_URL, TLSConfig, TransportConfig, load_config
from transport._spi.connect import Connecting, available_backends, connect
from transport._spi.doctor import (
    DoctorFinding,
    DoctorReport,
    ProvisionPlan,
    ProvisionStep,
)
from transport._spi.events import (
    Event,
    EventBus,
    EventLog,
    EventReader,
    LogEvent,
    Subscription,
    subject_matches,
    subjects,
    validate_subject,
)
from transport._spi.keyed import CAUGHT_UP, KeyedChange, KeyedLog
from transport._spi.metrics import (
    SECONDS_BUCKETS,
    Histogram,
    InMemoryMetrics,
    InstrumentedRequestQueue,
    MetricsSink,
    get_metrics_sink,
    set_metrics_sink,
)
from transport._spi.models import (
    Capability,
    CapabilityChange,
    DeadLetter,
    HealthStatus,
    QueueStats,
    WorkRequest,
    WorkResponse,
    utcnow,
)
from transport._spi.naming import validate_name, validate_request_id
from transport._spi.priority import AgingPolicy, PriorityRequestQueue
from transport._spi.queue import Delivery, RequestQueue
from transport._spi.registries import (
    CapabilityRegistry,
    DeliveryRecord,
    DeliveryRegistry,
    PendingDelivery,
)
from transport._spi.transport import Transport, TransportCapabilities, TransportFactory
from transport.errors import (
    BackendNotAvailableError,
    ClosedResourceError,
    ConfigurationError,
    DeliveryTimeoutError,
    InvalidMessageError,
    InvalidNameError,
    PayloadTooLargeError,
    PermanentTransportError,
    TransientTransportError,
    TransportError,
    UndecodableMessageError,
    UnknownDeliveryError,
    UnsupportedFeatureError,
)

__all__ = [  # noqa: RUF022 - grouped by layer, sorted by role within a group
    # SPI and models: the Transport a backend implements, what it opens, the models and names
    "Transport",
    "TransportCapabilities",
    "TransportFactory",
    "connect",
    "Connecting",
    "available_backends",
    "TransportConfig",
    "TLSConfig",
    "DEFAULT_URL",
    "load_config",
    "RequestQueue",
    "Delivery",
    "KeyedLog",
    "KeyedChange",
    "CAUGHT_UP",
    "EventBus",
    "EventLog",
    "EventReader",
    "Subscription",
    "Event",
    "LogEvent",
    "subjects",
    "subject_matches",
    "validate_subject",
    "WorkRequest",
    "WorkResponse",
    "DeadLetter",
    "QueueStats",
    "HealthStatus",
    "Capability",
    "CapabilityChange",
    "utcnow",
    "encode",
    "decode",
    "validate_name",
    "validate_request_id",
    # errors (transport.errors)
    "TransportError",
    "TransientTransportError",
    "PermanentTransportError",
    "BackendNotAvailableError",
    "ClosedResourceError",
    "ConfigurationError",
    "DeliveryTimeoutError",
    "InvalidMessageError",
    "InvalidNameError",
    "PayloadTooLargeError",
    "UndecodableMessageError",
    "UnknownDeliveryError",
    "UnsupportedFeatureError",
    # shared layers: written once over the SPI, opened by Transport for every backend
    "PriorityRequestQueue",
    "AgingPolicy",
    "DeliveryRegistry",
    "DeliveryRecord",
    "PendingDelivery",
    "CapabilityRegistry",
    # runtime: workers, request/answer between ensembles, durable sends
    "Ensemble",
    "Handler",
    "TaskContext",
    "PermanentTaskError",
    "RetryTaskError",
    "Network",
    "NoProviderError",
    "Outbox",
    "OutboxDeadLetter",
    "OutboxDeadEvent",
    "OutboxFile",
    # operations: provisioning and doctor records, metrics, tracing, logging
    "ProvisionPlan",
    "ProvisionStep",
    "DoctorFinding",
    "DoctorReport",
    "MetricsSink",
    "InMemoryMetrics",
    "Histogram",
    "SECONDS_BUCKETS",
    "InstrumentedRequestQueue",
    "get_metrics_sink",
    "set_metrics_sink",
    "new_traceparent",
    "child_traceparent",
    "current_traceparent",
    "JsonLogFormatter",
    "configure_logging",
]
