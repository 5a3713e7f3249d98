"""Options of the Kafka backend and the librdkafka configurations built from them.

Everything backend-specific lives in ``TransportConfig.options`` (or the URL
query string: ``kafka://h1:9092,h2:9092?partitions=3``) and is validated by
:class:`KafkaOptions`; unknown keys are refused. Secrets (SASL password,
OAUTHBEARER token, TLS key password) come from the ``SecretStr`` fields of
:class:`~transport.TransportConfig` and are only unwrapped into the
librdkafka dictionaries, which are never logged or shown in a ``repr``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transport import TransportConfig
from transport.errors import ConfigurationError
from transport.kit import options_error, url_options
from transport_kafka._topics import topic_name

__all__ = ["KafkaOptions", "KafkaSettings", "TopicNames", "parse_settings"]

_SASL_MECHANISMS = {
    "PLAIN": "PLAIN",
    "SCRAM-SHA-256": "SCRAM-SHA-256",
    "SCRAM-SHA-512": "SCRAM-SHA-512",
    "OAUTHBEARER": "OAUTHBEARER",
}

# librdkafka keys the library owns: a passthrough may not change them, because
# the delivery guarantees depend on them.
#: Bytes of a record kept below the producer's message.max.bytes for what
#: is not the request body: key, headers, and a dead letter's fields (its
#: error is at most 4 KiB).
RECORD_ALLOWANCE = 8192

_OWNED_PRODUCER = {
    "acks",
    "enable.idempotence",
    "bootstrap.servers",
    "on_delivery",
    "allow.auto.create.topics",
}
_OWNED_CONSUMER = {
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
    "on_commit",
}


class KafkaOptions(BaseModel):
    """``TransportConfig.options`` for ``kafka://``.

    Defaults suit production; the test fixtures lower the fetch wait and the
    group timeouts for the dev broker.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Partitions of each request topic: how many worker processes can share
    #: a queue. With the default 4, order holds per ``ordering_key``; 1 is
    #: the strict-FIFO mode (capability ``ordered``; one process works at a
    #: time, the others stand by).
    partitions: int = Field(default=4, ge=1, le=10_000)
    #: Replication factor of created topics; -1 = the broker's default.
    replication_factor: int = Field(default=-1, ge=-1, le=32)
    #: Size cap (bytes per partition) of request topics: ``retention.bytes``;
    #: -1 (default) = none. Requests are never deleted by age
    #: (``retention.ms=-1``); past a cap the oldest unconsumed ones are.
    retention_bytes: int = Field(default=-1, ge=-1)
    #: ``retention.ms`` of event-log stream topics: -1 (default) keeps every
    #: event; a positive value lets the broker delete older events.
    event_retention_ms: int = Field(default=-1, ge=-1)
    #: Per-stream ``retention.ms`` overriding ``event_retention_ms``.
    stream_retention_ms: dict[str, int] = Field(default_factory=dict)
    #: ``fetch.wait.max.ms`` of consumers (latency of an idle poll).
    fetch_wait_max_ms: int = Field(default=100, ge=0, le=60_000)
    #: Group liveness: how soon a dead worker's partitions move. It also
    #: bounds the first join of a new group: Tansu holds it for half the
    #: session timeout (Apache Kafka for ``group.initial.rebalance.delay.ms``,
    #: 3 s by default), so 6000 (Apache Kafka's smallest accepted session)
    #: lets a fresh worker answer its first poll within 5 s.
    session_timeout_ms: int = Field(default=6_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=2_000, ge=100)
    #: librdkafka's own limit; leases are kept by a polling thread, so a
    #: handler may run far longer than this.
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    #: Records fetched and not yet handed out before partitions are paused
    #: (deliveries the application holds do not count: they are bounded by
    #: its concurrency, and the next batch is fetched while one is worked on).
    max_buffered: int = Field(default=2_000, ge=1)
    #: A process that holds fetched but undelivered work and has not polled
    #: for this long (and holds no live lease) leaves the consumer group so
    #: other processes get its partitions; 0 disables.
    handoff_idle_s: float = Field(default=5.0, ge=0)
    #: How long a process giving partitions up in a rebalance (another
    #: process joined) waits for the handlers of the requests it holds from
    #: them to settle before it lets go: a request settled within it is not
    #: delivered again, one still held past it is (to the new owner, one
    #: attempt more). At most half of ``max_poll_interval_ms`` is waited
    #: (the group would drop a member that blocks its poll longer); 0 = let
    #: go at once.
    handover_wait_s: float = Field(default=30.0, ge=0)
    #: Partition assignment strategy: cooperative-sticky keeps partitions
    #: (and the leases of records in them) with their owner when members join.
    assignment_strategy: Literal["cooperative-sticky", "range", "roundrobin"] = "cooperative-sticky"
    #: How often the contiguous acked prefix is committed.
    commit_interval_ms: int = Field(default=200, ge=10)
    #: Bound on produce (delivery report), admin and metadata calls.
    operation_timeout_s: float = Field(default=30.0, gt=0)
    #: Bound on flush / consumer close at shutdown.
    close_timeout_s: float = Field(default=10.0, gt=0)
    #: Overrides the protocol derived from the TLS/SASL settings.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = None
    #: Extra librdkafka settings (not the ones guarantees depend on).
    producer: dict[str, Any] = Field(default_factory=dict)
    consumer: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class TopicNames:
    """Broker names of one queue (documented in docs/backends/kafka.md)."""

    requests: str
    state: str
    dlq: str
    group: str


