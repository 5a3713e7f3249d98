"""The :class:`Transport` SPI: one object per deployment, built by ``connect``."""

from __future__ import annotations

import asyncio
import functools
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable
from datetime import timedelta
from types import TracebackType
from typing import ClassVar, Protocol, Self

from pydantic import BaseModel, ConfigDict

from transport._spi.codec import request_codec_for
from transport._spi.config import TransportConfig
from transport._spi.doctor import (
    DoctorFinding,
    DoctorReport,
    ObjectKind,
    ProvisionPlan,
    ProvisionStatus,
    ProvisionStep,
)
from transport._spi.events import EventBus, EventLog
from transport._spi.keyed import KeyedLog
from transport._spi.metrics import InstrumentedRequestQueue, get_metrics_sink, metrics_enabled
from transport._spi.models import HealthStatus
from transport._spi.naming import validate_name
from transport._spi.priority import MAX_PRIORITY_LEVELS, AgingPolicy, PriorityRequestQueue
from transport._spi.queue import RequestQueue
from transport._spi.registries import (
    CapabilityRegistry,
    DeliveryRegistry,
    finish_closing_dropped,
)
from transport._spi.shared import SharedQueue, SharedQueueHandle
from transport.errors import ClosedResourceError, TransientTransportError, UnsupportedFeatureError

__all__ = ["DEFAULT_OPERATION_TIMEOUT", "Transport", "TransportCapabilities", "TransportFactory"]

#: The documented default bound on an operation against an unreachable
#: broker (each backend's own timeout option defaults to at most this).
DEFAULT_OPERATION_TIMEOUT = 30.0


