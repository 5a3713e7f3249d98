"""``kafka://host:port[,host:port]`` — the Kafka backend (confluent-kafka).

Feature matrix:

=================  =====================================================
persistent         ✓  requests and registry state live in the broker
ordered            ✗  by default (4 partitions: order per ``ordering_key``);
                      ✓ with ``partitions=1`` and one consumer: FIFO apart
                      from redeliveries and nacks (a nacked request is
                      re-produced to the back of its partition)
scale_out          ✓  by default: up to ``partitions`` worker processes
                      share a queue; ✗ with ``partitions=1`` (one works,
                      the others stand by)
consumer_groups    ✓  one consumer group per queue (per priority queue:
                      all levels in one); partitions are spread over
                      processes and move on rebalance
native_delay       ✗  ``nack(delay)`` is a not-before header honoured by
                      the consumer (a local timer)
lease_extension    ✓  client-side leases (see below), renewable forever:
                      a polling thread keeps ``max.poll.interval.ms`` happy
individual_acks    ✓  an ack writes a settled marker to the queue's state
                      topic, so a crash never redelivers an acked request
                      (the committed offset alone is only a prefix)
restart_broker     ✓  a Kafka cluster keeps accepted records across broker
                      restarts (not provable on the memory-only dev broker,
                      Tansu: its test harness cannot restart it with data)
event_log          ✓  one topic per stream (``NS.stream.<name>.events``);
                      named cursors are committed group offsets
event_bus          ✗
=================  =====================================================

Leases are client-side: an expired lease hands the request to another
``poll`` of the same process; Kafka itself moves work between processes only
when partitions are reassigned (a consumer dies, leaves or joins).

Names (``NS`` = ``config.namespace``): ``NS.<queue>.requests``,
``NS.<queue>.state`` (compacted), ``NS.<queue>.dlq`` (compacted), consumer
group ``NS.<consumer_group>.<queue>``; registries
``NS.registry.delivery.<name>`` and ``NS.registry.capability.capabilities``
(compacted), each with a compacted ``.checkpoint`` topic (where a restarting
reader starts instead of the registry's whole history). Every ``_`` of a name is written ``__`` in topic names (Kafka
treats ``.`` and ``_`` alike); topics that already exist are checked at
first use (see ``transport_kafka._topics``).

Options (``TransportConfig.options`` or URL query), validated by
:class:`~transport_kafka.KafkaOptions`: ``partitions`` (1),
``replication_factor`` (-1 = broker default), ``fetch_wait_max_ms`` (100),
``session_timeout_ms`` (6000), ``heartbeat_interval_ms`` (2000),
``max_poll_interval_ms`` (300000), ``max_buffered`` (2000),
``commit_interval_ms`` (200), ``operation_timeout_s`` (30),
``close_timeout_s`` (10), ``security_protocol``, ``producer`` / ``consumer``
(librdkafka passthrough, except the keys guarantees depend on).
Security: ``sasl_mechanism`` PLAIN / SCRAM-SHA-256 / SCRAM-SHA-512 with
``username``/``password``, OAUTHBEARER with ``token``; ``tls`` for SSL.
"""

from __future__ import annotations

import time

from transport import (
    HealthStatus,
    RequestQueue,
    Transport,
    TransportCapabilities,
    TransportConfig,
)
from transport.errors import PermanentTransportError, TransportError
from transport.kit import DoctorFinding, ObjectKind, ProvisionPlan, request_codec_for
from transport_kafka._client import KafkaClients, KafkaContext
from transport_kafka._config import KafkaSettings, parse_settings
from transport_kafka._engine import Engines, _QueueEngine
from transport_kafka._events import KafkaEventLog
from transport_kafka._member import _GroupMember
from transport_kafka._queue import KafkaRequestQueue
from transport_kafka._registries import KafkaKeyedLog

__all__ = ["KafkaTransport", "open_kafka"]


