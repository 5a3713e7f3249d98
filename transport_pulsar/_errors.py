"""The one place where pulsar-client failures become :mod:`transport.errors`.

The C++ client reports failures three ways: a ``pulsar.Result`` code handed
to an async callback (wrapped here in :class:`PulsarResultError`), an
exception class per result code raised by its synchronous calls
(``_pulsar.Timeout`` …, all subclasses of ``_pulsar.PulsarException``), and
plain timeouts of our own waits. :func:`map_pulsar_errors` turns all three
into the transient/permanent split, always chaining the original.
"""

from __future__ import annotations

from types import TracebackType
from typing import Literal

import _pulsar

from transport.errors import (
    ClosedResourceError,
    ConfigurationError,
    PermanentTransportError,
    TransientTransportError,
    TransportError,
)

__all__ = ["PulsarResultError", "is_transient", "map_pulsar_errors"]

#: Result codes that may go away by themselves (broker down or busy,
#: leadership moving, a timeout): retrying is reasonable.
_TRANSIENT = frozenset(
    {
        "Timeout",
        "ConnectError",
        "NotConnected",
        "ServiceUnitNotReady",
        "LookupError",
        "TooManyLookupRequestException",
        "BrokerPersistenceError",
        "BrokerMetadataError",
        "ProducerQueueIsFull",
        "MemoryBufferIsFull",
        "ReadError",
        "Interrupted",
        "ConsumerBusy",
        "ProducerBusy",
        "ProducerBlockedQuotaExceededError",
        "ProducerBlockedQuotaExceededException",
        "UnknownError",
        "TopicNotFound",
        "SubscriptionNotFound",
        "ConsumerNotFound",
        # A dropped connection; and the name the client gives a result code
        # it has no name for, seen when pulsar-lite drops a connection under
        # load ("Failed to getLastMessageId: ResultDisconnected").
        "Disconnected",
        "???",
    }
)
_CONFIGURATION = frozenset(
    {"InvalidConfiguration", "InvalidUrl", "InvalidTopicName", "UnsupportedVersionError"}
)


class PulsarResultError(Exception):
    """A non-``Ok`` result code delivered to an async callback."""

    def __init__(self, result: object, message: str | None = None) -> None:
        self.result_name = getattr(result, "name", str(result))
        detail = f": {message}" if message else ""
        super().__init__(f"pulsar {self.result_name}{detail}")


def _result_name(exc: BaseException) -> str | None:
    if isinstance(exc, PulsarResultError):
        return exc.result_name
    if isinstance(exc, _pulsar.PulsarException):
        return type(exc).__name__
    return None


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (a client failure) is worth retrying."""
    name = _result_name(exc)
    return name in _TRANSIENT if name is not None else isinstance(exc, TimeoutError)


class map_pulsar_errors:
    """Translate client failures raised inside the block.

    ``what`` names the operation (a topic, never a secret) for the message.
    Raises: TransientTransportError, PermanentTransportError (and its
    ConfigurationError / PayloadTooLargeError subclasses), ClosedResourceError.
    (A class, not a generator: it wraps every send and ack.)
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if exc is None or isinstance(exc, TransportError):
            return False
        what = self.what
        if isinstance(exc, TimeoutError):
            raise TransientTransportError(f"{what}: timed out") from exc
        if not isinstance(exc, (PulsarResultError, _pulsar.PulsarException)):
            return False
        name = _result_name(exc) or "UnknownError"
        if name == "AlreadyClosed":
            raise ClosedResourceError(f"{what}: client already closed") from exc
        if name in _TRANSIENT:
            raise TransientTransportError(f"{what}: {name}") from exc
        if name in _CONFIGURATION:
            raise ConfigurationError(f"{what}: {name}") from exc
        if name == "MessageTooBig":
            raise PermanentTransportError(
                f"{what}: message is larger than the broker accepts"
            ) from exc
        if name in {"AuthenticationError", "AuthorizationError", "ErrorGettingAuthenticationData"}:
            raise PermanentTransportError(f"{what}: {name} (check the token/credentials)") from exc
        raise PermanentTransportError(f"{what}: {name}") from exc