class TransportCapabilities(BaseModel):
    """What a backend guarantees, as data. Tests and callers branch on these
    flags, never on the backend's name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Enqueued requests and registry state survive the death of every
    #: client process (and can be shared by several processes).
    persistent: bool
    #: A single consumer sees requests in enqueue order (FIFO), apart from
    #: redeliveries and delayed nacks.
    ordered: bool
    #: Several worker processes can share one queue.
    consumer_groups: bool
    #: Consumers of one queue in different clients all receive requests
    #: while they all poll, so adding worker processes adds throughput.
    #: False on Kafka with one partition per queue (``partitions=1``, strict
    #: FIFO): a second consumer stands by until the first one leaves.
    scale_out: bool = True
    #: ``nack(delay)`` is honoured by the broker, not by a client-side timer.
    native_delay: bool
    #: ``extend()`` renews the lease on the broker.
    lease_extension: bool
    #: An ack settles exactly that request. False where acks become durable
    #: only as a contiguous prefix (Kafka offsets): after a crash, requests
    #: acked behind an unacked one may be delivered again.
    individual_acks: bool = True
    #: Accepted requests survive a broker restart (the broker keeps them on
    #: disk). This describes the backend, not a test broker: whether a test
    #: broker can be restarted with its data is the harness's
    #: ``BackendHarness.can_restart_broker``.
    restart_broker: bool = False
    #: A request whose lease expired goes to whichever consumer of the queue
    #: polls next. False where the broker may give it back to the consumer
    #: that held it (Pulsar: its dispatcher pushes redeliveries to any
    #: consumer with permits, the holder's included; ``Key_Shared`` pins it
    #: by key hash): a hung holder that stays connected but stops polling
    #: may keep it until its client closes.
    expired_lease_to_any_consumer: bool = True
    #: Ephemeral subject pub/sub is available.
    event_bus: bool = False
    #: Durable, replayable event log is available.
    event_log: bool = False
    #: ``Transport.missing()`` can tell whether a queue, registry or stream
    #: exists without creating it (false on Pulsar without ``admin_url``).
    inspect_without_create: bool = True
    #: ``RequestQueue.stats()`` reports ``head_enqueued_at`` (how long the
    #: oldest waiting request has waited): false on Pulsar without
    #: ``admin_url``, where nothing but the admin API can read the
    #: subscription's first unacknowledged message.
    queue_head: bool = True


class Transport(ABC):
    """One connection to one backend, from which queues and registries are made.

    Every object it hands out and the program still holds is closed by
    :meth:`aclose`; one the program dropped is freed, not kept (a
    ``request_queue(name)`` or ``delivery_registry(name).complete(...)`` per
    call costs nothing that piles up; a dropped registry's view stops).
    """

    #: URL scheme of the backend (``memory``, ``sqlite``, ``kafka`` …).
    backend: str
    capabilities: TransportCapabilities

    def __init__(self, config: TransportConfig) -> None:
        self.config = config
        # Weak: the transport closes what is still in use when it closes,
        # but does not keep alive what a program opened per call and dropped
        # (``transport.delivery_registry(reply_to).complete(...)`` in a worker
        # loop kept every registry, ~8 KB a request, until the transport
        # closed). An object with work in progress is held by that work (its
        # tasks, threads, deliveries or pending responses).
        self._resources: weakref.WeakSet[
            RequestQueue | DeliveryRegistry | CapabilityRegistry | EventBus | EventLog
        ] = weakref.WeakSet()
        self._closed = False
        #: The queues this transport's handles share (see _shares_queues).
        self._shared_queues: dict[tuple[str, float, int], SharedQueue] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.config.redacted_url()}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"{self!r} is closed")

    #: Whether this backend's queues pass their ``request_codec`` to
    #: ``decode_request`` (a backend sets it once they do); without it
    #: ``TransportConfig.request_codec`` other than ``native`` is refused.
    _reads_request_codec: ClassVar[bool] = False

    def _with_codec(self, queue: RequestQueue) -> RequestQueue:
        codec = request_codec_for(self.config)
        if codec is not None:
            if not self._reads_request_codec:
                raise UnsupportedFeatureError(
                    f"request_codec={codec.name!r} is not supported on {self.backend}:// "
                    "(kafka:// and memory:// support it)"
                )
            queue.request_codec = codec
        return queue

    async def publish_foreign(self, destination: str, key: bytes | None, body: bytes) -> None:
        """Write ``body`` as one message to ``destination``, a name another
        program chose (on Kafka: a topic, used as given: no namespace, no
        name rewriting), keyed by ``key``. For answering programs that name
        their own reply destination, such as AgentEnsemble's ``TOPIC``
        delivery (:mod:`transport.interop.agentensemble`).

        Guarantees: returns once the broker durably accepted the message
        (Kafka: acks=all delivery report).
        Raises: UnsupportedFeatureError (this backend has no such thing;
        the default), TransientTransportError, PermanentTransportError.
        """
        raise UnsupportedFeatureError(f"{self.backend}:// cannot publish to a foreign destination")

    # -- what backends implement -----------------------------------------
    @abstractmethod
    def _open_queue(self, name: str, *, lease_seconds: float, max_attempts: int) -> RequestQueue:
        """Build a queue handle for a validated name (may connect lazily)."""

    #: Whether the handles :meth:`request_queue` returns share one queue
    #: (one :meth:`_open_queue`) per name and settings, closed with the last
    #: handle (see :mod:`transport._spi.shared`): for a backend whose queue
    #: handle takes messages ahead of its polls (prefetch, pull buffers).
    _shares_queues: ClassVar[bool] = False

    def _queue_handle(self, name: str, *, lease_seconds: float, max_attempts: int) -> RequestQueue:
        """The handle :meth:`request_queue` returns: a new :meth:`_open_queue`,
        or, if the backend :attr:`_shares_queues`, a handle on the queue
        this transport shares for ``name`` and these settings."""
        if not self._shares_queues:
            return self._open_queue(name, lease_seconds=lease_seconds, max_attempts=max_attempts)
        key = (name, lease_seconds, max_attempts)
        shared = self._shared_queues.get(key)
        if shared is None:  # the last handle's close or aclose() forgets it
            shared = self._shared_queues[key] = SharedQueue(
                key,
                lambda: self._open_queue(
                    name, lease_seconds=lease_seconds, max_attempts=max_attempts
                ),
                self._forget_shared,
                self.operation_timeout,
            )
        return shared.handle()

    def _forget_shared(self, shared: SharedQueue) -> None:
        if self._shared_queues.get(shared.key) is shared:
            del self._shared_queues[shared.key]

    #: Whether this backend keeps every queue in its own store (nothing
    #: per queue on a broker, :meth:`_broker_objects` empty), so that a
    #: queue handle's ``stats()`` tells, without creating anything, whether
    #: a priority level above a worker's holds requests. Backends with
    #: broker objects are asked whether those exist instead.
    _levels_by_stats: ClassVar[bool] = False

    async def _levels_above(
        self, name: str, levels: int, *, lease_seconds: float, max_attempts: int
    ) -> str | None:
        """The warning for priority queue ``name`` polled with ``levels``
        levels whose higher levels (``name__p{levels}`` and up, to the most
        levels a priority queue may have) exist on the broker, or, where
        :attr:`_levels_by_stats`, hold requests: producers opened with more
        levels enqueue there, and no poll of this queue takes what they do.
        ``None`` if there are none, or the backend cannot tell without
        creating them. Creates nothing."""
        above = {k: f"{name}__p{k}" for k in range(levels, MAX_PRIORITY_LEVELS)}
        if not above:
            return None
        if any(self._broker_objects("queue", level) for level in above.values()):
            try:
                plan = ProvisionPlan(queues={name: MAX_PRIORITY_LEVELS})
                absent = {step.name for step in await self.missing(plan)}
            except UnsupportedFeatureError:
                return None
            present = [k for k, level in above.items() if level not in absent]
            where = "exist on the broker"
        elif self._levels_by_stats:
            present = []
            for k, level in above.items():
                queue = self._open_queue(
                    level, lease_seconds=lease_seconds, max_attempts=max_attempts
                )
                try:
                    stats = await queue.stats()
                finally:
                    await queue.aclose()
                if stats.depth or stats.in_flight or stats.delayed:
                    present.append(k)
            where = "hold requests"
        else:
            return None
        if not present:
            return None
        shown = ", ".join(str(k) for k in present)
        return (
            f"priority queue {name!r} is polled with {levels} levels (0-{levels - 1}), but its "
            f"level(s) {shown} {where}: producers opened with more levels enqueue there, and "
            f"no poll of this queue takes those requests. Open it with levels={present[-1] + 1}, "
            "as they do."
        )

    def _open_level_queues(
        self, name: str, levels: int, *, lease_seconds: float, max_attempts: int
    ) -> list[RequestQueue]:
        """Build the queue handles of the levels of priority queue ``name``
        (``name__p0`` … ``name__p{levels-1}``). A backend whose consumers
        belong to groups overrides this to make the levels one member."""
        return [
            self._open_queue(
                f"{name}__p{level}", lease_seconds=lease_seconds, max_attempts=max_attempts
            )
            for level in range(levels)
        ]

    @abstractmethod
    def _open_keyed_log(self, kind: str, name: str) -> KeyedLog:
        """Build the keyed log behind a registry; ``kind`` is ``delivery`` or
        ``capability``, ``name`` a validated name."""

    @abstractmethod
    async def health(self) -> HealthStatus:
        """Check that the backend is reachable and usable.

        Guarantees: never raises for an unreachable backend; reports ``ok=False``.
        """

    @property
    def operation_timeout(self) -> float:
        """Seconds within which an operation against an unreachable backend
        fails with ``TransientTransportError`` (the first one included; the
        backend's own option sets it, 30 s at most by default)."""
        return DEFAULT_OPERATION_TIMEOUT

    def _check_usable(self, features: frozenset[str]) -> None:  # noqa: B027 - optional hook
        """Raise ``ConfigurationError`` if a capability in ``features`` that
        this backend offers cannot work with the server as found (NATS
        without JetStream). Backends that can tell override this; it must not
        touch the network."""

    async def _verify_backend(self, features: frozenset[str]) -> None:
        """The up-front check behind :meth:`verify`. Backends override it to
        tell a misconfiguration (``ConfigurationError``) or refused
        credentials (``PermanentTransportError``) from an unreachable broker;
        this default asks :meth:`health`."""
        status = await self.health()
        if not status.ok:
            raise TransientTransportError(
                f"{self.backend}:// backend at {self.config.redacted_url()} is not usable: "
                f"{status.detail}"
            )

    async def verify(self, features: Iterable[str] | None = None) -> None:
        """Check now that the backend is reachable and that ``features``
        (capability flag names; ``None``: every capability this backend
        offers) can be used, for services that should refuse to start
        without their broker.

        Guarantees: returns or raises within :attr:`operation_timeout`
        (plus a few seconds of scheduling slack).
        Raises: ValueError (unknown capability name), UnsupportedFeatureError
        (the backend lacks one), ConfigurationError (the server is not set up
        for one, e.g. NATS without JetStream), PermanentTransportError
        (credentials or TLS refused), TransientTransportError (unreachable).
        """
        self._check_open()
        wanted = self._features(features)
        missing = sorted(f for f in wanted if not getattr(self.capabilities, f))
        if missing:
            raise UnsupportedFeatureError(
                f"the {self.backend}:// backend lacks required capabilities: {', '.join(missing)}"
            )
        self._check_usable(wanted)
        try:
            async with asyncio.timeout(self.operation_timeout + 5.0):
                await self._verify_backend(wanted)
        except TimeoutError as exc:
            raise TransientTransportError(
                f"{self.backend}:// backend at {self.config.redacted_url()} did not answer "
                f"within {self.operation_timeout:g} s"
            ) from exc

    def _features(self, features: Iterable[str] | None) -> frozenset[str]:
        if features is None:
            flags = self.capabilities.model_dump()
            return frozenset(name for name, offered in flags.items() if offered)
        if isinstance(features, str):  # a single name, not its letters
            features = [features]
        wanted = frozenset(features)
        unknown = wanted - set(TransportCapabilities.model_fields)
        if unknown:
            raise ValueError(f"unknown capability name(s): {', '.join(sorted(unknown))}")
        return wanted

    def _open_event_bus(self) -> EventBus:
        """Backends with ``capabilities.event_bus`` override this."""
        raise UnsupportedFeatureError(
            f"the {self.backend}:// backend has no event bus (capability 'event_bus' is false); "
            "use nats://, redis:// or memory:// for ephemeral pub/sub"
        )

    def _open_event_log(self) -> EventLog:
        """Backends with ``capabilities.event_log`` override this."""
        raise UnsupportedFeatureError(
            f"the {self.backend}:// backend has no event log (capability 'event_log' is false)"
        )

    async def _close_backend(self) -> None:  # noqa: B027 - optional hook
        """Release backend connections; called once by :meth:`aclose`."""

    # -- provisioning and checks (backends with broker objects override) ---
    def _broker_objects(self, kind: ObjectKind, name: str) -> list[str]:
        """Names of the broker objects (topics, streams, buckets) behind one
        object of a plan; none where nothing is made per object (the
        in-process backends keep everything in their store)."""
        return []

    async def _existing(self, objects: list[str]) -> set[str]:
        """Which of ``objects`` exist, without creating anything."""
        return set(objects)

    async def _create(self, kind: ObjectKind, name: str) -> None:  # noqa: B027
        """Create (idempotently) every broker object of one plan object."""

    async def _doctor(self, plan: ProvisionPlan | None) -> list[DoctorFinding]:
        """Findings about the broker and the objects of ``plan`` (``None``:
        every object of this namespace the backend can list)."""
        return []

    # -- public API -------------------------------------------------------
    def request_queue(
        self,
        name: str,
        *,
        lease_seconds: float | timedelta | None = None,
        max_attempts: int | None = None,
    ) -> RequestQueue:
        """A handle on the durable queue ``name`` (created on first use).

        Cheap to call for every poll: on backends whose consumers take
        messages ahead of their polls, the handles of one transport share
        one consumer per name and settings, closed with the last handle
        that polled (``transport._spi.shared``). Closing a handle gives back
        the deliveries it handed out and did not settle.

        ``lease_seconds`` and ``max_attempts`` default to the config's.
        Raises: InvalidNameError, ClosedResourceError, ValueError.
        """
        self._check_open()
        validate_name(name, "queue name")
        lease = (
            lease_seconds.total_seconds()
            if isinstance(lease_seconds, timedelta)
            else (lease_seconds or self.config.lease_seconds)
        )
        if lease <= 0:
            raise ValueError("lease_seconds must be positive")
        attempts = max_attempts if max_attempts is not None else self.config.max_attempts
        if attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        handle = self._queue_handle(name, lease_seconds=lease, max_attempts=attempts)
        queue = _instrument(self._with_codec(handle))
        if not isinstance(handle, SharedQueueHandle):
            # A shared queue is closed by aclose itself (see _shared_queues):
            # a program opening a handle per poll does not pile them up here.
            self._resources.add(queue)
        return queue

    def priority_queue(
        self,
        name: str,
        levels: int = 3,
        aging_interval: timedelta | float = timedelta(minutes=5),
        *,
        lease_seconds: float | timedelta | None = None,
        max_attempts: int | None = None,
        policy: AgingPolicy | None = None,
    ) -> PriorityRequestQueue:
        """A :class:`PriorityRequestQueue` over one queue per level
        (``name__p0`` … ``name__p{levels-1}``) of this backend; with one
        level, over the plain queue ``name``, as an ``Ensemble`` of
        ``priority_levels=1``, ``Network``, the outbox and provisioning take
        one level to be (a producer can open ``priority_queue(cap.queue,
        levels=cap.priority_levels)`` for any advertisement).

        Raises: InvalidNameError, ValueError (levels < 1, interval ≤ 0).
        """
        self._check_open()
        validate_name(name, "queue name")
        policy = policy or AgingPolicy(levels=levels, aging_interval=aging_interval)
        lease = (
            lease_seconds.total_seconds()
            if isinstance(lease_seconds, timedelta)
            else (lease_seconds or self.config.lease_seconds)
        )
        attempts = max_attempts if max_attempts is not None else self.config.max_attempts
        if policy.levels == 1:
            # It was name__p0, a queue no one-level consumer reads: requests
            # enqueued that way to a one-level ensemble were never served.
            opened = [self._open_queue(name, lease_seconds=lease, max_attempts=attempts)]
        else:
            opened = self._open_level_queues(
                name, policy.levels, lease_seconds=lease, max_attempts=attempts
            )
        queues = [_instrument(self._with_codec(queue)) for queue in opened]
        pq = PriorityRequestQueue(
            name,
            queues,
            policy=policy,
            level_check=functools.partial(
                self._levels_above,
                name,
                policy.levels,
                lease_seconds=queues[0].lease_seconds,
                max_attempts=queues[0].max_attempts,
            ),
        )
        self._resources.add(pq)
        return pq

    def delivery_registry(self, name: str) -> DeliveryRegistry:
        """The delivery registry ``name`` (usually the caller's inbox name,
        used as ``reply_to``).

        Raises: InvalidNameError, ClosedResourceError.
        """
        self._check_open()
        validate_name(name, "delivery registry name")
        registry = DeliveryRegistry(
            name,
            self._open_keyed_log("delivery", name),
            ttl_seconds=self.config.registry_ttl_seconds,
            max_payload_bytes=self.config.max_payload_bytes,
            ready_timeout=self.operation_timeout,
        )
        self._resources.add(registry)
        return registry

    def capability_registry(self) -> CapabilityRegistry:
        """The deployment's shared capability registry.

        Raises: ClosedResourceError.
        """
        self._check_open()
        registry = CapabilityRegistry(
            self._open_keyed_log("capability", "capabilities"),
            lease_seconds=self.config.capability_lease_seconds,
            ready_timeout=self.operation_timeout,
        )
        self._resources.add(registry)
        return registry

    def event_bus(self) -> EventBus:
        """Ephemeral subject pub/sub (NATS core, in-process).

        Raises: UnsupportedFeatureError if the backend has none.
        """
        self._check_open()
        bus = self._open_event_bus()
        self._resources.add(bus)
        return bus

    def event_log(self) -> EventLog:
        """Durable, replayable event streams.

        Raises: UnsupportedFeatureError if the backend has none.
        """
        self._check_open()
        event_log = self._open_event_log()
        self._resources.add(event_log)
        return event_log

    async def missing(self, plan: ProvisionPlan) -> list[ProvisionStep]:
        """The objects of ``plan`` of which some broker object does not
        exist. Creates nothing (read-only commands call this first).

        Raises: UnsupportedFeatureError (the backend cannot tell without
        creating; see its guide), TransportError (backend unreachable).
        """
        self._check_open()
        targets = [(kind, name, self._broker_objects(kind, name)) for kind, name in plan.objects()]
        found = await self._existing([o for _, _, objects in targets for o in objects])
        steps: list[ProvisionStep] = []
        for kind, name, objects in targets:
            absent = [o for o in objects if o not in found]
            if absent:
                steps.append(
                    ProvisionStep(
                        kind=kind,
                        name=name,
                        broker_objects=objects,
                        missing_objects=absent,
                        status="missing",
                    )
                )
        return steps

    async def provision(self, plan: ProvisionPlan, *, dry_run: bool = False) -> list[ProvisionStep]:
        """Create every broker object ``plan`` needs, with the settings the
        library's guarantees rely on (retention, compaction, replicas);
        idempotent. With ``dry_run`` nothing is created: the steps say what
        exists and what is missing (``unknown`` where the backend cannot look
        without creating: Pulsar without ``admin_url``; there a real run
        creates what is missing and reports ``ensured``).

        Raises: TransportError (backend unreachable, no right to create),
        ConfigurationError (an existing object voids a guarantee).
        """
        self._check_open()
        targets = [(kind, name, self._broker_objects(kind, name)) for kind, name in plan.objects()]
        try:
            found: set[str] | None = await self._existing(
                [o for _, _, objects in targets for o in objects]
            )
        except UnsupportedFeatureError:  # the backend cannot look without creating
            found = None
        steps: list[ProvisionStep] = []
        for kind, name, objects in targets:
            absent = objects if found is None else [o for o in objects if o not in found]
            status: ProvisionStatus
            if not absent:
                status = "exists"
            elif dry_run:
                status = "missing" if found is not None else "unknown"
            else:
                await self._create(kind, name)
                status = "created" if found is not None else "ensured"
            steps.append(
                ProvisionStep(
                    kind=kind,
                    name=name,
                    broker_objects=objects,
                    missing_objects=absent,
                    status=status,
                )
            )
        return steps

    async def doctor(self, plan: ProvisionPlan | None = None) -> DoctorReport:
        """Check the live deployment against what the library's guarantees
        need (durability settings of the broker, retention, compaction and
        replicas of the objects of ``plan``, or of every object of this
        namespace the backend can list). Creates nothing.

        Guarantees: never raises for an unreachable backend (that is a
        finding of severity ``error``).
        """
        self._check_open()
        try:
            findings = await self._doctor(plan)
        except Exception as exc:
            findings = [
                DoctorFinding(
                    severity="error",
                    subject=self.config.redacted_url(),
                    finding=f"could not check the deployment: {exc}",
                    fix="make the backend reachable with the configured credentials",
                    guarantee="every guarantee (nothing could be checked)",
                )
            ]
        return DoctorReport(backend=self.backend, findings=findings)

    async def aclose(self) -> None:
        """Close every queue, registry, bus and log made from this transport,
        then the connection. Idempotent.

        Guarantees: every resource is closed even if another one's close
        fails (those errors are swallowed); requests leased and not settled
        go back for redelivery; a ``poll`` still waiting ends with
        ``ClosedResourceError``.
        Raises: only what the backend's own connection close raises.
        """
        if self._closed:
            return
        self._closed = True
        resources, self._resources = list(self._resources), weakref.WeakSet()
        shared, self._shared_queues = self._shared_queues, {}
        for queue in shared.values():
            queue.closing = True  # no consumer opens while the others close
        await asyncio.gather(*(s.end_polls() for s in shared.values()), return_exceptions=True)
        resources += [queue for s in shared.values() for queue in s.backend_handles()]
        await asyncio.gather(*(r.aclose() for r in resources), return_exceptions=True)
        await finish_closing_dropped(self.operation_timeout)
        await self._close_backend()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            # An event being handled when the exception ended the block is
            # read again by its cursor (see EventReader.aclose).
            for resource in list(self._resources):
                if isinstance(resource, EventLog):
                    resource._keep_last_events()
        await self.aclose()


def _instrument(queue: RequestQueue) -> RequestQueue:
    if not metrics_enabled():
        return queue
    return InstrumentedRequestQueue(queue, get_metrics_sink())


class TransportFactory(Protocol):
    """What a ``transport.backends`` entry point resolves to."""

    async def __call__(self, config: TransportConfig) -> Transport: ...
