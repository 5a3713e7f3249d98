"""Structured logging: one JSON object per line, for log pipelines.

The library logs through the standard :mod:`logging` module (loggers under
``transport``); key events carry fields such as ``ensemble``, ``queue`` and
``request_id`` as record attributes. :class:`JsonLogFormatter` renders them
as JSON; :func:`configure_logging` installs it (or a plain text format) on
the root logger. Secrets never reach a log record: configuration secrets are
``SecretStr`` and render as ``**********``.

The ``transport`` logger has a ``NullHandler``: an application that has not
configured logging gets nothing on stderr (not even warnings, which Python
would otherwise print through its last-resort handler).

Client libraries (librdkafka, pulsar-client) log through one
:class:`ClientLog` per backend, the logger ``transport.<backend>.client``:
their lines are capped at INFO, because whatever they report that matters to
the caller reaches it as an exception or in ``health()``, and a line that
repeats within a minute (a broker that stays unreachable) is logged once,
with the number of repeats added to its next occurrence.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["ClientLog", "JsonLogFormatter", "configure_logging"]

logging.getLogger("transport").addHandler(logging.NullHandler())

# Numbers (ports, ids, durations, counts) do not make two lines different.
_NUMBERS = re.compile(r"\d+")
_KEYS_KEPT = 256


class ClientLog(logging.Logger):
    """A client library's logger: forwards to ``transport.<backend>.client``
    at most at ``cap`` (INFO), and collapses repeats.

    A line equal to one logged less than ``window`` seconds ago (numbers
    ignored) is dropped and counted; the count is appended to the next
    occurrence logged after the window (lines are never held back, so a
    count waits for that occurrence). It is a :class:`logging.Logger`
    because clients (pulsar-client) insist on one; only :meth:`log` is used,
    and it may be called from any thread.
    """

    def __init__(self, backend: str, *, window: float = 60.0, cap: int = logging.INFO) -> None:
        super().__init__(f"transport.{backend}.client")
        self.target = logging.getLogger(self.name)
        self.window = window
        self.cap = cap
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[int, str], list[float]] = OrderedDict()
        self._problem: tuple[float, str] | None = None

    def last_problem(self, within: float) -> str | None:
        """The client's last WARNING-or-worse line if it came less than
        ``within`` seconds ago (logged or not), to name the cause in the
        error of an operation that timed out."""
        problem = self._problem
        if problem is None or time.monotonic() - problem[0] > within:
            return None
        return problem[1]

    def log(self, level: Any, msg: object, *args: Any, **kwargs: Any) -> None:
        if isinstance(level, str):
            level = logging.getLevelName(level.upper())
            if not isinstance(level, int):
                level = logging.INFO
        if level >= logging.WARNING:
            self._problem = (time.monotonic(), str(msg) % args if args else str(msg))
        level = min(level, self.cap)
        target = self.target
        if not target.isEnabledFor(level):
            return
        text = str(msg) % args if args else str(msg)
        key = (level, _NUMBERS.sub("#", text))
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)  # [first logged at, repeats since]
            if seen is not None and now - seen[0] < self.window:
                seen[1] += 1
                return
            repeats = seen[1] if seen is not None else 0
            self._seen[key] = [now, 0]
            self._seen.move_to_end(key)
            while len(self._seen) > _KEYS_KEPT:
                self._seen.popitem(last=False)
        if repeats:
            text = f"{text} (and {repeats} more like it since it was last logged)"
        target.log(level, "%s", text)


_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


class JsonLogFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", <extra fields>, "exc"?}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = _plain(value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def configure_logging(
    level: int | str = "INFO", *, fmt: Literal["text", "json"] = "text", stream: Any = None
) -> logging.Handler:
    """Send log records at ``level`` and above to ``stream`` (stderr) as
    text or JSON lines; returns the installed handler (replacing handlers a
    previous call installed). Raises: ValueError for an unknown level/format."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name("transport")
    handler.setFormatter(
        JsonLogFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "transport"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