class KafkaTransport(Transport):
    """One set of Kafka clients (producer, admin, one consumer per queue)."""

    backend = "kafka"
    _reads_request_codec = True
    #: With the default options (several partitions); see :meth:`capabilities_for`.
    capabilities = TransportCapabilities(
        persistent=True,
        ordered=False,
        consumer_groups=True,
        native_delay=False,
        lease_extension=True,
        individual_acks=True,
        restart_broker=True,
        event_log=True,
    )

    @classmethod
    def capabilities_for(cls, partitions: int) -> TransportCapabilities:
        """The capabilities with ``partitions`` per request topic: one is
        the strict-FIFO mode (``ordered``; one consumer works at a time, the
        others stand by), more share a queue (``scale_out``)."""
        if partitions > 1:
            return cls.capabilities
        return cls.capabilities.model_copy(update={"ordered": True, "scale_out": False})

    def __init__(self, config: TransportConfig, settings: KafkaSettings | None = None) -> None:
        super().__init__(config)
        self.settings = settings or parse_settings(config)
        self.capabilities = self.capabilities_for(self.settings.options.partitions)
        self.clients = KafkaClients(self.settings)
        # What every queue, registry, log and the doctor get instead of the
        # transport.
        self.ctx = KafkaContext(
            self.settings,
            self.clients,
            max_payload_bytes=self.settings.body_limit(config.max_payload_bytes),
            ordered=self.capabilities.ordered,
            engines=Engines,
            request_codec=request_codec_for(config),
        )
        self._engines = self.ctx.engines

    async def inject_raw(self, queue_name: str, data: bytes) -> None:
        """Write ``data`` verbatim to the request topic of ``queue_name``
        (an internal name such as ``orders__p0`` is allowed), as a foreign
        producer would. For tests."""
        engine = _QueueEngine(self.ctx, queue_name)
        await engine.ensure_topics()
        await self.clients.produce(engine.topics.requests, None, data, what="inject")

    async def publish_foreign(self, destination: str, key: bytes | None, body: bytes) -> None:
        """Produce ``body`` to topic ``destination`` as given (no namespace,
        no rewriting; the topic is not created by the library) and wait for
        its acks=all delivery report."""
        self._check_open()
        await self.clients.produce(destination, key, body, what=f"publish to {destination!r}")

    def _open_queue(
        self, name: str, *, lease_seconds: float, max_attempts: int
    ) -> KafkaRequestQueue:
        return KafkaRequestQueue(
            self.ctx, name, lease_seconds=lease_seconds, max_attempts=max_attempts
        )

    def _open_level_queues(
        self, name: str, levels: int, *, lease_seconds: float, max_attempts: int
    ) -> list[RequestQueue]:
        # The levels are one consumer-group member (see _GroupMember): the
        # same process holds partition k of every level, and they move
        # together on every rebalance. Levels this transport already serves
        # (another handle on the same priority queue) keep their member.
        names = [f"{name}__p{level}" for level in range(levels)]
        member = None
        if not any(level in self._engines for level in names):
            member = _GroupMember(self.ctx, self.settings.priority_group(name), "range", name)
        return [
            KafkaRequestQueue(
                self.ctx,
                level,
                lease_seconds=lease_seconds,
                max_attempts=max_attempts,
                member=member,
            )
            for level in names
        ]

    def _open_keyed_log(self, kind: str, name: str) -> KafkaKeyedLog:
        return KafkaKeyedLog(
            self.ctx,
            self.settings.registry_topic(kind, name),
            self.settings.registry_checkpoint_topic(kind, name),
        )

    def _open_event_log(self) -> KafkaEventLog:
        return KafkaEventLog(self.ctx)

    # -- provisioning and doctor (see transport_kafka._doctor) ---------------
    def _broker_objects(self, kind: ObjectKind, name: str) -> list[str]:
        from transport_kafka._doctor import object_specs

        return [s.name for s in object_specs(self.ctx, kind, name)]

    async def _existing(self, objects: list[str]) -> set[str]:
        from transport_kafka._doctor import topic_names

        return set(objects) & await topic_names(self.ctx)

    async def _create(self, kind: ObjectKind, name: str) -> None:
        from transport_kafka._doctor import object_specs

        await self.clients.ensure_topics(object_specs(self.ctx, kind, name))

    async def _doctor(self, plan: ProvisionPlan | None) -> list[DoctorFinding]:
        from transport_kafka._doctor import kafka_doctor

        return await kafka_doctor(self.ctx, plan)

    async def health(self) -> HealthStatus:
        if self._closed:
            return HealthStatus(ok=False, backend="kafka", detail="transport is closed")
        started = time.perf_counter()
        try:
            count = await self.clients.list_topics(
                limit=min(5.0, self.settings.options.operation_timeout_s)
            )
        except TransportError as exc:
            what = "login refused" if isinstance(exc, PermanentTransportError) else "unreachable"
            return HealthStatus(ok=False, backend="kafka", detail=f"broker {what}: {exc}")
        latency = (time.perf_counter() - started) * 1000
        return HealthStatus(
            ok=True,
            backend="kafka",
            detail=f"{self.settings.bootstrap}: {count} topics visible",
            latency_ms=latency,
        )

    @property
    def operation_timeout(self) -> float:
        return self.settings.options.operation_timeout_s

    async def _verify_backend(self, features: frozenset[str]) -> None:
        # A metadata round trip; errors keep their class (an unreachable
        # broker is transient, refused credentials are permanent).
        await self.clients.list_topics(limit=self.settings.options.operation_timeout_s)

    async def _close_backend(self) -> None:
        await self._engines.stop_all()
        await self.clients.aclose()


async def open_kafka(config: TransportConfig) -> KafkaTransport:
    """Entry point for ``kafka://``. Connects lazily: nothing blocks here; an
    unreachable broker fails the first operation within
    ``operation_timeout_s`` (or ``connect(..., verify=True)`` at once).

    Raises: ConfigurationError for invalid settings.
    """
    transport = KafkaTransport(config)
    # Creating the producer does not block; librdkafka's idempotent producer
    # needs ~0.5 s to get its producer id, which then overlaps other startup.
    transport.clients.producer()
    return transport
