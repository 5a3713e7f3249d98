"""The request-queue SPI: :class:`RequestQueue` and :class:`Delivery`."""

from __future__ import annotations

import asyncio
import collections
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

from transport._spi.codec import RequestCodec, encode
from transport._spi.models import DeadLetter, QueueStats, WorkRequest, replace_fields, utcnow
from transport.errors import UnsupportedFeatureError

__all__ = ["Delivery", "RequestQueue", "hand_to_waiter", "seconds"]


def hand_to_waiter(waiters: collections.deque[asyncio.Future[Any]], value: Any) -> bool:
    """Give ``value`` to the first waiter still waiting (FIFO), dropping the
    ones that gave up; ``False`` if nobody waits (keep ``value`` buffered)."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(value)
            return True
    return False


async def ack_each(deliveries: Iterable[Delivery]) -> list[bool | BaseException]:
    """Ack every delivery by its own ``ack()``, concurrently; one result per
    delivery, in order: its result, or the error its ack raised. The
    default of :meth:`RequestQueue.ack_many`, and what a backend's native
    ``ack_many`` uses for deliveries that are not its own."""
    return await asyncio.gather(*(d.ack() for d in deliveries), return_exceptions=True)


def acked_or_raise(results: Iterable[bool | BaseException]) -> list[bool]:
    """The results of an ``ack_many``: the first error raised, once every
    ack was attempted; else the booleans."""
    return [bool(result) for result in _results_or_raise(results)]


#: At most this many stores of one ``enqueue_many`` call are in flight at
#: once (the default path: concurrent ``enqueue`` / ``_store_request``).
ENQUEUE_WINDOW = 256

_T = TypeVar("_T")
_R = TypeVar("_R")


async def _windowed(
    one: Callable[[_T], Awaitable[_R]], items: list[_T]
) -> list[_R | BaseException]:
    """``one(item)`` for the items, started in list order, at most
    :data:`ENQUEUE_WINDOW` in flight (a sliding window: the next starts as
    soon as one ends); one result or error per item started, in order.
    Once one has failed no further item starts (those in flight end), so a
    broker that is down costs one timeout, not one per window of items;
    the items not started come after every error in the list."""
    results: list[_R | BaseException | None] = [None] * len(items)
    indexes = iter(range(len(items)))
    failed = False

    async def worker() -> None:
        nonlocal failed
        for i in indexes:
            if failed:
                return
            try:
                results[i] = await one(items[i])
            except Exception as exc:
                results[i] = exc
                failed = True

    workers = min(ENQUEUE_WINDOW, len(items))
    await asyncio.gather(*(worker() for _ in range(workers)))
    return results  # type: ignore[return-value]


def _results_or_raise(results: Iterable[_R | BaseException]) -> list[_R]:
    """The results of a batch whose every item was attempted: the first
    error raised, else the results in order."""
    out: list[_R] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        out.append(result)
    return out


def work_requests(requests: Iterable[WorkRequest]) -> list[WorkRequest]:
    """``requests`` as a list. Raises: TypeError for an item that is not a
    ``WorkRequest`` (``enqueue_many``'s argument check)."""
    items = list(requests)
    for item in items:
        if not isinstance(item, WorkRequest):
            raise TypeError(f"enqueue_many takes WorkRequest items, got {type(item).__name__}")
    return items


#: Header of a request put back from the dead letters (``requeue_dead_letters``,
#: ``replace_dead_letter``; its value: when, ISO 8601 UTC). An ``Ensemble``
#: runs such a request again although its caller was answered already (it
#: acks unrun a redelivery whose caller was answered or collected).
REQUEUED_HEADER = "transport-requeued-at"


def requeued(request: WorkRequest) -> WorkRequest:
    """``request`` as a backend puts it back from the dead letters: a first
    delivery again (``attempt`` 1), marked with :data:`REQUEUED_HEADER`."""
    stamp = utcnow().isoformat(timespec="seconds")
    return replace_fields(request, attempt=1, headers={**request.headers, REQUEUED_HEADER: stamp})


def seconds(value: float | timedelta | None) -> float | None:
    """Normalise a duration given as seconds or ``timedelta``.

    Raises:
        ValueError: the duration is negative.
    """
    if value is None:
        return None
    out = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if out < 0:
        raise ValueError(f"duration must not be negative, got {value!r}")
    return out


class Delivery(ABC):
    """One leased request, handed to exactly one worker until it is settled
    or its lease runs out.

    Settling is idempotent and never raises for a stale lease: the methods
    return ``True`` when they took effect and ``False`` when the delivery was
    already settled, or its lease had expired and the request may already be
    with another worker (then the outcome is a redelivery, never a loss).
    """

    # __weakref__: a shared queue's handle keeps what it handed out weakly.
    __slots__ = ("__weakref__", "request")

    def __init__(self, request: WorkRequest) -> None:
        #: The request, with ``attempt`` filled in (1 = first delivery).
        self.request = request

    @property
    def attempt(self) -> int:
        """1-based delivery count of this request, including this one."""
        return self.request.attempt

    @abstractmethod
    async def ack(self) -> bool:
        """Mark the request done.

        Guarantees: after ``True`` the request is never delivered again.
        Acks may be given in any order. ``False``: already settled, or the
        lease was lost (the request will be, or was, redelivered).
        Raises: TransientTransportError if the broker is unreachable (the
        request stays leased and is redelivered if the lease runs out).
        """

    @abstractmethod
    async def nack(
        self, delay: float | timedelta | None = None, *, error: str | None = None
    ) -> bool:
        """Give the request back for redelivery, not before ``delay``.

        Guarantees: other requests keep flowing meanwhile. ``error`` is kept
        and shown in the dead-letter record if this was the last attempt
        (``attempt >= max_attempts``: the request is dead-lettered now).
        Raises: ValueError for a negative delay; TransientTransportError.
        """

    @abstractmethod
    async def extend(self, seconds: float | timedelta | None = None) -> bool:
        """Keep the lease for long work: renew it for ``seconds`` (default:
        the queue's lease) from now.

        Guarantees: while a live worker keeps extending, the request is not
        delivered to anyone else, however long the work takes.
        ``False``: the lease was already lost or the delivery settled.
        Raises: TransientTransportError.
        """

    @abstractmethod
    async def dead_letter(self, error: str) -> bool:
        """Move the request to the dead-letter queue now (a permanent failure).

        Guarantees: the request is kept, with ``error`` and the attempt count,
        and is not delivered from the source queue again.
        Raises: TransientTransportError.
        """

    def _mark_unseen(self, unseen: bool) -> None:
        """Backend SPI, not for workers: ``True`` while a
        :class:`PriorityRequestQueue` holds this delivery to compare levels
        (no handler has it), ``False`` once it is handed out. A backend that
        gives deliveries back on its own when a program ends without
        ``aclose()`` gives these back uncounted, as a clean close does. This
        default does nothing."""
        return None

    async def _release_uncounted(self) -> bool:
        """Give the request back for redelivery as if this delivery had not
        happened: its next delivery has the same ``attempt``. For a delivery
        that was never handed to a handler (a :class:`PriorityRequestQueue`
        gives back the heads it held to compare levels); a handler's
        deliveries are given back with :meth:`nack`. Backend SPI, not for
        workers.

        ``True``: given back, uncounted. ``False``: already settled or the
        lease was lost, or the backend cannot give it back uncounted; the
        caller then leaves it to the queue's close or to lease expiry, which
        count it. This default returns ``False``: a backend overrides it.
        Raises: TransientTransportError (the delivery stays leased).
        """
        return False


log = logging.getLogger("transport")

#: ``hook(request, reason)``: see :meth:`RequestQueue.set_exhausted_hook`.
ExhaustedHook = Callable[[WorkRequest, str], None]


class RequestQueue(ABC):
    """One named, durable queue of :class:`WorkRequest` with manual-commit
    semantics, shared by all workers of an ensemble.

    Guarantees (all backends): at-least-once. A request is removed only by
    :meth:`Delivery.ack` or moved by dead-lettering; one that is never acked
    (worker crashed, closed, lease expired) is delivered again with a higher
    ``attempt``; after ``max_attempts`` deliveries it goes to the dead-letter
    queue with its last error. Ordering and persistence depend on the
    backend's :class:`~transport.TransportCapabilities`.
    """

    name: str
    lease_seconds: float
    max_attempts: int
    #: The largest encoded request :meth:`enqueue` accepts (``None``: no
    #: limit); backends set it from ``TransportConfig.max_payload_bytes``.
    max_payload_bytes: int | None = None
    #: The request dialect of this queue (``TransportConfig.request_codec``;
    #: ``None``: the library's own). Set by the transport that opens the
    #: queue; backends pass it to ``decode_request``.
    request_codec: RequestCodec | None = None
    _exhausted_hook: ExhaustedHook | None = None

    def set_exhausted_hook(self, hook: ExhaustedHook | None) -> None:
        """Call ``hook(request, reason)`` whenever this queue itself moves a
        request to the dead letters because its attempts are used up: found
        at a hand-out (or, on some backends, at the expiry of its lease) with
        ``max_attempts`` deliveries made and none settled -- its workers
        crashed, were stopped on it, or let its lease run out. Nobody else
        learns of it: the :class:`~transport.Ensemble` answers such a
        request ``failed`` so that its caller is not left waiting.

        Not called for :meth:`Delivery.dead_letter` or a nack (whoever made
        those knows), nor for an undecodable body. Called on the event loop,
        at least once per such move (a requeued request may be reported
        again); it must not block, and an exception it raises is logged.
        Wrappers (priority and instrumented queues) pass it on.
        """
        self._exhausted_hook = hook

    def _report_exhausted(self, request: WorkRequest | None, reason: str) -> None:
        """For backends: report a request dead-lettered with its attempts
        used up (see :meth:`set_exhausted_hook`)."""
        hook = self._exhausted_hook
        if hook is None or request is None:
            return
        try:
            hook(request, reason)
        except Exception:
            log.exception("queue %r: the exhausted-request hook failed", self.name)

    async def enqueue(self, request: WorkRequest) -> WorkRequest:
        """Durably add ``request``; returns it with ``enqueued_at`` stamped.

        Guarantees: returns only after the backend durably accepted the request
        (SQLite commit, Kafka acks=all delivery report, JetStream PubAck,
        Pulsar send receipt). ``enqueued_at`` already set is kept.
        Raises: PayloadTooLargeError, PermanentTransportError (not JSON,
        auth, config), TransientTransportError (broker unreachable or timed
        out: the request may or may not have been stored), ClosedResourceError.

        For backends: this is the one enqueue template. It checks the handle
        (:meth:`_check_open`), stamps ``enqueued_at``, encodes the request
        (with :attr:`request_codec` if set) within ``max_payload_bytes`` and hands both to :meth:`_store_request`,
        the hook a backend implements (or it overrides ``enqueue`` whole).
        """
        self._check_open()
        if request.enqueued_at is None:
            request = replace_fields(request, enqueued_at=utcnow())
        codec = self.request_codec
        body = (
            encode(request, self.max_payload_bytes)
            if codec is None
            else codec.encode_request(request, self.max_payload_bytes)
        )
        await self._store_request(request, body)
        return request

    async def enqueue_many(self, requests: Iterable[WorkRequest]) -> list[WorkRequest]:
        """Durably add many requests in one call; returns them with
        ``enqueued_at`` stamped, in the order given.

        Guarantees: on return every request is durably accepted, as by
        :meth:`enqueue`. Every request is stamped and encoded before any is
        stored, so one that is too large or not JSON raises
        ``PayloadTooLargeError`` / ``PermanentTransportError`` with nothing
        stored. Then the requests are stored; once one store has failed no
        further one starts, and the first error is raised once those in
        flight have ended (a broker that is down costs one timeout, not one
        per request): after a broker error some requests may be
        stored, so a retry of the whole call may store those twice
        (at-least-once, as a retried :meth:`enqueue`; handlers dedupe by
        ``request_id``). ``memory://`` and ``sqlite://`` store the call in
        one step (all or nothing, in list order); other backends send the
        requests concurrently, as concurrent :meth:`enqueue` calls would be
        (at most 256 in flight, so a call of any size is fine), with no
        order among them.

        For backends: the template stamps and encodes, then hands the pairs
        to :meth:`_store_requests` (default: :meth:`_store_request` for
        each, concurrently); a backend that stores many in one step
        overrides that hook. A class that overrides :meth:`enqueue` whole
        (a wrapper) gets each request enqueued by its own :meth:`enqueue`,
        concurrently, in the same window.
        Raises: TypeError for an item that is not a ``WorkRequest``; as
        :meth:`enqueue`.
        """
        items = work_requests(requests)
        if not items:
            self._check_open()
            return []
        cls = type(self)
        if cls.enqueue is not RequestQueue.enqueue or (
            cls._store_request is RequestQueue._store_request
            and cls._store_requests is RequestQueue._store_requests
        ):
            self._encode_all(items)  # refused before any is stored, as below
            return _results_or_raise(await _windowed(self.enqueue, items))
        self._check_open()
        now = utcnow()
        stamped = [
            item if item.enqueued_at is not None else replace_fields(item, enqueued_at=now)
            for item in items
        ]
        await self._store_requests(stamped, self._encode_all(stamped))
        return stamped

    def _encode_all(self, requests: list[WorkRequest]) -> list[bytes]:
        """Each request encoded as :meth:`enqueue` would (this queue's codec,
        within ``max_payload_bytes``). Raises: as :func:`encode`."""
        codec = self.request_codec
        limit = self.max_payload_bytes
        if codec is None:
            return [encode(item, limit) for item in requests]
        return [codec.encode_request(item, limit) for item in requests]

    async def _store_requests(self, requests: list[WorkRequest], bodies: list[bytes]) -> None:
        """Store many encoded requests durably (backend hook of
        :meth:`enqueue_many`; ``bodies[i]`` is ``requests[i]`` encoded).
        The default stores each with :meth:`_store_request`, at most
        :data:`ENQUEUE_WINDOW` at a time (a call of 100,000 requests must not
        put 100,000 sends in flight at once: client queues have limits),
        starts none after a failure, and raises the first error once those
        in flight have ended."""
        pairs = list(zip(requests, bodies, strict=True))
        _results_or_raise(await _windowed(lambda pair: self._store_request(*pair), pairs))

    def _check_open(self) -> None:  # noqa: B027 - optional hook
        """Raise ``ClosedResourceError`` if this handle or its transport is
        closed. Backend hook; the default checks nothing."""

    async def _store_request(self, request: WorkRequest, body: bytes) -> None:
        """Store ``body`` (``request`` encoded) durably; return once the
        backend accepted it (see :meth:`enqueue`). Backend hook of the
        enqueue template; ``request`` gives the message key and id."""
        raise NotImplementedError(
            f"{type(self).__name__} implements neither _store_request nor enqueue"
        )

    @abstractmethod
    async def poll(self, timeout: float | None = None) -> Delivery | None:
        """Lease the next request; ``None`` if none arrived within ``timeout``
        seconds (``None`` waits indefinitely, ``0`` does not wait; a negative
        timeout is refused like a negative ``nack`` delay).

        Guarantees: the delivery is held by this caller alone until settled or
        until its lease (``lease_seconds``, renewable by ``extend``) expires.
        Cancellation-safe: a cancelled poll loses nothing (at worst the request
        is redelivered after its lease). Undecodable records are
        dead-lettered, never returned and never raised.
        Raises: ValueError for a negative timeout; TransientTransportError,
        ClosedResourceError.
        """

    async def poll_many(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        """Lease up to ``max_count`` requests: waits (as :meth:`poll`) up to
        ``timeout`` for the first, then takes what is available now without
        waiting. An empty list if none arrived in time.

        Guarantees: each delivery as one from :meth:`poll` (its own lease,
        attempt and settlement); cancellation-safe like :meth:`poll` (a
        cancelled call may leave requests it had leased to their leases,
        never loses one). This default calls :meth:`poll` for the first, then
        ``max_count - 1`` concurrent ``poll(0)``; a failing one of those is
        not raised (what the others leased is handed out; the next call
        meets the error). Backends that can lease many in one step do so.
        Raises: ValueError for ``max_count`` < 1 or a negative timeout; as
        :meth:`poll`.
        """
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        first = await self.poll(timeout)
        if first is None:
            return []
        if max_count == 1:
            return [first]
        return [first, *await self._poll_more(first, max_count - 1)]

    async def _poll_more(self, first: Delivery, count: int) -> list[Delivery]:
        """Backend hook of :meth:`poll_many`: up to ``count`` more deliveries
        available now, after ``first`` (leased already); a failure is not
        raised. The default takes them as concurrent polls (which backends
        serve together where they can: one leasing round, one pull), not
        one round trip after the other."""
        more = await asyncio.gather(*(self.poll(0) for _ in range(count)), return_exceptions=True)
        return [d for d in more if isinstance(d, Delivery)]

    async def ack_many(self, deliveries: Iterable[Delivery]) -> list[bool]:
        """Acknowledge many deliveries of this queue at once; one result per
        delivery, in order, each as :meth:`Delivery.ack` returns it.

        Guarantees: every ack is attempted even if one fails; then the first
        error is raised (the others took effect or not as their results
        would have said). Backends batch them where they can.
        Raises: the first error of an ack (TransientTransportError...).
        """
        return acked_or_raise(await ack_each(deliveries))

    async def caught_up(self, timeout: float | None = None) -> bool:
        """Wait until this handle knows its head: from then on ``poll(0)``
        returns a request whenever one is available to this consumer, rather
        than ``None`` because the backlog is still on its way (a consumer
        joining its group, a partition just assigned). ``False`` if
        ``timeout`` seconds passed first (``None`` waits; ``0`` only checks).

        A :class:`PriorityRequestQueue` waits for this on every level before
        it serves one, so that a lower level is never served while a higher
        one may hold work. The default is for backends whose ``poll(0)``
        asks the store itself: always ``True``.
        Raises: TransientTransportError (the consumer failed),
        ClosedResourceError.
        """
        return True

    @abstractmethod
    async def stats(self) -> QueueStats:
        """Depth (lag), in-flight and dead-letter counts.

        Raises: TransientTransportError.
        """

    @abstractmethod
    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead-lettered requests of this queue.

        Raises: TransientTransportError.
        """

    @abstractmethod
    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        """Move dead letters (all, or those named) back to the queue with a
        fresh attempt count; returns how many moved. Undecodable dead letters
        stay where they are.

        Guarantees: a request is enqueued again before it is removed from the
        dead-letter queue (a crash in between gives a duplicate, never a loss).
        Raises: TransientTransportError.
        """

    async def replace_dead_letter(self, dead_letter_id: str, request: WorkRequest) -> bool:
        """Put ``request`` on the queue in place of the dead letter
        ``dead_letter_id`` (from :attr:`DeadLetter.dead_letter_id`), then
        remove that dead letter. Meant for what ``requeue_dead_letters``
        leaves alone: an undecodable body, repaired by an operator from
        :meth:`DeadLetter.raw_bytes`. Returns False (and enqueues nothing) if
        there is no such dead letter.

        Guarantees: ``request`` is enqueued (as by :meth:`enqueue`, its
        ``attempt`` starting again at 1) before the dead letter is removed: a
        crash in between leaves both, a duplicate, never a loss.
        Raises: UnsupportedFeatureError where the backend cannot (the default
        of this base class); what :meth:`enqueue` raises;
        TransientTransportError.
        """
        raise UnsupportedFeatureError(
            f"{type(self).__name__} cannot replace dead letters (no replace_dead_letter)"
        )

    @abstractmethod
    async def aclose(self) -> None:
        """Release this handle. Requests leased through it and not yet settled
        are given back for redelivery; enqueues that returned are durable.
        A ``poll``/``poll_many`` of this handle still waiting ends with
        ``ClosedResourceError`` within a second (never a ``CancelledError``
        nobody asked for). Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
