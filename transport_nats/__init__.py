"""NATS JetStream backend: ``nats://host:4222`` (or ``tls://``).

Request queues are work-queue streams with one shared durable pull consumer;
registries are JetStream KV buckets. See :mod:`transport_nats._transport`
for the feature matrix, name mapping and options.
"""

from transport_nats._config import NatsOptions
from transport_nats._queue import NatsDelivery, NatsRequestQueue
from transport_nats._registries import NatsCapabilityRegistry, NatsDeliveryRegistry, NatsKeyedLog
from transport_nats._transport import NatsTransport, open_nats

__all__ = [
    "NatsCapabilityRegistry",
    "NatsDelivery",
    "NatsDeliveryRegistry",
    "NatsKeyedLog",
    "NatsOptions",
    "NatsRequestQueue",
    "NatsTransport",
    "open_nats",
]
