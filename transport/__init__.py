"""Durable, transport-agnostic messaging for networks of agent ensembles.

The SPI (this package) never imports a backend; backends register under the
``transport.backends`` entry-point group and are selected by URL scheme::

    transport = await connect("sqlite:///app.db")      # or kafka://, nats://, pulsar://
    queue = transport.request_queue("kitchen")
    await queue.enqueue(WorkRequest(task="cook", payload={"dish": "soup"}))
"""

from transport._codec import decode, encode
from transport._config import DEFAULT_URL, TLSConfig, TransportConfig, load_config
from transport._connect import available_backends, connect
from transport._doctor import (
    DoctorFinding,
    DoctorReport,
    ProvisionPlan,
    ProvisionStep,
)
from transport._events import (
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
from transport._keyed import CAUGHT_UP, KeyedChange, KeyedLog
from transport._logging import JsonLogFormatter, configure_logging
from transport._metrics import (
    InMemoryMetrics,
    InstrumentedRequestQueue,
    MetricsSink,
    get_metrics_sink,
    set_metrics_sink,
)
from transport._models import (
    Capability,
    CapabilityChange,
    DeadLetter,
    HealthStatus,
    QueueStats,
    WorkRequest,
    WorkResponse,
    utcnow,
)
from transport._naming import validate_name, validate_request_id
from transport._network import Network, NoProviderError
from transport._outbox import Outbox, OutboxDeadLetter
from transport._priority import AgingPolicy, PriorityRequestQueue
from transport._queue import Delivery, RequestQueue
from transport._registries import (
    CapabilityRegistry,
    DeliveryRecord,
    DeliveryRegistry,
    PendingDelivery,
)
from transport._runtime import Ensemble, Handler, PermanentTaskError, RetryTaskError, TaskContext
from transport._tracing import child_traceparent, current_traceparent, new_traceparent
from transport._transport import Transport, TransportCapabilities, TransportFactory
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

__all__ = [
    "CAUGHT_UP",
    "DEFAULT_URL",
    "AgingPolicy",
    "BackendNotAvailableError",
    "Capability",
    "CapabilityChange",
    "CapabilityRegistry",
    "ClosedResourceError",
    "ConfigurationError",
    "DeadLetter",
    "Delivery",
    "DeliveryRecord",
    "DeliveryRegistry",
    "DeliveryTimeoutError",
    "DoctorFinding",
    "DoctorReport",
    "Ensemble",
    "Event",
    "EventBus",
    "EventLog",
    "EventReader",
    "Handler",
    "HealthStatus",
    "InMemoryMetrics",
    "InstrumentedRequestQueue",
    "InvalidMessageError",
    "InvalidNameError",
    "JsonLogFormatter",
    "KeyedChange",
    "KeyedLog",
    "LogEvent",
    "MetricsSink",
    "Network",
    "NoProviderError",
    "Outbox",
    "OutboxDeadLetter",
    "PayloadTooLargeError",
    "PendingDelivery",
    "PermanentTaskError",
    "PermanentTransportError",
    "PriorityRequestQueue",
    "ProvisionPlan",
    "ProvisionStep",
    "QueueStats",
    "RequestQueue",
    "RetryTaskError",
    "Subscription",
    "TLSConfig",
    "TaskContext",
    "TransientTransportError",
    "Transport",
    "TransportCapabilities",
    "TransportConfig",
    "TransportError",
    "TransportFactory",
    "UndecodableMessageError",
    "UnknownDeliveryError",
    "UnsupportedFeatureError",
    "WorkRequest",
    "WorkResponse",
    "available_backends",
    "child_traceparent",
    "configure_logging",
    "connect",
    "current_traceparent",
    "decode",
    "encode",
    "get_metrics_sink",
    "load_config",
    "new_traceparent",
    "set_metrics_sink",
    "subject_matches",
    "subjects",
    "utcnow",
    "validate_name",
    "validate_request_id",
    "validate_subject",
]
