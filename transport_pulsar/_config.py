"""Pulsar-specific settings (``TransportConfig.options``) and the name mapping.

Name mapping (all names are validated before they reach the broker)::

    queue  <name>            persistent://<tenant>/<ns>/<prefix>.q.<name>
    its dead letters         persistent://<tenant>/<ns>/<prefix>.q.<name>__dlq
    its hand-out counts      persistent://<tenant>/<ns>/<prefix>.q.<name>__attempts
    priority level k         persistent://<tenant>/<ns>/<prefix>.q.<name>__p<k>
    delivery registry <n>    persistent://<tenant>/<ns>/<prefix>.kv.delivery.<n>
    its checkpoints          persistent://<tenant>/<ns>/<prefix>.kv.delivery.<n>__checkpoint
    capability registry      persistent://<tenant>/<ns>/<prefix>.kv.capability.capabilities
    its checkpoints          persistent://<tenant>/<ns>/<prefix>.kv.capability.capabilities__checkpoint
    subscription             <consumer_group>

``<prefix>`` is ``TransportConfig.namespace``; ``<tenant>``/``<ns>`` are the
``tenant`` and ``pulsar_namespace`` options (default ``public/default``).
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from transport import TransportConfig
from transport.errors import ConfigurationError, InvalidNameError
from transport.kit import options_error, url_options

__all__ = ["PulsarOptions", "PulsarSettings", "parse_settings", "validate_topic_part"]

# Tenants and namespaces: letters, digits, '_', '-', '.', and nothing that
# could add a path segment or a scheme ('/', ':'), change the topic domain
# or hit Pulsar's reserved '-partition-' suffix.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Queue and registry names arrive validated (at most 100 characters) and get
# library suffixes such as ``__p3__dlq``: allow room for those.
_LOCAL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def validate_topic_part(value: str, what: str, *, local_name: bool = False) -> str:
    """Return ``value`` if it is safe as one segment of a topic name.

    Raises: InvalidNameError.
    """
    pattern = _LOCAL_NAME_RE if local_name else _SEGMENT_RE
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidNameError(
            what, value, "only letters, digits, '_', '-' and '.' (no '/', ':' or spaces)"
        )
    if "-partition-" in value:
        raise InvalidNameError(what, value, "'-partition-' is reserved by Pulsar for partitions")
    return value


class PulsarOptions(BaseModel):
    """``TransportConfig.options`` for ``pulsar://`` (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = "public"
    pulsar_namespace: str = "default"
    subscription_type: Literal["shared", "key_shared"] = "shared"
    #: Messages the C++ client prefetches per consumer. Prefetched messages are
    #: invisible to other workers and count as a delivery if the worker dies,
    #: so keep it small for long-running work.
    receiver_queue_size: int = Field(default=1, ge=1, le=10_000)
    #: Delay of the broker redelivery after a plain ``nack()`` or a lease
    #: expiry (the client's negativeAckRedeliveryDelay).
    nack_redelivery_delay_ms: int = Field(default=100, ge=10, le=3_600_000)
    #: ack() returns on the broker's ack receipt (acks are sent at once, the
    #: client's ack grouping is turned off). False: acks are still sent at
    #: once, but ack() returns when the client has handed the ack to its
    #: connection, unconfirmed: faster, and a worker killed right after may
    #: lose the ack (the request comes back: a duplicate). See
    #: docs/backends/pulsar.md, "What ack() guarantees".
    ack_receipts: bool = True
    #: Only where acks cannot be sent at once on the installed pulsar-client
    #: (a warning says so): ack() waits this long after the client accepted
    #: the ack, so that the C++ client's 100 ms ack-grouping tick has put it
    #: on the wire.
    ack_flush_wait_ms: int = Field(default=150, ge=0, le=10_000)
    operation_timeout_seconds: float = Field(default=30.0, gt=0)
    connection_timeout_ms: int = Field(default=10_000, gt=0)
    #: One attempt to join a subscription (the operation timeout of the
    #: client each consumer has to itself; whole seconds, at least 1); a
    #: failed attempt is retried with the next consumer id within
    #: operation_timeout_seconds. Short, because pulsar-lite refuses a
    #: consumer whose id another connection already uses on the subscription
    #: and the client retries that id until this timeout.
    subscribe_attempt_timeout_seconds: float = Field(default=3.0, gt=0)
    #: Each consumer has a client of its own, whose first consumer id is
    #: random below this (pulsar-lite tells a subscription's consumers apart
    #: by id alone, and a refused id costs an attempt). 0 or 1: start at 0
    #: (enough on Apache Pulsar, which scopes ids to the connection).
    consumer_id_spread: int = Field(default=128, ge=0, le=4096)
    send_timeout_ms: int = Field(default=30_000, gt=0)
    close_timeout_seconds: float = Field(default=10.0, gt=0)
    io_threads: int = Field(default=1, ge=1, le=64)
    #: Where the C++ client's own log lines go. ``logging`` (default): its
    #: warnings and errors, filtered in C++, to the ``transport.pulsar.client``
    #: logger (through a pipe read by one thread per process; at most INFO,
    #: repeats collapsed; nothing on stderr unless logging is configured).
    #: ``stderr``: the same lines written straight to the process's stderr.
    #: ``python``: every line, debug included, to that logger — the client
    #: cannot filter lines for a Python logger, so each one takes the GIL
    #: from a client thread (several per message: enqueue runs about a third
    #: slower under load).
    client_log: Literal["logging", "stderr", "python"] = "logging"
    #: Pulsar admin REST endpoint (``http(s)://host:8080``) used by
    #: ``stats()``; the binary protocol has no backlog query in this client.
    admin_url: str | None = None
    #: Retention (minutes) ``provision`` sets on event-log stream topics
    #: through ``admin_url``: -1 (default) keeps every event.
    event_retention_minutes: int = Field(default=-1, ge=-1)
    #: Per-stream retention in minutes, overriding ``event_retention_minutes``.
    stream_retention_minutes: dict[str, int] = Field(default_factory=dict)
    # OAuth2 client-credentials flow (pulsar-client AuthenticationOauth2).
    oauth2_issuer_url: str | None = None
    oauth2_audience: str | None = None
    oauth2_scope: str | None = None
    oauth2_client_id: str | None = None
    oauth2_client_secret: SecretStr | None = None
    #: TLS listener name for multi-listener brokers.
    listener_name: str | None = None

    @field_validator("tenant", "pulsar_namespace")
    @classmethod
    def _check_segment(cls, value: str) -> str:
        return validate_topic_part(value, "tenant/namespace")

    @field_validator("admin_url", "oauth2_issuer_url")
    @classmethod
    def _check_http(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in {"http", "https"}:
            raise ValueError("must be an http:// or https:// URL")
        return value


class PulsarSettings(BaseModel):
    """Everything the backend derives from a :class:`TransportConfig`."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    service_url: str
    use_tls: bool
    options: PulsarOptions

    def topic(self, prefix: str, kind: str, name: str) -> str:
        """``persistent://tenant/ns/<prefix>.<kind>.<name>`` for validated parts."""
        validate_topic_part(name, "queue or registry name", local_name=True)
        o = self.options
        return f"persistent://{o.tenant}/{o.pulsar_namespace}/{prefix}.{kind}.{name}"


def parse_settings(config: TransportConfig) -> PulsarSettings:
    """Validate the URL and options of a ``pulsar://`` / ``pulsar+ssl://`` config.

    Raises: ConfigurationError (never echoing secrets).
    """
    parts = urlsplit(config.url)
    scheme = parts.scheme.lower()
    if scheme not in {"pulsar", "pulsar+ssl"}:
        raise ConfigurationError(f"not a pulsar URL: scheme {scheme!r}")
    if parts.username or parts.password:
        raise ConfigurationError(
            "credentials in the pulsar URL are not supported; use token/username/password settings"
        )
    if parts.path not in {"", "/"} or parts.fragment:
        raise ConfigurationError(
            "a pulsar URL is pulsar://host:port[,host:port][?option=value&...]"
        )
    if not parts.netloc:
        raise ConfigurationError("the pulsar URL needs a host, e.g. pulsar://localhost:6650")
    use_tls = scheme == "pulsar+ssl"
    if config.tls.enabled and not use_tls:
        raise ConfigurationError("tls.enabled needs a pulsar+ssl:// URL")
    if config.tls.key_password is not None:
        raise ConfigurationError("pulsar-client cannot read encrypted TLS keys (tls.key_password)")
    if (config.tls.cert_file is None) != (config.tls.key_file is None):
        raise ConfigurationError("tls.cert_file and tls.key_file must be given together")
    try:
        options = PulsarOptions.model_validate(url_options("pulsar", config.url, config.options))
    except ValidationError as exc:
        raise options_error("pulsar", exc) from None
    auth_kinds = [
        bool(config.token),
        bool(config.username or config.password),
        bool(options.oauth2_issuer_url or options.oauth2_client_id),
    ]
    if sum(auth_kinds) > 1:
        raise ConfigurationError("choose one of token, username/password and OAuth2 authentication")
    has_client_secret = options.oauth2_client_id and options.oauth2_client_secret
    if options.oauth2_issuer_url and not has_client_secret and config.credentials_file is None:
        raise ConfigurationError(
            "OAuth2 needs oauth2_client_id + oauth2_client_secret or a credentials_file"
        )
    return PulsarSettings(
        service_url=f"{scheme}://{parts.netloc}", use_tls=use_tls, options=options
    )
