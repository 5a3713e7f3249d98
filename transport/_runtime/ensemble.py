"""The ensemble runtime: what users actually run.

An :class:`Ensemble` is a named service with a handler per task. It polls its
queue (``concurrency`` requests at a time), runs the handler, records the
response in the caller's delivery registry (``reply_to``) and only then acks —
so a crash anywhere before the ack means a redelivery, never a lost request
or a lost answer. Duplicate deliveries of a request that was already answered
are acked without running the handler again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import math
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Self, TypeVar

from tenacity import RetryCallState, wait_exponential_jitter
from tenacity.wait import wait_base

from transport._ops.tracing import TRACEPARENT, reset_current, set_current
from transport._spi.metrics import get_metrics_sink, metrics_enabled, observer
from transport._spi.models import Capability, WorkRequest, WorkResponse, utcnow
from transport._spi.naming import validate_name
from transport._spi.outage import OutageLog
from transport._spi.priority import AgingPolicy, PriorityRequestQueue
from transport._spi.queue import REQUEUED_HEADER, Delivery, RequestQueue
from transport._spi.registries import CapabilityRegistry, DeliveryRecord, DeliveryRegistry
from transport._spi.transport import Transport
from transport.errors import (
    ClosedResourceError,
    ConfigurationError,
    InvalidMessageError,
    PermanentTransportError,
    TransientTransportError,
    TransportError,
)

__all__ = [
    "Ensemble",
    "Handler",
    "PermanentTaskError",
    "ResponseHook",
    "RetryTaskError",
    "TaskContext",
    "TaskSpec",
]

#: A response-delivery hook (``Ensemble(respond=...)``): called with every
#: request and its response before the ``reply_to`` registry; ``True`` means
#: it delivered the response (the registry is not used). It raises
#: PermanentTransportError for a response that can never be delivered (the
#: request is then dead-lettered with that error) and TransientTransportError
#: like a registry. Example: :class:`transport.interop.agentensemble.AgentEnsembleResponder`.
ResponseHook = Callable[[WorkRequest, WorkResponse], Awaitable[bool]]

log = logging.getLogger("transport.runtime")


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


#: How long a stopping ensemble waits for a released handler to end.
_IGNORED_CANCEL_S = 5.0

#: How long a cancelled ensemble waits for its capability withdrawals.
_CANCELLED_WITHDRAW_S = 1.0

#: The longest pause between two tries of a settling step in an outage:
#: short, because once the broker is back a lease that ran out meanwhile
#: hands the request to another worker, which runs it again unless the
#: response is recorded first.
_SETTLE_RETRY_MAX_S = 2.0

T = TypeVar("T")


def _check_count(name: str, value: object) -> None:
    """Raises ValueError unless ``value`` is an int of at least 1 (not a
    bool, not a float): it failed only at start, or served nothing."""
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")


def _check_seconds(name: str, value: object, *, zero: bool = False) -> None:
    """Raises ValueError unless ``value`` is a finite number of seconds above
    0 (or 0 with ``zero``): a negative poll timeout made every poll fail."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = "0 or more" if zero else "above 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")


def _described(exc: BaseException) -> str:
    """``Type: message`` of an exception, also when its ``__str__`` raises
    (a handler's own exception class: the worker must go on)."""
    try:
        text = str(exc)
    except Exception:
        text = "(its message could not be read)"
    return f"{type(exc).__name__}: {text}"


class PermanentTaskError(Exception):
    """Raise from a handler to fail the request without retrying: it is
    dead-lettered and the caller gets a ``failed`` response at once."""


