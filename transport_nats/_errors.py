"""The one place where nats-py exceptions become :mod:`transport.errors`.

Transient: the server is unreachable, reconnecting, slow, or JetStream is not
(yet) answering — retrying can help. Permanent: authorization, TLS
verification, bad configuration, oversize messages — retrying cannot help.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator

import nats.errors
import nats.js.errors

from transport.errors import (
    ClosedResourceError,
    PermanentTransportError,
    TransientTransportError,
    TransportError,
)

__all__ = ["classify_connect_error", "map_nats_errors"]

_AUTH_MARKERS = ("authorization violation", "authentication", "user authentication", "permissions")


def _is_auth(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in _AUTH_MARKERS)


def classify_connect_error(exc: BaseException | None, where: str) -> TransportError:
    """Turn the last error seen while connecting into a transport error with
    a message that says what to fix (never including secrets)."""
    text = "" if exc is None else str(exc)
    if isinstance(exc, nats.errors.AuthorizationError) or _is_auth(text):
        return PermanentTransportError(
            f"NATS server at {where} refused the credentials (authorization violation): "
            "check username/password, token, NKey seed or .creds file"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return PermanentTransportError(
            f"TLS certificate of NATS server at {where} was refused: {exc.verify_message or exc}"
        )
    if isinstance(exc, ssl.SSLError | nats.errors.SecureConnFailedError):
        return PermanentTransportError(f"TLS handshake with NATS server at {where} failed: {exc}")
    if isinstance(exc, nats.errors.SecureConnRequiredError | nats.errors.SecureConnWantedError):
        return PermanentTransportError(
            f"TLS setting does not match the NATS server at {where}: {type(exc).__name__} ({exc})"
        )
    if exc is None:
        return TransientTransportError(f"no NATS server reachable at {where}")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | nats.errors.TimeoutError):
        # Something took the connection and never spoke NATS (or too slowly):
        # another service's port, a proxy, a paused server.
        return TransientTransportError(
            f"no NATS server answered at {where} within the connect timeout (is it a "
            "NATS server's client port, and is the server running?)"
        )
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return TransientTransportError(f"no NATS server reachable at {where} ({detail})")


@contextlib.contextmanager
def map_nats_errors(what: str) -> Iterator[None]:
    """Map nats-py errors raised inside the block (``what`` names the operation)."""
    try:
        yield
    except TransportError:
        raise
    except nats.errors.ConnectionClosedError as exc:
        raise ClosedResourceError(f"{what}: the NATS connection is closed") from exc
    except nats.js.errors.ServiceUnavailableError as exc:
        raise TransientTransportError(f"{what}: JetStream unavailable ({exc.description})") from exc
    except nats.js.errors.APIError as exc:
        code = exc.code or 0
        if code >= 500 or code in (408, 409):
            raise TransientTransportError(
                f"{what}: JetStream error {code} ({exc.description})"
            ) from exc
        raise PermanentTransportError(
            f"{what}: JetStream rejected the request: {exc.description}"
            f" (code {code}, err_code {exc.err_code})"
        ) from exc
    except (
        nats.errors.MaxPayloadError,
        nats.errors.BadSubjectError,
        nats.errors.BadHeaderError,
        nats.errors.AuthorizationError,
        nats.errors.InvalidUserCredentialsError,
        nats.js.errors.InvalidKeyError,
        nats.js.errors.InvalidBucketNameError,
    ) as exc:
        raise PermanentTransportError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except ssl.SSLError as exc:
        raise PermanentTransportError(f"{what}: TLS error: {exc}") from exc
    except (
        TimeoutError,
        nats.errors.TimeoutError,
        nats.errors.NoRespondersError,
        nats.errors.NoServersError,
        nats.errors.StaleConnectionError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.OutboundBufferLimitError,
        nats.errors.ConnectionDrainingError,
        nats.js.errors.NoStreamResponseError,
        OSError,
    ) as exc:
        raise TransientTransportError(f"{what}: NATS unavailable ({type(exc).__name__})") from exc
    except nats.errors.Error as exc:
        if _is_auth(str(exc)):
            raise PermanentTransportError(f"{what}: NATS authorization failed") from exc
        raise TransientTransportError(f"{what}: NATS error: {exc}") from exc
