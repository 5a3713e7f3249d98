"""Redis backend: ``redis://host:6379`` (or ``rediss://`` for TLS).

Request queues are Redis Streams with one consumer group each; registries
are hashes with a change stream; the event log is streams, the event bus
pub/sub. See :mod:`transport_redis._transport` for the feature matrix and
options, :mod:`transport_redis._client` for the key names.
"""

from transport_redis._config import RedisOptions
from transport_redis._events import RedisEventBus, RedisEventLog
from transport_redis._queue import RedisDelivery, RedisRequestQueue
from transport_redis._registries import (
    RedisCapabilityRegistry,
    RedisDeliveryRegistry,
    RedisKeyedLog,
)
from transport_redis._transport import RedisTransport, open_redis

__all__ = [
    "RedisCapabilityRegistry",
    "RedisDelivery",
    "RedisDeliveryRegistry",
    "RedisEventBus",
    "RedisEventLog",
    "RedisKeyedLog",
    "RedisOptions",
    "RedisRequestQueue",
    "RedisTransport",
    "open_redis",
]
