"""Backend options of ``nats://`` (``TransportConfig.options``), validated.

Unknown keys are rejected so that a typo does not silently fall back to a
default. Connection secrets are not options: they live in the typed fields of
:class:`~transport.TransportConfig` (``username``/``password``, ``token``,
``nkey_seed``, ``credentials_file``, ``tls``) as ``SecretStr``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from transport import TransportConfig, validate_subject
from transport.errors import ConfigurationError
from transport.kit import options_error, url_options

__all__ = ["NatsOptions", "parse_servers", "without_query"]


class NatsOptions(BaseModel):
    """Options of the NATS backend (all optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Extra server URLs, tried as well as those in ``url``.
    servers: list[str] = Field(default_factory=list)
    #: JetStream duplicate window of each queue stream, in seconds: an
    #: ``enqueue`` retried within it with the same ``request_id`` is stored once.
    duplicate_window: float = Field(default=120.0, gt=0)
    #: Longest life of one pull request, in seconds. A pull lost with a
    #: restarted server is re-issued after at most this (plus a grace period);
    #: a reconnect re-issues at once.
    pull_expires: float = Field(default=5.0, gt=0, le=300)
    #: Timeout of one JetStream API call, PubAck or acknowledgement, seconds.
    request_timeout: float = Field(default=5.0, gt=0)
    #: How long ``enqueue`` keeps retrying a transient failure (same
    #: ``Nats-Msg-Id``, so a retry never stores the request twice).
    enqueue_retry_seconds: float = Field(default=10.0, ge=0)
    #: Consumer ``max_ack_pending``: leased, not yet settled requests per queue.
    max_ack_pending: int = Field(default=10_000, ge=1)
    #: Requests one queue handle pulls ahead of its polls. 1 (default): a
    #: pull asks only for as many messages as polls are waiting, nothing is
    #: held that no poll asked for. Above 1: a poll with an empty buffer
    #: first takes what is available now (no_wait, up to this many); the
    #: surplus waits in a local buffer whose leases are renewed (+WPI) while
    #: the handle is polled, and is handed back at once on close (a handed
    #: back request has used one delivery attempt). Queues opened with
    #: ``max_attempts=1`` do not prefetch: a kill would leave their buffer
    #: exhausted, dead-lettered without a handler having seen it.
    prefetch: int = Field(default=1, ge=1, le=1024)
    #: Stream replicas (1 on a single server; 3 on a cluster).
    replicas: int = Field(default=1, ge=1, le=5)
    #: Subject prefix of the event bus on the wire. Empty (default): subject
    #: ``s`` is ``s`` on the wire, so plain NATS clients publish to and
    #: subscribe on the documented subjects directly. Set (e.g. to the
    #: namespace) to isolate buses sharing a server: ``s`` is then
    #: ``<bus_prefix>.s``, and events published without it are not seen.
    bus_prefix: str = ""

    @field_validator("bus_prefix")
    @classmethod
    def _check_bus_prefix(cls, value: str) -> str:
        # Tokens as in any subject, no wildcards (a ValueError: reported as
        # an invalid option).
        return value if value == "" else validate_subject(value)

    #: ``max_age`` (seconds) of event-log streams: 0 (default) keeps every
    #: event; a positive value lets the server delete older events.
    event_max_age: float = Field(default=0.0, ge=0)
    #: Per-stream ``max_age`` overriding ``event_max_age``.
    stream_max_age: dict[str, float] = Field(default_factory=dict)
    #: The server's HTTP monitoring endpoint (``http://host:8222``), read by
    #: ``doctor`` for the JetStream settings no client API shows
    #: (``sync_interval``). Unset: those are reported as not checked.
    monitor_url: str | None = None
    #: Seconds to wait for the first connection; reconnects go on forever by
    #: default (``max_reconnect_attempts`` = -1).
    connect_timeout: float = Field(default=5.0, gt=0)
    max_reconnect_attempts: int = Field(default=-1, ge=-1)
    reconnect_time_wait: float = Field(default=0.5, ge=0)
    #: Seconds between the client's PINGs, and how many may go unanswered
    #: before the connection counts as lost (then reconnecting, and polls
    #: raise instead of answering "empty"): a server that stops answering
    #: with its connection open (hung, or cut off by a network partition)
    #: is noticed within about ``ping_interval × (max_outstanding_pings + 1)``
    #: (30 s by default; the client's own defaults, 120 s and 2, made it 6
    #: minutes of empty polls).
    ping_interval: float = Field(default=10.0, gt=0)
    max_outstanding_pings: int = Field(default=2, ge=1)
    #: Client name shown in the server's monitoring.
    name: str | None = None
    #: TLS handshake before the NATS INFO (server option ``handshake_first``).
    tls_handshake_first: bool = False


def load_options(config: TransportConfig) -> NatsOptions:
    """Validate ``config.options``.

    Raises: ConfigurationError (unknown key or bad value).
    """
    try:
        return NatsOptions.model_validate(url_options("nats", config.url, config.options))
    except ValidationError as exc:
        raise options_error("nats", exc) from None


def without_query(url: str) -> str:
    """``url`` without its query string (from its first ``?``, as
    :func:`transport.kit.url_options` reads it)."""
    return url.partition("?")[0]


def parse_servers(url: str, extra: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split ``nats://[user:pass@]h1:4222,h2:4222`` into server URLs and the
    credentials found in the first URL's user part (``user:pass@`` or
    ``token@``).

    Raises: ConfigurationError.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in {"nats", "tls"}:
        raise ConfigurationError("NATS url must start with nats:// or tls://")
    creds: dict[str, Any] = {}
    servers: list[str] = []
    for i, part in enumerate(p.strip() for p in rest.split(",")):
        if not part:
            continue
        candidate = part if "://" in part else f"{scheme}://{part}"
        parts = urlsplit(candidate)
        try:
            port = parts.port or 4222
        except ValueError as exc:
            raise ConfigurationError("NATS url has an invalid port") from exc
        if parts.scheme.lower() not in {"nats", "tls"}:
            raise ConfigurationError("every NATS server url must use nats:// or tls://")
        if not parts.hostname:
            raise ConfigurationError("NATS url has an empty host")
        if parts.path not in ("", "/") or parts.query:
            raise ConfigurationError(
                "NATS url takes no path; options go in its query or in TransportConfig.options"
            )
        if i == 0 and parts.username is not None:
            if parts.password is not None:
                creds = {"user": parts.username, "password": parts.password}
            else:
                creds = {"token": parts.username}
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        servers.append(f"{parts.scheme.lower()}://{host}:{port}")
    for extra_url in extra:
        more, _ = parse_servers(extra_url, [])
        servers.extend(more)
    if not servers:
        raise ConfigurationError("NATS url names no server")
    return servers, creds
