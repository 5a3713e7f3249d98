"""Kafka backend (``kafka://host:port[,host:port]``) on confluent-kafka."""

from transport_kafka._config import KafkaOptions, KafkaSettings, parse_settings
from transport_kafka._errors import map_kafka_errors
from transport_kafka._offsets import OffsetTracker
from transport_kafka._queue import KafkaDelivery, KafkaRequestQueue
from transport_kafka._registries import (
    KafkaCapabilityRegistry,
    KafkaDeliveryRegistry,
    KafkaKeyedLog,
)
from transport_kafka._transport import KafkaTransport, open_kafka

__all__ = [
    "KafkaCapabilityRegistry",
    "KafkaDelivery",
    "KafkaDeliveryRegistry",
    "KafkaKeyedLog",
    "KafkaOptions",
    "KafkaRequestQueue",
    "KafkaSettings",
    "KafkaTransport",
    "OffsetTracker",
    "map_kafka_errors",
    "open_kafka",
    "parse_settings",
]
