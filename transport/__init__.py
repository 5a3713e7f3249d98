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
from transport._keyed import CAUGHT_UP, KeyedChange, KeyedLog
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
from transport._priority import AgingPolicy, PriorityRequestQueue
from transport._queue import Delivery, RequestQueue
from transport._registries import (
    CapabilityRegistry,
    DeliveryRecord,
    DeliveryRegistry,
    PendingDelivery,
)
from transport._transport import Transport, TransportCapabilities, TransportFactory
from transport.errors import (
    BackendNotAvailableError,
    ClosedResourceError,
    ConfigurationError,
    DeliveryTimeoutError,
    InvalidNameError,
    PayloadTooLargeError,
    PermanentTransportError,
    TransientTransportError,
    TransportError,
    UndecodableMessageError,
    UnknownDeliveryError,
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
    "HealthStatus",
    "InvalidNameError",
    "KeyedChange",
    "KeyedLog",
    "PayloadTooLargeError",
    "PendingDelivery",
    "PermanentTransportError",
    "PriorityRequestQueue",
    "QueueStats",
    "RequestQueue",
    "TLSConfig",
    "TransientTransportError",
    "Transport",
    "TransportCapabilities",
    "TransportConfig",
    "TransportError",
    "TransportFactory",
    "UndecodableMessageError",
    "UnknownDeliveryError",
    "WorkRequest",
    "WorkResponse",
    "available_backends",
    "connect",
    "decode",
    "encode",
    "load_config",
    "utcnow",
    "validate_name",
    "validate_request_id",
]
