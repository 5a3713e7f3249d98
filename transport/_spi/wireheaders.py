"""Header (Kafka) / property (Pulsar) names the library puts on the copy of
a request it re-publishes (a nack with a delay or an error), the same on
every backend that re-publishes. Described in docs/wire.md."""

from __future__ import annotations

__all__ = [
    "HEADER_ATTEMPTS",
    "HEADER_ERROR",
    "HEADER_NOT_BEFORE",
    "HEADER_REQUEST_ID",
    "LEGACY_ERROR_HEADERS",
    "MAX_ERROR_BYTES",
    "error_header",
]

#: Deliveries of the request before this copy (decimal text).
HEADER_ATTEMPTS = "ae-attempts"
#: The last error, UTF-8, at most :data:`MAX_ERROR_BYTES` bytes.
HEADER_ERROR = "ae-error"
#: Not to be delivered before this time (decimal milliseconds since the epoch).
HEADER_NOT_BEFORE = "ae-not-before"
#: The request id delivered (a foreign body without one keeps its derived id).
HEADER_REQUEST_ID = "ae-request-id"
#: Names earlier releases wrote the error under (Pulsar: ``ae-last-error``),
#: still read so copies already in a topic keep their error.
LEGACY_ERROR_HEADERS = ("ae-last-error",)
#: The longest error carried, in bytes of UTF-8.
MAX_ERROR_BYTES = 4096


def error_header(error: str) -> str:
    """``error`` cut to at most :data:`MAX_ERROR_BYTES` bytes of UTF-8, at a
    character boundary (never half a character)."""
    data = error.encode("utf-8", "replace")
    if len(data) <= MAX_ERROR_BYTES:
        return error if data.decode("utf-8") == error else data.decode("utf-8")
    return data[:MAX_ERROR_BYTES].decode("utf-8", "ignore")
