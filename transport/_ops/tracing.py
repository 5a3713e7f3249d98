"""W3C trace context (``traceparent``) carried in request headers.

Works without OpenTelemetry: the runtime starts a child span id for each hop
so a trace id survives caller → ensemble → downstream ensemble. With the
``otel`` extra installed, :func:`current_traceparent` also picks up the active
OpenTelemetry span.
"""

from __future__ import annotations

import contextvars
import importlib
import re
import secrets
from typing import Any

__all__ = [
    "TRACEPARENT",
    "child_traceparent",
    "current_traceparent",
    "new_traceparent",
    "parse_traceparent",
]

TRACEPARENT = "traceparent"
_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

#: The trace context of the request being handled in this task, if any.
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)


def new_traceparent(sampled: bool = True) -> str:
    """A fresh root ``traceparent``."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-{'01' if sampled else '00'}"


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """``(trace_id, parent_id, flags)`` or ``None`` if absent or malformed."""
    if not value:
        return None
    match = _RE.fullmatch(value.strip())
    if match is None or match.group(1) == "0" * 32 or match.group(2) == "0" * 16:
        return None
    return match.group(1), match.group(2), match.group(3)


def child_traceparent(parent: str | None) -> str:
    """Same trace id, new span id; a new root if ``parent`` is unusable."""
    parsed = parse_traceparent(parent)
    if parsed is None:
        return new_traceparent()
    trace_id, _, flags = parsed
    return f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"


def current_traceparent() -> str | None:
    """The trace context to propagate from here: the OpenTelemetry span if
    one is active, else the request being handled by this task."""
    otel = _otel_trace()
    if otel is not None:
        ctx = otel.get_current_span().get_span_context()
        if ctx.is_valid:
            return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    return _current.get()


_OTEL: list[Any] = []


def _otel_trace() -> Any:
    """``opentelemetry.trace`` if installed (looked up once), else None."""
    if not _OTEL:
        try:
            _OTEL.append(importlib.import_module("opentelemetry.trace"))
        except ImportError:
            _OTEL.append(None)
    return _OTEL[0]


def set_current(value: str | None) -> contextvars.Token[str | None]:
    return _current.set(value)


def reset_current(token: contextvars.Token[str | None]) -> None:
    _current.reset(token)
