"""The one place where redis-py exceptions become :mod:`transport.errors`.

Transient: the server is unreachable, loading its data after a restart,
read-only (a replica during failover), out of memory, or slow — retrying can
help. Permanent: refused credentials or ACL permissions, a refused TLS
certificate, a command the server rejects — retrying cannot help. Messages
never include the password (redis-py's own messages do not carry it either).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from typing import Any

import redis.exceptions as rex

from transport.errors import (
    ClosedResourceError,
    ConfigurationError,
    PermanentTransportError,
    TransientTransportError,
    TransportError,
)

__all__ = ["classify_connect_error", "map_redis_errors"]

_TLS_MARKERS = ("certificate", "ssl", "tls", "wrong version number", "handshake")


def _tls_problem(exc: BaseException) -> str | None:
    """The TLS failure behind ``exc`` (redis-py wraps ``ssl`` errors in its
    ConnectionError), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate refused: {seen.verify_message or seen}"
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    text = str(exc).lower()
    if "certificate verify failed" in text or "hostname mismatch" in text:
        return "certificate refused"
    return None


def classify_connect_error(exc: BaseException, where: str) -> TransportError:
    """Turn an error seen while connecting into a transport error that says
    what to fix (never including secrets)."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, rex.AuthenticationError | rex.AuthenticationWrongNumberOfArgsError):
        return PermanentTransportError(
            f"Redis server at {where} refused the credentials: check username/password"
        )
    if isinstance(exc, rex.NoPermissionError | rex.AuthorizationError):
        return PermanentTransportError(
            f"Redis server at {where} refused a command for this user (ACL): {exc}"
        )
    tls = _tls_problem(exc)
    if tls is not None:
        return PermanentTransportError(f"TLS with Redis server at {where}: {tls}")
    if isinstance(exc, rex.ResponseError) and "NOAUTH" in str(exc):
        return PermanentTransportError(
            f"Redis server at {where} requires a password: set TransportConfig.password"
        )
    if isinstance(exc, rex.ResponseError) and "DB index is out of range" in str(exc):
        # The server answered: retrying cannot help ("unreachable" said so).
        return ConfigurationError(
            f"Redis server at {where} has no database of the number the URL's path "
            "gives (redis://host:6379/N; the server's 'databases' setting, 16 by default, "
            "numbers them 0 to databases-1)"
        )
    if isinstance(exc, rex.InvalidResponse):
        # Something answered, but not in Redis's protocol (another service's
        # port): say so, without echoing what it sent (a NATS server's INFO
        # line, say, a whole kilobyte of it).
        return PermanentTransportError(
            f"the server at {where} does not speak the Redis protocol (is it a Redis "
            f"server's port, and does it want TLS, rediss://?): it answered {_excerpt(exc)}"
        )
    return TransientTransportError(
        f"no Redis server reachable at {where} ({type(exc).__name__}: {exc})"
    )


def _excerpt(exc: BaseException, limit: int = 40) -> str:
    text = str(exc)
    start = text.find("b'")
    shown = text[start + 2 :] if start >= 0 else text
    return repr(shown[:limit] + ("…" if len(shown) > limit else ""))


def _cancel_requests() -> tuple[asyncio.Task[Any] | None, int]:
    """The running task and its count of cancellation requests (no task
    outside a running event loop)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None, 0
    return task, 0 if task is None else task.cancelling()


@contextlib.contextmanager
def map_redis_errors(what: str, where: str = "") -> Iterator[None]:
    """Map redis-py errors raised inside the block (``what`` names the
    operation, ``where`` the server), and raise a cancellation redis-py lost.

    redis-py sends every command under ``asyncio.wait_for`` (the socket
    timeout). On Python 3.11 that returns the send's result when the caller
    is cancelled just after the send finished, so the command goes on to
    its reply as if never cancelled, and a loop of such calls (a worker's
    ``while True: await queue.poll(0.2)``) never ends. A cancellation
    requested while the block ran (the task's count of cancellation
    requests rose) that the block did not raise is raised here, as
    ``CancelledError``, when the block ends; the command may have taken
    effect, as a command cancelled in flight may.
    """
    task, cancels = _cancel_requests()
    at = f" at {where}" if where else ""
    try:
        yield
    except TransportError:
        raise
    except (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError) as exc:
        raise PermanentTransportError(f"{what}: Redis{at} refused the credentials") from exc
    except (rex.NoPermissionError, rex.AuthorizationError) as exc:
        raise PermanentTransportError(f"{what}: Redis{at} refused it (ACL): {exc}") from exc
    except rex.BusyLoadingError as exc:
        raise TransientTransportError(f"{what}: Redis{at} is loading its data") from exc
    except rex.ConnectionError as exc:
        tls = _tls_problem(exc)
        if tls is not None:
            raise PermanentTransportError(f"{what}: TLS with Redis{at}: {tls}") from exc
        if "closed" in str(exc).lower() and "pool" in str(exc).lower():
            raise ClosedResourceError(f"{what}: the Redis client is closed") from exc
        raise TransientTransportError(
            f"{what}: Redis{at} unavailable ({type(exc).__name__}: {exc})"
        ) from exc
    except (rex.TimeoutError, TimeoutError, OSError) as exc:
        raise TransientTransportError(
            f"{what}: Redis{at} unavailable ({type(exc).__name__})"
        ) from exc
    except (rex.ReadOnlyError, rex.OutOfMemoryError, rex.TryAgainError) as exc:
        raise TransientTransportError(f"{what}: Redis{at}: {exc}") from exc
    except rex.ResponseError as exc:
        text = str(exc)
        if text.startswith("NOAUTH"):
            raise PermanentTransportError(f"{what}: Redis{at} requires a password") from exc
        if text.startswith(("LOADING", "MASTERDOWN", "BUSY ", "TRYAGAIN", "CLUSTERDOWN")):
            raise TransientTransportError(f"{what}: Redis{at}: {text}") from exc
        if "unknown command" in text.lower():
            raise ConfigurationError(
                f"{what}: the Redis server{at} lacks a command this backend needs"
                f" (Redis 6.2 or later is required): {text}"
            ) from exc
        raise PermanentTransportError(f"{what}: Redis{at} rejected it: {text}") from exc
    except rex.RedisError as exc:
        raise TransientTransportError(f"{what}: Redis{at} error: {exc}") from exc
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError(f"{what}: cancelled (the command itself completed)")