@dataclass(frozen=True, repr=False)
class KafkaSettings:
    """Resolved settings: bootstrap servers, options and client configs."""

    bootstrap: str
    namespace: str
    consumer_group: str
    options: KafkaOptions
    common: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # never show the client configs (secrets)
        return f"KafkaSettings(bootstrap={self.bootstrap!r}, namespace={self.namespace!r})"

    def queue_topics(self, name: str) -> TopicNames:
        """Topics and group of queue ``name`` (topic names see
        :func:`~transport_kafka._topics.topic_name`; group names are not
        subject to Kafka's ``.``/``_`` rule and keep the name as is).

        Raises: InvalidNameError if a topic name would be too long.
        """
        ns = self.namespace
        return TopicNames(
            requests=topic_name(ns, name, "requests"),
            state=topic_name(ns, name, "state"),
            dlq=topic_name(ns, name, "dlq"),
            group=f"{ns}.{self.consumer_group}.{name}",
        )

    def priority_group(self, name: str) -> str:
        """The one consumer group of every level of priority queue ``name``
        (queue names have no ``.``, so it is never a plain queue's group)."""
        return f"{self.namespace}.{self.consumer_group}.{name}.priority"

    def registry_topic(self, kind: str, name: str) -> str:
        return topic_name(self.namespace, "registry", kind, name)

    def registry_checkpoint_topic(self, kind: str, name: str) -> str:
        """The topic holding the checkpoint of registry ``name``'s keyed log."""
        return topic_name(self.namespace, "registry", kind, name, "checkpoint")

    def stream_topic(self, stream: str) -> str:
        return topic_name(self.namespace, "stream", stream, "events")

    def body_limit(self, configured: int) -> int:
        """The largest record value the library sends: ``configured``
        (``max_payload_bytes``), and never more than the producer's
        ``message.max.bytes`` (librdkafka's default: 1,000,000) less
        :data:`RECORD_ALLOWANCE` for the key, the headers and a dead letter's
        wrapping (over it, librdkafka refuses the record with
        MSG_SIZE_TOO_LARGE after the request was accepted for sending, and
        a request at the limit could not be dead-lettered)."""
        producer = self.producer_config().get("message.max.bytes", 1_000_000)
        try:
            client_limit = int(producer)
        except (TypeError, ValueError):
            client_limit = 1_000_000
        return max(min(configured, client_limit - RECORD_ALLOWANCE), 1)

    def producer_config(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            **self.common,
            "linger.ms": 1,
            **self.options.producer,
            "acks": "all",
            "enable.idempotence": True,
            "message.timeout.ms": int(self.options.operation_timeout_s * 1000),
            "allow.auto.create.topics": False,
        }
        return conf

    def consumer_config(self, group: str, *, subscribe: bool) -> dict[str, Any]:
        o = self.options
        conf: dict[str, Any] = {
            **self.common,
            "fetch.wait.max.ms": o.fetch_wait_max_ms,
            "auto.offset.reset": "earliest",
            **o.consumer,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
        if subscribe:
            conf.update(
                {
                    "session.timeout.ms": o.session_timeout_ms,
                    "heartbeat.interval.ms": o.heartbeat_interval_ms,
                    "max.poll.interval.ms": o.max_poll_interval_ms,
                    "partition.assignment.strategy": o.assignment_strategy,
                }
            )
        else:
            conf["enable.partition.eof"] = True
        return conf

    def admin_config(self) -> dict[str, Any]:
        return dict(self.common)


def _split_url(url: str) -> tuple[str, str | None, str | None]:
    rest = url.split("://", 1)[1]
    rest = rest.partition("?")[0]
    rest = rest.split("/", 1)[0]
    user = password = None
    if "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        user, _, pw = userinfo.partition(":")
        user, password = unquote(user) or None, (unquote(pw) if pw else None)
    hosts = [h for h in rest.split(",") if h]
    if not hosts:
        raise ConfigurationError("kafka:// URL needs at least one host:port")
    for host in hosts:
        name, sep, port = host.rpartition(":")
        if not sep or not name or not port.isdigit():
            if "@" in url:
                # The user part did not parse (a '/' in the password ends
                # it early): what is left may be the password itself.
                raise ConfigurationError(
                    "kafka:// host must be host:port; the user part of the URL did not parse "
                    "(percent-encode '/', '@', ':' and '?' in a user name or password)"
                )
            raise ConfigurationError(f"kafka:// host must be host:port, got {host!r}")
    return ",".join(hosts), user, password


def _oauth_cb(token: str) -> Any:
    def callback(_config: str) -> tuple[str, float]:
        # A static token: refreshed by reconnecting with a new config.
        return token, time.time() + 3600

    return callback


def parse_settings(config: TransportConfig) -> KafkaSettings:
    """Validate ``config`` for ``kafka://`` and build the client settings.

    Raises: ConfigurationError (never echoing secrets).
    """
    bootstrap, url_user, url_password = _split_url(config.url)
    try:
        options = KafkaOptions.model_validate(url_options("kafka", config.url, config.options))
    except ValidationError as exc:
        raise options_error("kafka", exc) from None
    for key in options.producer:
        if key in _OWNED_PRODUCER:
            raise ConfigurationError(f"producer option {key!r} is set by the library")
    for key in options.consumer:
        if key in _OWNED_CONSUMER:
            raise ConfigurationError(f"consumer option {key!r} is set by the library")

    common: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "client.id": f"agentensemble-{config.namespace}",
        "log.connection.close": False,
    }
    tls = config.tls
    use_tls = tls.enabled or tls.ca_file is not None or tls.cert_file is not None
    if tls.ca_file is not None:
        common["ssl.ca.location"] = str(tls.ca_file)
    if tls.cert_file is not None:
        common["ssl.certificate.location"] = str(tls.cert_file)
    if tls.key_file is not None:
        common["ssl.key.location"] = str(tls.key_file)
    if tls.key_password is not None:
        common["ssl.key.password"] = tls.key_password.get_secret_value()
    if use_tls:
        common["ssl.endpoint.identification.algorithm"] = "https" if tls.verify_hostname else "none"

    mechanism = config.sasl_mechanism
    username = config.username or url_user
    password = config.password.get_secret_value() if config.password else url_password
    if mechanism is None and username is not None:
        mechanism = "PLAIN"
    if mechanism is not None:
        canonical = _SASL_MECHANISMS.get(mechanism.upper())
        if canonical is None:
            raise ConfigurationError(
                f"unsupported sasl_mechanism {mechanism!r} (PLAIN, SCRAM-SHA-256, "
                "SCRAM-SHA-512, OAUTHBEARER)"
            )
        common["sasl.mechanism"] = canonical
        if canonical == "OAUTHBEARER":
            if config.token is None:
                raise ConfigurationError("sasl_mechanism OAUTHBEARER needs a token")
            common["oauth_cb"] = _oauth_cb(config.token.get_secret_value())
        else:
            if username is None or password is None:
                raise ConfigurationError(f"sasl_mechanism {canonical} needs username and password")
            common["sasl.username"] = username
            common["sasl.password"] = password
    protocol = options.security_protocol or (
        ("SASL_SSL" if use_tls else "SASL_PLAINTEXT")
        if mechanism is not None
        else ("SSL" if use_tls else "PLAINTEXT")
    )
    common["security.protocol"] = protocol
    return KafkaSettings(
        bootstrap=bootstrap,
        namespace=config.namespace,
        consumer_group=config.consumer_group,
        options=options,
        common=common,
    )
