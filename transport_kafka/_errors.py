"""The one place where confluent-kafka errors become transport errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from confluent_kafka import KafkaError, KafkaException

from transport.errors import (
    ConfigurationError,
    PayloadTooLargeError,
    PermanentTransportError,
    TransientTransportError,
    TransportError,
)

__all__ = ["error_from_kafka", "map_kafka_errors"]

_TRANSIENT_CODES = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError._MSG_TIMED_OUT,
    KafkaError._RESOLVE,
    KafkaError._WAIT_COORD,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.REBALANCE_IN_PROGRESS,
}
_AUTH_CODES = {
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError._SSL,
}
_CONFIG_CODES = {
    KafkaError._INVALID_ARG,
    KafkaError.INVALID_CONFIG,
    KafkaError.TOPIC_EXCEPTION,
}
_SIZE_CODES = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE}


def error_from_kafka(err: KafkaError, what: str) -> TransportError:
    """Classify one ``KafkaError`` (from an exception or a delivery report)."""
    code = err.code()
    message = f"{what}: {err.name()}: {err.str()}"
    if code == KafkaError._MSG_TIMED_OUT:
        # librdkafka's words alone ("Local: Message timed out") left a user
        # guessing why.
        message += (
            " (no broker acknowledged the record within the delivery timeout: the"
            " brokers are unreachable, or its topic is gone)"
        )
    if code in _SIZE_CODES:
        exc: TransportError = PermanentTransportError(
            f"{message} (record too large for the broker)"
        )
    elif code in _AUTH_CODES:
        exc = PermanentTransportError(message)
    elif code in _CONFIG_CODES:
        exc = ConfigurationError(message)
    elif code in _TRANSIENT_CODES or err.retriable():
        exc = TransientTransportError(message)
    elif err.fatal():
        exc = PermanentTransportError(message)
    else:
        exc = TransientTransportError(message)
    return exc


@contextlib.contextmanager
def map_kafka_errors(what: str) -> Iterator[None]:
    """Re-raise client exceptions inside the block as transport errors.

    ``KafkaException`` is classified by its error code; a ``BufferError``
    (local queue full) and timeouts are transient; a client ``ValueError`` /
    ``TypeError`` is a configuration error. Transport errors pass through.
    """
    try:
        yield
    except (TransportError, PayloadTooLargeError):
        raise
    except KafkaException as exc:
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if err is None:
            raise TransientTransportError(f"{what}: {exc}") from exc
        raise error_from_kafka(err, what) from exc
    except BufferError as exc:
        raise TransientTransportError(f"{what}: producer queue is full") from exc
    except TimeoutError as exc:
        raise TransientTransportError(f"{what}: timed out") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{what}: {exc}") from exc
    except RuntimeError as exc:  # e.g. a closed client handle
        raise TransientTransportError(f"{what}: {exc}") from exc
