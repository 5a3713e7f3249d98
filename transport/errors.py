"""One error tree for every backend.

``TransportError`` splits into two branches that tell the caller what to do:

* :class:`TransientTransportError` — retry later (broker down, timeout, leader
  election).  Retries in this library use tenacity on this branch only.
* :class:`PermanentTransportError` — retrying cannot help (auth failure, bad
  configuration, oversize or undecodable payload, unsafe name). Alert and skip.

Each backend maps its client's exceptions into this tree in exactly one place
and always chains the original (``raise ... from exc``).
"""

from __future__ import annotations

__all__ = [
    "BackendNotAvailableError",
    "ClosedResourceError",
    "ConfigurationError",
    "DeliveryTimeoutError",
    "InvalidMessageError",
    "InvalidNameError",
    "PayloadTooLargeError",
    "PermanentTransportError",
    "TransientTransportError",
    "TransportError",
    "UndecodableMessageError",
    "UnknownDeliveryError",
    "UnsupportedFeatureError",
]


class TransportError(Exception):
    """Base of every error raised by this library."""


class TransientTransportError(TransportError):
    """A failure that may go away by itself: retrying is reasonable."""


class PermanentTransportError(TransportError):
    """A failure that retrying cannot fix."""


class ConfigurationError(PermanentTransportError, ValueError):
    """The configuration is invalid or names something that does not exist."""


class BackendNotAvailableError(ConfigurationError):
    """No backend is registered for a URL scheme, or its extra is not installed."""

    def __init__(self, scheme: str, message: str) -> None:
        super().__init__(message)
        self.scheme = scheme


class UnsupportedFeatureError(PermanentTransportError):
    """The backend does not offer this feature (see its capability flags)."""


class InvalidNameError(PermanentTransportError, ValueError):
    """A queue, registry, ensemble or subject name is unsafe for the wire."""

    def __init__(self, what: str, name: object, reason: str) -> None:
        shown = repr(name)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        super().__init__(f"invalid {what} {shown}: {reason}")
        self.what = what
        self.reason = reason


class InvalidMessageError(PermanentTransportError, ValueError):
    """A request, response or event cannot be built as given: a field of the
    wrong type or out of range, or a payload that JSON cannot carry as sent
    (NaN or an infinity, a tuple, set, bytes or datetime, a non-string key)."""


class PayloadTooLargeError(PermanentTransportError, ValueError):
    """A serialised request or response exceeds the configured size limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message is {size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class UndecodableMessageError(PermanentTransportError):
    """Bytes on the wire are not a valid message of the expected model."""


class ClosedResourceError(TransportError):
    """The queue, registry or transport was closed; it cannot be used again."""


class DeliveryTimeoutError(TransportError, TimeoutError):
    """A response did not arrive in time. The pending record is kept."""

    def __init__(self, request_id: str, timeout: float) -> None:
        super().__init__(f"no response for request {request_id!r} within {timeout:g}s")
        self.request_id = request_id
        self.timeout = timeout


class UnknownDeliveryError(TransportError, KeyError):
    """The delivery registry holds no live record for this request id."""

    def __init__(self, request_id: str) -> None:
        super().__init__(request_id)
        self.request_id = request_id

    def __str__(self) -> str:
        return f"no pending or completed record for request {self.request_id!r}"
