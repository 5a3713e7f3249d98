"""Apache Pulsar backend (``pulsar://``, ``pulsar+ssl://``) on pulsar-client."""

from transport_pulsar._config import PulsarOptions
from transport_pulsar._events import PulsarEventLog
from transport_pulsar._queue import PulsarDelivery, PulsarRequestQueue
from transport_pulsar._registries import (
    PulsarCapabilityRegistry,
    PulsarDeliveryRegistry,
    PulsarKeyedLog,
)
from transport_pulsar._transport import PulsarTransport, open_pulsar

__all__ = [
    "PulsarCapabilityRegistry",
    "PulsarDelivery",
    "PulsarDeliveryRegistry",
    "PulsarEventLog",
    "PulsarKeyedLog",
    "PulsarOptions",
    "PulsarRequestQueue",
    "PulsarTransport",
    "open_pulsar",
]
