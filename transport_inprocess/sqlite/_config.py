"""The ``sqlite://`` URL and its options, validated."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from transport import TransportConfig
from transport.errors import ConfigurationError
from transport.kit import redact_url, url_options

__all__ = ["SqliteSettings", "sqlite_path"]

_OPTIONS = frozenset({"synchronous", "poll_interval", "busy_timeout_ms"})


@dataclass(frozen=True, slots=True)
class SqliteSettings:
    """The file and the options of one ``sqlite://`` transport: ``synchronous``
    (``FULL`` default, ``NORMAL``, ``OFF``: fsync policy of commits),
    ``poll_interval`` (seconds, default 0.05: how often an idle poller checks
    for work written by *other* processes), ``busy_timeout_ms`` (30000)."""

    path: str
    synchronous: str
    poll_interval: float
    busy_timeout_ms: int

    @classmethod
    def from_config(cls, config: TransportConfig) -> SqliteSettings:
        """Raises: ConfigurationError for a bad URL or option."""
        path, _ = sqlite_path(config.url)
        options = url_options("sqlite", config.url, config.options)
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigurationError(f"unknown sqlite option(s): {', '.join(sorted(unknown))}")
        poll_interval = _number("poll_interval", options.get("poll_interval", 0.05), float)
        busy = _number("busy_timeout_ms", options.get("busy_timeout_ms", 30_000), int)
        if not math.isfinite(poll_interval) or poll_interval <= 0:
            raise ConfigurationError(
                f"invalid sqlite option poll_interval={poll_interval!r}: must be a positive "
                "number of seconds"
            )
        if busy < 0:
            raise ConfigurationError(
                f"invalid sqlite option busy_timeout_ms={busy!r}: must be 0 or more"
            )
        return cls(path, str(options.get("synchronous", "FULL")), poll_interval, busy)


def _number(name: str, value: Any, kind: type[float] | type[int]) -> Any:
    """``value`` (an option, perhaps text from the URL) as ``kind``; a
    ConfigurationError naming the option if it is not one."""
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ConfigurationError(
            f"invalid sqlite option {name}={value!r}: must be {what}"
        ) from None


def sqlite_path(url: str) -> tuple[str, dict[str, str]]:
    """Split ``sqlite:///rel.db?synchronous=NORMAL`` into path and options
    (SQLAlchemy's convention: three slashes relative, four absolute).

    Raises: ConfigurationError.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not an sqlite URL: {url!r}")
    if parts.netloc:
        raise ConfigurationError(
            f"sqlite URL {redact_url(url)!r} has a host part; use sqlite:///relative.db or "
            "sqlite:////abs/path.db"
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path:
        raise ConfigurationError("sqlite URL needs a file path, e.g. sqlite:///transport.db")
    return path, dict(parse_qsl(parts.query))
