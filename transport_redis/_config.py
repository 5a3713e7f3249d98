"""Backend options of ``redis://`` / ``rediss://`` (``TransportConfig.options``),
validated, and the URL parser.

Unknown keys are rejected so that a typo does not silently fall back to a
default. Connection secrets are not options: the password lives in
``TransportConfig.password`` (``SecretStr``, never logged), the ACL user in
``TransportConfig.username``; a password in the URL is accepted too and is
never shown (``TransportConfig.redacted_url``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transport import TransportConfig
from transport.errors import ConfigurationError
from transport.kit import options_error, url_options

__all__ = ["RedisEndpoint", "RedisOptions", "load_options", "parse_url"]


class RedisOptions(BaseModel):
    """Options of the Redis backend (all optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Seconds to wait for a TCP (and TLS) connection; the first operation
    #: against an unreachable server fails within ``operation_timeout``
    #: (this, times two, plus one second).
    connect_timeout: float = Field(default=5.0, gt=0, le=30)
    #: Seconds one command may take before it fails as transient.
    request_timeout: float = Field(default=5.0, gt=0, le=60)
    #: How often an idle ``poll`` looks for expired leases and due delayed
    #: requests (new requests wake it at once), in seconds.
    claim_interval: float = Field(default=0.5, gt=0, le=30)
    #: Connections of the client's pool (each waiting ``poll`` holds one
    #: while it blocks).
    max_connections: int = Field(default=64, ge=2, le=10_000)
    #: Consumers of a queue's group with nothing pending that have not been
    #: seen for this long (handles of crashed processes) are deleted when a
    #: handle first uses the queue. Harmless for a live handle: its next
    #: read makes its consumer again.
    idle_consumer_seconds: float = Field(default=3600.0, ge=0)
    #: Seconds the change stream of a registry keeps a change (watchers that
    #: fall further behind re-read the current state).
    registry_change_retention: float = Field(default=3600.0, gt=0)
    #: Approximate ``MAXLEN`` of every event-log stream; 0 (default) keeps
    #: every event.
    event_max_len: int = Field(default=0, ge=0)
    #: Logical database number (also accepted as the URL path ``/<db>``).
    db: int | None = Field(default=None, ge=0)
    #: Client name shown by ``CLIENT LIST``.
    name: str | None = None


def load_options(config: TransportConfig) -> RedisOptions:
    """Validate ``config.options``.

    Raises: ConfigurationError (unknown key or bad value).
    """
    try:
        return RedisOptions.model_validate(url_options("redis", config.url, config.options))
    except ValidationError as exc:
        raise options_error("redis", exc) from None


@dataclass(frozen=True)
class RedisEndpoint:
    """Where to connect, parsed from the URL (the password is kept out of
    ``repr``)."""

    host: str
    port: int
    tls: bool
    db: int
    username: str | None
    password: str | None

    def __repr__(self) -> str:
        return f"RedisEndpoint({self.where}, tls={self.tls}, db={self.db})"

    @property
    def where(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{host}:{self.port}"


def parse_url(url: str, options: RedisOptions) -> RedisEndpoint:
    """Split ``redis[s]://[user[:password]@]host[:port][/db]``.

    Raises: ConfigurationError (never showing the password).
    """
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in {"redis", "rediss"}:
        raise ConfigurationError("Redis url must start with redis:// or rediss://")
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise ConfigurationError("Redis url has an invalid port") from exc
    if not parts.hostname:
        raise ConfigurationError("Redis url has an empty host")
    if parts.fragment:
        raise ConfigurationError("Redis url takes no fragment")
    path = parts.path.strip("/")
    db = options.db if options.db is not None else 0
    if path:
        if not path.isdigit():
            raise ConfigurationError("Redis url path must be a database number, e.g. /0")
        if options.db is not None and int(path) != options.db:
            raise ConfigurationError("Redis url path and option 'db' name different databases")
        db = int(path)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return RedisEndpoint(
        host=parts.hostname,
        port=port,
        tls=scheme.lower() == "rediss",
        db=db,
        username=username,
        password=password,
    )