class RetryTaskError(Exception):
    """Raise from a handler to retry later (optionally after ``delay`` s)."""

    def __init__(self, message: str = "", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


@dataclass
class TaskContext:
    """What a handler gets: the request and the means to keep its lease."""

    request: WorkRequest
    delivery: Delivery
    ensemble: Ensemble

    @property
    def payload(self) -> Any:
        """The request's payload, as the caller sent it. Never raises."""
        return self.request.payload

    @property
    def attempt(self) -> int:
        """1-based delivery count of this request (> 1 on a redelivery).
        Never raises."""
        return self.request.attempt

    @property
    def request_id(self) -> str:
        """The request's id (the same on every redelivery). Never raises."""
        return self.request.request_id

    async def extend(self, seconds: float | None = None) -> bool:
        """Renew the lease now (the runtime also does it periodically).

        Guarantees and raises: as :meth:`Delivery.extend` (``False`` if the
        lease was already lost; TransientTransportError).
        """
        return await self.delivery.extend(seconds)


Handler = Callable[[TaskContext], Awaitable[Any]]


@dataclass
class TaskSpec:
    name: str
    handler: Handler
    kind: Literal["task", "tool"] = "task"
    description: str = ""
    input_schema: dict[str, Any] | None = None
    tags: list[str] = field(default_factory=list)


class Ensemble:
    """A named service: handlers per task, an injected queue or transport.

    Build it with the constructor and register handlers with :meth:`task`
    (decorator) or :meth:`add_task` (fluent)::

        kitchen = Ensemble("kitchen", transport=transport, concurrency=4, priority_levels=3)

        @kitchen.task("cook")
        async def cook(ctx: TaskContext) -> dict:
            return {"dish": ctx.payload["dish"]}

        await kitchen.run()          # until SIGTERM/SIGINT or kitchen.stop()

    ``transport`` gives the queue (``name``, a priority queue when
    ``priority_levels > 1``), the delivery registries responses are routed
    through, and the capability registry it advertises in. ``queue`` injects
    a queue instead (the transport is still needed to route responses).

    Failures: a handler that raises :class:`PermanentTaskError` (or a
    ``PermanentTransportError``) → dead letter + ``failed`` response; any
    other exception → nack with exponential backoff (tenacity), and after the
    queue's ``max_attempts`` → dead letter + ``failed`` response, so a caller
    is never left waiting. An expired ``deadline`` → ``rejected`` response.

    ``respond`` (a :data:`ResponseHook`) delivers responses the caller does
    not collect from a delivery registry, e.g. an AgentEnsemble (Java)
    caller's ``TOPIC`` delivery
    (:class:`transport.interop.agentensemble.AgentEnsembleResponder`). Such
    requests have no ``reply_to``, so a redelivered one is run again and
    answered again (at-least-once; the caller deduplicates by request id).

    Every ``stats_interval`` seconds while the ensemble runs (``None``:
    never) it reads its queue's stats: a metrics sink
    (:func:`set_metrics_sink`) gets the gauges (depth/lag, in flight,
    dead-lettered), and a backlog that grew since the last reading is logged
    (INFO). Start and stop are logged at INFO too (logger
    ``transport.runtime``).
    """

    def __init__(
        self,
        name: str,
        *,
        transport: Transport | None = None,
        queue: RequestQueue | None = None,
        concurrency: int = 4,
        priority_levels: int = 1,
        aging_interval: timedelta | float = timedelta(minutes=5),
        lease_seconds: float | None = None,
        max_attempts: int | None = None,
        shutdown_grace: float = 30.0,
        retry_wait: wait_base | None = None,
        advertise: bool = True,
        poll_timeout: float = 1.0,
        stats_interval: float | None = 15.0,
        respond: ResponseHook | None = None,
    ) -> None:
        self.name = validate_name(name, "ensemble name")
        if transport is None and queue is None:
            raise ConfigurationError("an Ensemble needs a transport or a queue")
        _check_count("concurrency", concurrency)
        _check_count("priority_levels", priority_levels)
        _check_seconds("poll_timeout", poll_timeout)
        _check_seconds("shutdown_grace", shutdown_grace, zero=True)
        if stats_interval is not None:
            _check_seconds("stats_interval", stats_interval)
        if priority_levels > 1:  # its aging interval, checked now rather than at start
            AgingPolicy(levels=priority_levels, aging_interval=aging_interval)
        self.transport = transport
        self.concurrency = concurrency
        self.priority_levels = priority_levels
        self.shutdown_grace = shutdown_grace
        self._aging_interval = aging_interval
        self._lease_seconds = lease_seconds
        self._max_attempts = max_attempts
        self._queue = queue
        self._owns_queue = queue is None
        self._retry_wait = retry_wait or wait_exponential_jitter(
            multiplier=0.5, max=60.0, jitter=0.5
        )
        self._advertise = advertise and transport is not None
        self._poll_timeout = poll_timeout
        self._stats_interval = stats_interval
        self._respond_hook = respond
        self._gauges: asyncio.Task[None] | None = None
        self._tasks: dict[str, TaskSpec] = {}
        self._registries: dict[str, DeliveryRegistry] = {}
        #: The registration of each request being handled (read before its
        #: handler runs), by request id.
        self._registrations: dict[str, DeliveryRecord] = {}
        self._capabilities: CapabilityRegistry | None = None
        self._workers: list[asyncio.Task[None]] = []
        # Workers running a handler, each with the delivery it handles.
        self._busy: dict[asyncio.Task[None], Delivery] = {}
        #: Requests whose handler was cancelled with its worker (by the
        #: close, or by ``asyncio.run`` ending with the ensemble running):
        #: the close gives them back uncounted.
        self._interrupted: list[Delivery] = []
        # With concurrency > 1, idle workers share one poll_many for as many
        # requests as they are (see _next): its deliveries wait here, one per
        # idle worker, until each takes its own.
        self._idle = 0
        self._fetch: asyncio.Task[int] | None = None
        self._handoff: collections.deque[Delivery] = collections.deque()
        # Acks run in the background so that a worker takes its next request
        # while the last one's ack is made durable (a flush on some backends).
        self._acking: set[asyncio.Task[None]] = set()
        self._ack_slots = asyncio.Semaphore(max(64, 16 * concurrency))
        self._refresher: asyncio.Task[None] | None = None
        #: This run's id in its advertisements: replicas of one ensemble
        #: (processes running it under the same name) tell theirs apart.
        self.instance = uuid.uuid4().hex
        #: Per task: the latest lease end seen in another replica's advertisement.
        self._others: dict[str, datetime] = {}
        self._follower: asyncio.Task[None] | None = None
        #: Answers to requests the queue dead-lettered on its own (see _exhausted).
        self._answering: set[asyncio.Task[None]] = set()
        self._plain: RequestQueue | None = None
        self._forwarder: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # Each retry loop logs an outage once, a reminder every 30 s, and its end.
        fields = {"ensemble": self.name}  # what self._fields() gives
        self._poll_outage = OutageLog(log, f"ensemble {name}: poll", fields=fields)
        self._settle_outage = OutageLog(log, f"ensemble {name}: settling a request", fields=fields)
        #: Tasks trying a settling step again in an outage (see _settling).
        self._retrying: set[asyncio.Task[Any]] = set()
        #: Request id -> done when this process has recorded its response
        #: (tried again through an outage; see _recording).
        self._recording_now: dict[str, asyncio.Future[None]] = {}
        self._extend_outage = OutageLog(log, f"ensemble {name}: lease extension", fields=fields)
        self._refresh_outage = OutageLog(log, f"ensemble {name}: capability refresh", fields=fields)
        self._follow_outage = OutageLog(
            log, f"ensemble {name}: following the capability registry", fields=fields
        )
        self._forward_outage = OutageLog(
            log, f"ensemble {name}: forwarding from the plain queue", fields=fields
        )
        #: Set by a second stop(): the running handlers are released at once.
        self._forced = asyncio.Event()
        self._started = False
        self._closed = False
        #: Counters of this ensemble's outcomes (also sent to the metrics sink).
        self.counts: dict[str, int] = {
            "completed": 0,
            "failed": 0,
            "rejected": 0,
            "retried": 0,
            "duplicates": 0,
        }

    # -- registration -----------------------------------------------------
    def add_task(
        self,
        name: str,
        handler: Handler,
        *,
        kind: Literal["task", "tool"] = "task",
        description: str = "",
        input_schema: dict[str, Any] | None = None,
        tags: list[str] | None = None,
    ) -> Self:
        """Register ``handler`` for task ``name``; returns ``self`` (fluent).

        Raises: InvalidNameError; ValueError if the task is already registered.
        """
        validate_name(name, "task name")
        if name in self._tasks:
            raise ValueError(f"task {name!r} is already registered on {self.name!r}")
        self._tasks[name] = TaskSpec(
            name, handler, kind, description, input_schema, list(tags or [])
        )
        return self

    def task(
        self,
        name: str | None = None,
        *,
        kind: Literal["task", "tool"] = "task",
        description: str = "",
        input_schema: dict[str, Any] | None = None,
        tags: list[str] | None = None,
    ) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`add_task` (name defaults to the function's,
        the description to the first line of its docstring).

        Raises (when the decorator is applied): InvalidNameError; ValueError
        if the task is already registered.
        """

        if callable(name):
            # ``@ensemble.task`` without parentheses: the function arrived as
            # the name and nothing would be registered under its name.
            raise TypeError(
                "Ensemble.task is used with parentheses: @ensemble.task() or @ensemble.task('name')"
            )

        def register(handler: Handler) -> Handler:
            # Only None falls back to the function's name: an empty name is
            # refused as add_task refuses it (it silently became the name).
            task_name = str(getattr(handler, "__name__", "")) if name is None else name
            doc = description or (handler.__doc__ or "").strip().split("\n")[0]
            self.add_task(
                task_name, handler, kind=kind, description=doc, input_schema=input_schema, tags=tags
            )
            return handler

        return register

    def tool(self, name: str | None = None, **kw: Any) -> Callable[[Handler], Handler]:
        """Like :meth:`task`, advertised as a tool.

        Raises (when the decorator is applied): as :meth:`task`.
        """
        return self.task(name, kind="tool", **kw)

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        """A copy of the registered tasks by name (changing it does not change
        the ensemble). Never raises."""
        return dict(self._tasks)

    # -- lifecycle ----------------------------------------------------------
    @property
    def queue(self) -> RequestQueue:
        """The queue this ensemble serves: the injected one, or else the
        transport's queue named after the ensemble (a priority queue when
        ``priority_levels > 1``), opened on first use and then reused.

        Raises (first use): ClosedResourceError if the transport is closed;
        ValueError for an invalid ``lease_seconds``, ``max_attempts`` or
        ``aging_interval``.
        """
        if self._queue is None:
            assert self.transport is not None
            if self.priority_levels > 1:
                self._queue = self.transport.priority_queue(
                    self.name,
                    levels=self.priority_levels,
                    aging_interval=self._aging_interval,
                    lease_seconds=self._lease_seconds,
                    max_attempts=self._max_attempts,
                )
            else:
                self._queue = self.transport.request_queue(
                    self.name, lease_seconds=self._lease_seconds, max_attempts=self._max_attempts
                )
        return self._queue

    async def start(self) -> None:
        """Advertise the tasks and start the workers; returns at once.
        Any backlog is worked off while new work keeps being accepted.
        A second call does nothing (after a failed call, it tries again).

        Guarantees: the advertisements are durable when this returns, and are
        refreshed in the background before their lease runs out.
        Raises: ConfigurationError if no task is registered; as :attr:`queue`;
        TransientTransportError / PermanentTransportError /
        ClosedResourceError if advertising fails.
        """
        if self._started:
            return
        if not self._tasks:
            raise ConfigurationError(f"ensemble {self.name!r} has no tasks")
        queue = self.queue
        queue.set_exhausted_hook(self._exhausted)
        self._started = True
        if self._advertise:
            assert self.transport is not None
            if self._capabilities is None:
                self._capabilities = self.transport.capability_registry()
            following = asyncio.Event()
            self._follower = asyncio.create_task(
                self._follow_replicas(self._capabilities, following),
                name=f"{self.name}:replicas",
            )
            try:
                await following.wait()  # watching: no later advertisement is missed
                for capability in await self._capabilities.all():
                    self._note(capability)
                await self._advertise_all()
            except BaseException:
                self._started = False  # not started: a later call tries again
                self._follower.cancel()
                await asyncio.gather(self._follower, return_exceptions=True)
                self._follower = None
                raise
            self._refresher = asyncio.create_task(
                self._refresh_loop(), name=f"{self.name}:advertise"
            )
        self._workers = [
            asyncio.create_task(self._worker(queue), name=f"{self.name}:worker-{i}")
            for i in range(self.concurrency)
        ]
        if self._stats_interval:
            self._gauges = asyncio.create_task(self._report_stats(), name=f"{self.name}:stats")
        if self._owns_queue and isinstance(queue, PriorityRequestQueue):
            assert self.transport is not None
            self._plain = self.transport.request_queue(
                self.name, lease_seconds=self._lease_seconds, max_attempts=self._max_attempts
            )
            self._forwarder = asyncio.create_task(
                self._forward(self._plain, queue), name=f"{self.name}:forward"
            )
        log.info(
            "ensemble %s started on %s: queue %s (%s), concurrency %d, tasks %s",
            self.name,
            self._backend(),
            queue.name,
            "1 level" if self.priority_levels == 1 else f"{self.priority_levels} priority levels",
            self.concurrency,
            ", ".join(sorted(self._tasks)),
            extra=self._fields(),
        )

    def stop(self) -> None:
        """Ask the ensemble to stop polling and shut down; call it from the
        event loop's thread. :meth:`run` returns once the shutdown is done.
        Called again while the ensemble is stopping (a second SIGTERM or
        Ctrl-C under :meth:`run`), it stops waiting for the handlers still
        running: they are given back (uncounted) at once, and the shutdown
        goes on (acks in flight, withdrawals, closing). Never raises."""
        if self._stopping.is_set() and not self._forced.is_set():
            log.warning(
                "ensemble %s: asked to stop again; releasing the %d running handler(s) now",
                self.name,
                len(self._busy),
                extra=self._fields(),
            )
            self._forced.set()
        self._stopping.set()

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Start, then serve until :meth:`stop` or SIGTERM/SIGINT; then stop
        polling, let in-flight handlers finish within ``shutdown_grace``
        (the rest are released for redelivery), withdraw, and close.

        Guarantees: the ensemble is closed when this returns or raises, and
        the signal handlers it installed are removed.
        Raises: as :meth:`start` and :meth:`aclose`.
        """
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass  # not the main thread, or not supported here
        try:
            await self.start()
            await self._stopping.wait()
            # The handlers stay while it closes: a second signal makes it
            # release the running handlers instead of waiting out the grace
            # (the default action would end the process with nothing given
            # back: SIGTERM at once, SIGINT with a KeyboardInterrupt).
            await self.aclose()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.aclose()

    async def aclose(self) -> None:
        """Stop and release everything (see :meth:`run`). Idempotent.

        Guarantees: handlers still running after ``shutdown_grace`` are
        cancelled and their requests given back for redelivery without
        counting an attempt (every built-in backend; a backend that cannot
        leaves them to the queue's close, which counts); acks still in
        flight after ``shutdown_grace`` are cancelled too (those requests come
        back and are answered from the recorded response, without running the
        handler again); withdrawal failures are logged, not raised.
        Raises: only what closing the ensemble's own queue raises.
        """
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        # Handlers cancelled before this close (asyncio.run ending with the
        # ensemble running cancels every task) count as in flight.
        in_flight = len(self._busy) + len(self._interrupted)
        interrupted: list[Delivery] = []
        cancelled = False
        if self._gauges is not None:
            self._gauges.cancel()
            await asyncio.gather(self._gauges, return_exceptions=True)
        if self._forwarder is not None:
            self._forwarder.cancel()  # waiting in poll(), cancellation-safe
            await asyncio.gather(self._forwarder, return_exceptions=True)
        if self._plain is not None:
            await self._plain.aclose()
        # Idle workers are waiting in poll(), which is cancellation-safe.
        for worker in self._workers:
            if worker not in self._busy:
                worker.cancel()
        if self._workers:
            try:
                late = await self._within_grace(set(self._workers))
            except asyncio.CancelledError:
                # Cancelled while waiting out the grace: a second Ctrl-C under
                # serving() (asyncio.run then cancels every task), or the
                # program ending during the close. The running handlers are
                # released now, as a second signal under run() does, the close
                # goes on, and the cancellation is raised at its end.
                cancelled = True
                late = {worker for worker in self._workers if worker in self._busy}
                log.warning(
                    "ensemble %s: cancelled while stopping; releasing the %d running "
                    "handler(s) now",
                    self.name,
                    len(late),
                    extra=self._fields(),
                )
            interrupted = [self._busy[worker] for worker in late if worker in self._busy]
            cut_short = cancelled or self._forced.is_set()
            for worker in late:
                log.warning(
                    "ensemble %s: %s %s; releasing it",
                    self.name,
                    "request still being settled (the broker does not answer)"
                    if worker in self._retrying
                    else "handler still running",
                    "with the grace cut short" if cut_short else "at the end of the grace",
                    extra=self._fields(),
                )
                worker.cancel()
            _, stuck = await asyncio.wait(self._workers, timeout=_IGNORED_CANCEL_S)
            if stuck:
                # Its handler caught the cancellation and goes on: waiting
                # for it kept the process from ever stopping.
                log.error(
                    "ensemble %s: %d handler(s) ignored their cancellation (they catch "
                    "CancelledError) %.0f s after being released; stopping without them, "
                    "their requests are given back",
                    self.name,
                    len(stuck),
                    _IGNORED_CANCEL_S,
                    extra=self._fields(),
                )
            await asyncio.gather(
                *(w for w in self._workers if w not in stuck), return_exceptions=True
            )
        # Also those whose workers were cancelled before or by this close.
        interrupted += [d for d in self._interrupted if all(d is not i for i in interrupted)]
        released = len(interrupted)
        # No poll of this process may be waiting when they are given back:
        # it would take them again (NATS redelivers a NAKed message at once)
        # and, cancelled, leave them to their lease.
        await self._release_fetched()
        await self._give_back(interrupted)
        if self._acking:
            _, late = await asyncio.wait(set(self._acking), timeout=self.shutdown_grace)
            for ack in late:
                ack.cancel()  # its request comes back and is answered from the record
            await asyncio.gather(*late, return_exceptions=True)
        if self._answering:
            _, late = await asyncio.wait(set(self._answering), timeout=self.shutdown_grace)
            for answer in late:
                answer.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for background in (self._refresher, self._follower):
            if background is not None:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)
        if self._capabilities is not None and self._tasks:
            await self._withdraw_all(self._capabilities)
        if self._owns_queue and self._queue is not None:
            await self._queue.aclose()  # unsettled deliveries go back for redelivery
        if self._started:
            log.info(
                "ensemble %s stopped: %d in flight at stop, %d finished, %d released for "
                "redelivery; %s",
                self.name,
                in_flight,
                in_flight - released,
                released,
                ", ".join(f"{key} {value}" for key, value in self.counts.items()),
                extra=self._fields(),
            )
        if cancelled:
            raise asyncio.CancelledError

    async def _give_back(self, deliveries: list[Delivery]) -> None:
        """Give back, uncounted, requests fetched for no handler, and those
        whose handlers the shutdown interrupted: stopping a worker is no
        failure of the request, and a job longer than ``shutdown_grace``
        must not use up an attempt at every deploy. (A handler that never
        returns is then tried again at every clean restart without ever
        being dead-lettered; a killed process, a lease that runs out and a
        handler error still count.) One the backend cannot give back
        uncounted, or that was settled meanwhile, is left to the queue's
        close (which counts it) or to its lease."""
        for delivery in deliveries:
            try:
                await delivery._release_uncounted()
            except TransportError as exc:
                log.info(
                    "ensemble %s: %s not given back uncounted: %s",
                    self.name,
                    delivery.request.request_id,
                    exc,
                    extra=self._fields(delivery.request),
                )

    async def _release_fetched(self) -> None:
        """At stop, after the workers: cancel a shared poll still waiting
        (cancellation-safe) and give back, uncounted, what was fetched for
        workers that stopped before taking it (else the queue's close or the
        lease expiry gives it back)."""
        fetch = self._fetch
        if fetch is not None:
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
        fetched = list(self._handoff)
        self._handoff.clear()
        await self._give_back(fetched)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Self]:
        """Serve while the ``async with`` body runs — the ensemble and its
        callers in one script or test::

            async with kitchen.serving():
                response = await front_desk.request("kitchen", "cook", {...})

        :meth:`run` is the form for a worker process (it serves until
        SIGTERM); this one serves until the body ends, then stops as
        :meth:`run` does on SIGTERM (in-flight handlers get
        ``shutdown_grace``, the rest are released, tasks withdrawn).

        Guarantees: advertised and working when the body starts; closed when
        the block is left, also on an exception (which propagates).
        Raises: as :meth:`start` (on entry) and :meth:`aclose` (on exit).
        """
        await self.start()
        try:
            yield self
        finally:
            await self.aclose()

    async def _withdraw_all(self, registry: CapabilityRegistry) -> None:
        """Withdraw every task at once. When the task closing the ensemble is
        being cancelled (``asyncio.run`` ending with the ensemble still
        running), wait at most :data:`_CANCELLED_WITHDRAW_S`: the client's own
        background tasks are being cancelled too, so a broker round trip may
        never complete, and an advertisement not withdrawn expires with its
        lease anyway."""

        async def withdraw(name: str) -> None:
            with contextlib.suppress(TransportError):
                await registry.withdraw(self.name, name)

        kept = self._kept_by_others()
        if kept:
            log.info(
                "ensemble %s: another replica advertises %s; its advertisement stays",
                self.name,
                ", ".join(sorted(kept)),
                extra=self._fields(),
            )
        pending = {
            asyncio.ensure_future(withdraw(spec.name))
            for spec in self._tasks.values()
            if spec.name not in kept
        }
        if not pending:
            return
        current = asyncio.current_task()
        bound = _CANCELLED_WITHDRAW_S if current is not None and current.cancelling() else None
        _, late = await asyncio.wait(pending, timeout=bound)
        if late:
            log.warning(
                "ensemble %s: cancelled; %d capability withdrawal(s) unfinished after %.0f s,"
                " left to expire with their lease",
                self.name,
                len(late),
                _CANCELLED_WITHDRAW_S,
                extra=self._fields(),
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- capability advertisement -------------------------------------------
    def _capability(self, spec: TaskSpec) -> Capability:
        return Capability(
            name=spec.name,
            kind=spec.kind,
            ensemble=self.name,
            description=spec.description,
            tags=spec.tags,
            input_schema=spec.input_schema,
            queue=self.name,
            priority_levels=self.priority_levels,
            instance=self.instance,
        )

    def _note(self, capability: Capability | None) -> None:
        """Remember the lease of another replica's advertisement of one of
        this ensemble's tasks."""
        if (
            capability is None
            or capability.ensemble != self.name
            or capability.name not in self._tasks
            or capability.instance == self.instance
            or capability.expires_at is None
        ):
            return
        seen = self._others.get(capability.name)
        if seen is None or capability.expires_at > seen:
            self._others[capability.name] = capability.expires_at

    def _kept_by_others(self) -> set[str]:
        """The tasks another replica advertises and keeps refreshing: its
        last advertisement seen has more than half a lease left (a replica
        refreshes every third of a lease, so a live one always has about two
        thirds left). Stopping, this replica leaves those advertisements in
        place: withdrawing one would hide the ensemble from callers until
        the other replica's next refresh, up to a third of a lease (every
        rolling restart did). The price: replicas that all stop within half
        a lease of each other leave the advertisement to run out with its
        lease, as a crashed one does."""
        assert self.transport is not None
        margin = timedelta(seconds=self.transport.config.capability_lease_seconds / 2)
        now = utcnow()
        return {name for name, until in self._others.items() if until - now > margin}

    async def _follow_replicas(
        self, registry: CapabilityRegistry, following: asyncio.Event
    ) -> None:
        """Follow the advertisements of this ensemble's tasks: note the other
        replicas' (see :meth:`_kept_by_others`), and advertise again at once
        one withdrawn while this replica runs (by a replica that stopped
        without having seen this one)."""
        while True:
            try:
                changes = registry.watch()
            except ClosedResourceError:
                following.set()
                return
            following.set()
            try:
                async for change in changes:
                    self._follow_outage.recovered()
                    if change.ensemble != self.name or change.name not in self._tasks:
                        continue
                    if change.kind == "advertised":
                        self._note(change.capability)
                    elif change.kind == "withdrawn":
                        # Whoever advertised it last has stopped: a replica
                        # still running advertises it again (as below), and
                        # is noted then. Kept, its lease would make this
                        # replica leave its own advertisement at stop.
                        self._others.pop(change.name, None)
                    if change.kind == "withdrawn" and not self._stopping.is_set():
                        log.info(
                            "ensemble %s: %s was withdrawn while this replica runs;"
                            " advertising it again",
                            self.name,
                            change.name,
                            extra=self._fields(),
                        )
                        await registry.advertise(self._capability(self._tasks[change.name]))
            except ClosedResourceError:
                return
            except TransportError as exc:
                self._follow_outage.failed(exc, "retrying every second")
                await asyncio.sleep(1.0)
            finally:
                await changes.aclose()

    async def _advertise_all(self) -> None:
        assert self._capabilities is not None
        for spec in self._tasks.values():
            await self._capabilities.advertise(self._capability(spec))

    async def _refresh_loop(self) -> None:
        assert self.transport is not None
        period = max(self.transport.config.capability_lease_seconds / 3, 0.1)
        while True:
            await asyncio.sleep(period)
            try:
                await self._advertise_all()
            except ClosedResourceError as exc:
                self._closed_under(exc)
                return
            except TransportError as exc:
                self._refresh_outage.failed(exc, f"again in {period:g} s")
            else:
                self._refresh_outage.recovered()

    def _backend(self) -> str:
        if self.transport is None:
            return type(self.queue).__name__
        return self.transport.config.redacted_url()

    async def _report_stats(self) -> None:
        """Every ``stats_interval`` s: read the queue's stats (which refreshes
        the gauges of a metrics sink: depth — the lag on Kafka —, in flight,
        dead-lettered), and log a line when the backlog grew since the last
        reading (the workers are not keeping up), and a warning once when it
        stands still: the same request next in line at two readings, nothing
        handled here meanwhile, and no handler running (no worker of the
        queue is getting requests)."""
        assert self._stats_interval
        last: int | None = None
        last_head: datetime | None = None
        last_handled = -1
        stalled = False  # said once per stall
        if not metrics_enabled():
            # Only the backlog line needs it: no broker query at start-up.
            await asyncio.sleep(self._stats_interval)
        while True:
            try:
                stats = await self.queue.stats()
            except TransportError as exc:
                log.debug("ensemble %s: queue stats failed: %s", self.name, exc)
            else:
                depth = stats.depth
                if depth is not None and last is not None and depth > last:
                    head = stats.head_enqueued_at
                    log.info(
                        "ensemble %s: backlog growing: %d waiting (was %d %gs ago), "
                        "%s in flight, %d dead-lettered%s",
                        self.name,
                        depth,
                        last,
                        self._stats_interval,
                        "?" if stats.in_flight is None else stats.in_flight,
                        stats.dead_lettered,
                        ""
                        if head is None
                        else f"; the next in line has waited {(utcnow() - head).total_seconds():.1f}s",
                        extra={**self._fields(), "depth": depth},
                    )
                head = stats.head_enqueued_at
                handled = sum(self.counts.values())
                if (
                    depth
                    and last
                    and depth >= last
                    and head is not None
                    and head == last_head
                    and handled == last_handled
                    and not self._busy
                ):
                    if not stalled:
                        stalled = True
                        log.warning(
                            "ensemble %s: backlog not moving: %d waiting, the next in line "
                            "(enqueued %.0fs ago) not taken in %gs, and this process is idle; "
                            "no worker of the queue is getting requests (a stalled consumer "
                            "group, a broker problem; or, on Kafka, workers standing by while "
                            "another holds the partitions)",
                            self.name,
                            depth,
                            (utcnow() - head).total_seconds(),
                            self._stats_interval,
                            extra={**self._fields(), "depth": depth},
                        )
                else:
                    stalled = False
                last_head, last_handled = head, handled
                if depth is not None:
                    last = depth
            await asyncio.sleep(self._stats_interval)

    async def _forward(self, plain: RequestQueue, queue: PriorityRequestQueue) -> None:
        """Move requests from the ensemble's plain queue (where a caller that
        did not know its priority levels sent them, e.g. before the ensemble
        first advertised) to the middle level of its priority queue, keeping
        request id and enqueue time (so aging counts from the first enqueue).
        Acked only after the copy is enqueued: a crash in between means a
        duplicate, answered from the recorded response, never a loss."""
        level = self.priority_levels // 2
        while not self._stopping.is_set():
            try:
                delivery = await plain.poll(self._poll_timeout)
                if delivery is not None:
                    await queue.enqueue(delivery.request, priority=level)
                    await delivery.ack()
                self._forward_outage.recovered()
            except ClosedResourceError as exc:
                self._closed_under(exc)
                return
            except TransportError as exc:
                self._forward_outage.failed(exc, f"retrying ({plain.name} to {queue.name})")
                await asyncio.sleep(1.0)

    async def _within_grace(self, tasks: set[asyncio.Task[None]]) -> set[asyncio.Task[None]]:
        """Wait for ``tasks`` for ``shutdown_grace`` at most, or until
        :meth:`stop` is called again; the ones still running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_grace
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            while tasks and not self._forced.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                done, _ = await asyncio.wait(
                    tasks | {forced}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                tasks = tasks - done
        finally:
            forced.cancel()
        return {t for t in tasks if not t.done()}

    def _closed_under(self, exc: ClosedResourceError) -> None:
        """The transport (or the ensemble's queue) was closed while the
        ensemble runs: it cannot work any more. Stop, with one error (a
        background loop retrying every second would log forever, and
        :meth:`run` would never return)."""
        if self._stopping.is_set():
            return  # stopping anyway
        log.error(
            "ensemble %s: %s while the ensemble is running; stopping it"
            " (close an ensemble before its transport)",
            self.name,
            exc,
            extra=self._fields(),
        )
        self._stopping.set()

    # -- the work loop --------------------------------------------------------
    async def _next(self, queue: RequestQueue) -> Delivery | None:
        """The next request for this idle worker; ``None`` if none came within
        the poll timeout.

        With ``concurrency`` > 1 the idle workers share one
        :meth:`RequestQueue.poll_many` for as many requests as there are idle
        workers when it starts (a worker that becomes idle later waits
        for it too, and starts the next if it got nothing): one leasing
        round trip for the lot where the backend has a batch path, and never
        more requests held than workers free to run them (a batch does not
        wait for a busy worker). Its deliveries are taken at once, one per
        waiting worker."""
        if self.concurrency == 1:
            return await queue.poll(self._poll_timeout)
        self._idle += 1
        try:
            while True:
                if self._handoff:
                    return self._handoff.popleft()
                fetch = self._fetch
                if fetch is None:
                    fetch = self._fetch = asyncio.create_task(
                        self._fetch_for_idle(queue), name=f"{self.name}:poll"
                    )
                # Shielded: a waiting worker cancelled at stop leaves the
                # poll to the others (the stop cancels it after the workers).
                await asyncio.shield(fetch)
                if not self._handoff and fetch.result() == 0:
                    return None  # nothing came within the poll timeout
        finally:
            self._idle -= 1

    async def _fetch_for_idle(self, queue: RequestQueue) -> int:
        try:
            # Counted when the poll starts, so that workers started together
            # (or freed in the same loop iteration) are asked for together.
            batch = await queue.poll_many(max(1, self._idle), self._poll_timeout)
            self._handoff.extend(batch)
            return len(batch)
        finally:
            self._fetch = None

    async def _worker(self, queue: RequestQueue) -> None:
        current = asyncio.current_task()
        assert current is not None
        while not self._stopping.is_set():
            try:
                delivery = await self._next(queue)
            except ClosedResourceError as exc:
                self._closed_under(exc)
                return
            except TransportError as exc:
                self._poll_outage.failed(exc, "retrying every second")
                await asyncio.sleep(1.0)
                continue
            except Exception:
                # Not the broker (a metrics sink or a queue wrapper that
                # raised): the worker goes on. It used to end without a
                # word, and the ensemble served nothing more.
                log.exception("ensemble %s: poll failed", self.name, extra=self._fields())
                await asyncio.sleep(1.0)
                continue
            self._poll_outage.recovered()
            if delivery is None:
                continue
            self._busy[current] = delivery
            try:
                await self._handle(delivery)
            except asyncio.CancelledError:
                self._interrupted.append(delivery)
                raise
            except TransportError as exc:
                # Settling failed for good (the lease was lost while the
                # broker was unreachable, or a permanent error): the request
                # comes back. Never a loss.
                log.warning(
                    "ensemble %s: could not settle %s: %s",
                    self.name,
                    delivery.request.request_id,
                    exc,
                    extra=self._fields(delivery.request),
                )
            except Exception:
                # As above; the lease runs out and the request comes back.
                log.exception(
                    "ensemble %s: handling %s failed",
                    self.name,
                    delivery.request.request_id,
                    extra=self._fields(delivery.request),
                )
            finally:
                self._busy.pop(current, None)

    def _fields(self, request: WorkRequest | None = None) -> dict[str, Any]:
        """Structured-log fields (see :class:`transport.JsonLogFormatter`)."""
        if request is None:
            return {"ensemble": self.name}
        return {
            "ensemble": self.name,
            "task": request.task,
            "request_id": request.request_id,
            "attempt": request.attempt,
        }

    def _labels(self, request: WorkRequest) -> dict[str, str]:
        return {"ensemble": self.name, "task": request.task}

    def _registry(self, name: str) -> DeliveryRegistry:
        registry = self._registries.get(name)
        if registry is None:
            assert self.transport is not None
            registry = self._registries[name] = self.transport.delivery_registry(name)
        return registry

    async def _already_answered(self, request: WorkRequest) -> bool:
        """True if the request need not run: its caller's registry holds its
        response already, or no registration at all — the response was
        collected (a redelivery after the caller had its answer), the
        registration expired, or there never was one; a response would be
        refused (:meth:`DeliveryRegistry.complete` returns ``False``)."""
        if request.reply_to is None or self.transport is None:
            return False
        if REQUEUED_HEADER in request.headers:
            # Put back from the dead letters by an operator, to run again:
            # its caller was answered (``failed``) before it was dead-lettered,
            # so the new response cannot reach it (``complete`` refuses it).
            log.info(
                "ensemble %s: %s was requeued from the dead letters; running it again "
                "(its caller was answered already and gets no new response)",
                self.name,
                request.request_id,
                extra=self._fields(request),
            )
            return False
        record = await self._registry(request.reply_to).record(request.request_id)
        if record is not None and record.state == "pending":
            # Kept for the completion: it then reads only whether another
            # worker answered meanwhile (one read, not two).
            self._registrations[request.request_id] = record
        if record is None:
            log.info(
                "ensemble %s: %s not run: no caller awaits its response in registry %r "
                "(collected already, expired, or never registered)",
                self.name,
                request.request_id,
                request.reply_to,
                extra=self._fields(request),
            )
            return True
        return record.state != "pending"

    async def _respond(self, request: WorkRequest, response: WorkResponse) -> str | None:
        """Deliver ``response``: through the ``respond`` hook if it takes it,
        else to the ``reply_to`` registry. Returns why it can never be
        delivered (the caller dead-letters the request), else ``None``."""
        if self._respond_hook is not None:
            try:
                if await self._respond_hook(request, response):
                    return None
            except PermanentTransportError as exc:
                log.error(
                    "ensemble %s: the response to %s cannot be delivered: %s",
                    self.name,
                    request.request_id,
                    exc,
                    extra=self._fields(request),
                )
                return f"response not deliverable: {exc}"
        if request.reply_to is None:
            return None
        if self.transport is None:
            log.error(
                "ensemble %s: cannot route the response to %s to %r: the ensemble was built "
                "with a queue but no transport (pass transport= to answer callers)",
                self.name,
                request.request_id,
                request.reply_to,
                extra=self._fields(request),
            )
            return None
        # The registration read before the handler ran is reused; the response
        # is read again: handlers run for seconds to hours, and another worker
        # may have answered meanwhile (a completion never overwrites another;
        # one written after the caller collected is ignored by every reader).
        await self._registry(request.reply_to)._complete(
            request.request_id, response, self._registrations.get(request.request_id)
        )
        return None

    def _exhausted(self, request: WorkRequest, reason: str) -> None:
        """The queue dead-lettered ``request`` on its own, its attempts used
        up without a handler finishing it (workers crashed or were stopped
        on it, or its lease ran out): answer ``failed`` -- nobody else will,
        and its caller would wait until its timeout, or for ever. In the
        background: the queue's hook must not block."""
        self.counts["failed"] += 1
        get_metrics_sink().increment("handler_failed", self._labels(request))
        log.warning(
            "ensemble %s: %s was dead-lettered by the queue (%s); answering failed",
            self.name,
            request.request_id,
            reason,
            extra=self._fields(request),
        )
        response = WorkResponse(request_id=request.request_id, status="failed", error=reason)
        task = asyncio.get_running_loop().create_task(self._answer_exhausted(request, response))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer_exhausted(self, request: WorkRequest, response: WorkResponse) -> None:
        for attempt in range(1, 4):
            try:
                await self._respond(request, response)
                return
            except TransportError as exc:
                if attempt == 3:
                    log.error(
                        "ensemble %s: could not answer %s (%s); its caller gets no response",
                        self.name,
                        request.request_id,
                        exc,
                        extra=self._fields(request),
                    )
                    return
                await asyncio.sleep(attempt)

    async def _keep_lease(self, delivery: Delivery, lease: float) -> None:
        while True:
            await asyncio.sleep(max(lease / 3, 0.05))
            try:
                if not await delivery.extend():
                    log.warning(
                        "ensemble %s: lease of %s was lost; it may be processed twice",
                        self.name,
                        delivery.request.request_id,
                        extra=self._fields(delivery.request),
                    )
                    return
            except TransportError as exc:
                self._extend_outage.failed(exc, "trying again")
            else:
                self._extend_outage.recovered()

    async def _recording(self, request: WorkRequest, response: WorkResponse) -> str | None:
        """:meth:`_respond` through an outage, also past the lease: the
        response is the handler's real outcome. A delivery of the same
        request that reaches this process meanwhile (its lease ran out in a
        long outage, and the broker, back, gave it out again) waits for it
        and is then answered from it, instead of running the handler again
        (:meth:`_handle_kept`)."""
        rid = request.request_id
        done = asyncio.get_running_loop().create_future()
        mine = self._recording_now.setdefault(rid, done) is done
        try:
            return await self._settling(functools.partial(self._respond, request, response), None)
        finally:
            if mine:
                del self._recording_now[rid]
                done.set_result(None)

    async def _settling(
        self, step: Callable[[], Awaitable[T]], keeper: asyncio.Task[None] | None
    ) -> T:
        """Run ``step``, a step of settling a request (reading its caller's
        registration; after the handler ran: recording the response,
        dead-lettering, nacking, acking), until it is done. A
        transient failure (the broker unreachable) is tried again, 0.5 s
        later doubling to 2 s, while ``keeper`` keeps the delivery's lease;
        it used to be left to the lease, which ran the handler again (a job
        of hours, for a blip at its end), used an attempt and made the
        caller wait a lease longer. Raises the last error once the lease is
        lost (``keeper`` ended: another worker may have the request), any
        other error at once; a stop cancels it after ``shutdown_grace``
        (with the handlers, or with the acks in flight: ``keeper`` None)."""
        pause = 0.5
        current = asyncio.current_task()
        try:
            while True:
                try:
                    result = await step()
                except TransientTransportError as exc:
                    if keeper is not None and keeper.done():
                        raise
                    self._settle_outage.failed(exc, "trying again")
                    if current is not None:
                        self._retrying.add(current)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _SETTLE_RETRY_MAX_S)
                    continue
                break
        finally:
            if current is not None:
                self._retrying.discard(current)
        self._settle_outage.recovered()
        # The broker answers: an outage the lease extensions met is over too
        # (the request they kept is settled; the next may be far off).
        self._extend_outage.recovered()
        return result

    def _backoff(self, attempt: int) -> float:
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt
        return float(self._retry_wait(state))

    async def _handle(self, delivery: Delivery) -> None:
        try:
            await self._handle_one(delivery)
        finally:
            self._registrations.pop(delivery.request.request_id, None)

    async def _handle_one(self, delivery: Delivery) -> None:
        # The lease is kept from here until the request is settled: a step
        # that fails in an outage (reading the caller's registration,
        # recording the response, settling) is tried again under it.
        keeper = asyncio.create_task(self._keep_lease(delivery, self.queue.lease_seconds))
        try:
            await self._handle_kept(delivery, keeper)
        finally:
            keeper.cancel()

    async def _handle_kept(self, delivery: Delivery, keeper: asyncio.Task[None]) -> None:
        request = delivery.request
        recording = self._recording_now.get(request.request_id)
        if recording is not None:
            # An earlier delivery's response is still being recorded here:
            # this one is answered from it, not run again.
            await asyncio.shield(recording)
        if await self._settling(functools.partial(self._already_answered, request), keeper):
            self.counts["duplicates"] += 1
            get_metrics_sink().increment("duplicate_skipped", self._labels(request))
            await self._ack(delivery)
            return
        spec = self._tasks.get(request.task)
        if spec is None or (request.deadline is not None and request.deadline <= utcnow()):
            reason = (
                f"ensemble {self.name!r} has no task {request.task!r}"
                if spec is None
                else "deadline passed before the request was started"
            )
            rejected = WorkResponse(request_id=request.request_id, status="rejected", error=reason)
            undeliverable = await self._recording(request, rejected)
            self.counts["rejected"] += 1
            if undeliverable is not None:
                await self._settling(functools.partial(delivery.dead_letter, undeliverable), keeper)
            else:
                await self._ack(delivery)
            return
        await self._run_handler(delivery, spec, keeper)

    async def _run_handler(
        self, delivery: Delivery, spec: TaskSpec, keeper: asyncio.Task[None]
    ) -> None:
        request = delivery.request
        sink = get_metrics_sink()
        labels = self._labels(request)
        queue = self.queue
        token = set_current(request.headers.get(TRACEPARENT))
        started = time.perf_counter()
        try:
            outcome = spec.handler(TaskContext(request, delivery, self))
            if not inspect.isawaitable(outcome):
                # A plain ``def`` handler: retrying cannot help.
                raise PermanentTaskError(
                    f"the handler of task {spec.name!r} returned a {type(outcome).__name__},"
                    " not an awaitable: define it with 'async def'"
                )
            result = await outcome
        except (PermanentTaskError, PermanentTransportError) as exc:
            await self._fail(delivery, _described(exc), started, keeper)
            return
        except RetryTaskError as exc:
            await self._retry(delivery, _described(exc), started, exc.delay, keeper)
            return
        except (Exception, asyncio.CancelledError) as exc:
            current = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and (
                current is None or current.cancelling()
            ):
                raise  # this worker is being stopped
            # A CancelledError nobody asked this worker for (the handler
            # awaited something cancelled elsewhere) fails the attempt as any
            # other exception: it used to end the worker silently, one per
            # redelivery, until the ensemble served nothing.
            log.warning(
                "ensemble %s: %s failed on attempt %d: %s",
                self.name,
                request.task,
                request.attempt,
                _described(exc),
                extra=self._fields(request),
            )
            await self._retry(delivery, _described(exc), started, None, keeper)
            return
        finally:
            reset_current(token)
            observe = observer(sink)
            if observe is not None:
                observe(
                    "handler_seconds",
                    {**labels, "queue": queue.name},
                    time.perf_counter() - started,
                )
        try:
            response = WorkResponse(
                request_id=request.request_id,
                status="completed",
                result=result,
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        except InvalidMessageError as exc:
            # Running the handler again would return the same value.
            await self._fail(
                delivery, f"the handler's result cannot be sent: {exc}", started, keeper
            )
            return
        try:
            undeliverable = await self._recording(request, response)
        except PermanentTransportError as exc:
            # The response cannot be stored (over the size limit once
            # encoded, nested deeper than the encoder goes): running the
            # handler again would give the same result. It was retried until
            # its attempts ran out, one lease apart, and the caller got a
            # reason that hid the cause.
            await self._fail(
                delivery, f"the handler's result cannot be sent: {exc}", started, keeper
            )
            return
        if undeliverable is not None:
            await self._settling(functools.partial(delivery.dead_letter, undeliverable), keeper)
            self.counts["failed"] += 1
            return
        await self._ack(delivery)
        self.counts["completed"] += 1

    async def _ack(self, delivery: Delivery) -> None:
        """Ack ``delivery`` (its response is recorded) in the background.

        The worker is free for its next request while the ack is made
        durable; at most ``max(64, 16 × concurrency)`` acks wait at once
        (then the worker waits for a slot), and :meth:`aclose` waits for them
        before it closes the queue. An ack that never completes (crash) means
        a redelivery, answered from the recorded response: never a loss."""
        await self._ack_slots.acquire()
        try:
            task = asyncio.create_task(self._settle(delivery))
        except BaseException:
            self._ack_slots.release()
            raise
        self._acking.add(task)
        task.add_done_callback(self._acking.discard)

    async def _settle(self, delivery: Delivery) -> None:
        try:
            # Tried again through an outage (its response is recorded: the
            # lease running out would only bring it back to be acked).
            await self._settling(delivery.ack, None)
        except TransportError as exc:
            # Refused for good: the lease will run out and the request comes
            # back; it is then answered from the recorded response.
            log.warning(
                "ensemble %s: could not ack %s: %s",
                self.name,
                delivery.request.request_id,
                exc,
                extra=self._fields(delivery.request),
            )
        except Exception:
            log.exception(
                "ensemble %s: ack of %s failed",
                self.name,
                delivery.request.request_id,
                extra=self._fields(delivery.request),
            )
        finally:
            self._ack_slots.release()

    async def _fail(
        self, delivery: Delivery, error: str, started: float, keeper: asyncio.Task[None]
    ) -> None:
        request = delivery.request
        response = WorkResponse(
            request_id=request.request_id,
            status="failed",
            error=error,
            duration_ms=(time.perf_counter() - started) * 1000,
        )
        # Answer first: a crash after this leaves a redelivery that is then
        # recognised as already answered.
        await self._recording(request, response)
        await self._settling(functools.partial(delivery.dead_letter, error), keeper)
        self.counts["failed"] += 1
        get_metrics_sink().increment("handler_failed", self._labels(request))

    async def _retry(
        self,
        delivery: Delivery,
        error: str,
        started: float,
        delay: float | None,
        keeper: asyncio.Task[None],
    ) -> None:
        if delivery.attempt >= self.queue.max_attempts:
            await self._fail(
                delivery, f"{error} (after {_attempts(delivery.attempt)})", started, keeper
            )
            return
        wait = delay if delay is not None else self._backoff(delivery.attempt)
        await self._settling(functools.partial(delivery.nack, delay=wait, error=error), keeper)
        self.counts["retried"] += 1
