"""``memory://[name]`` — the in-process backend and the official test double.

Feature matrix: persistent ✗ (state lives as long as the process), ordered ✓
(FIFO; redeliveries and nacks go to the back), consumer_groups ✗ (one
process), native_delay ✓, lease_extension ✓.

Every ``connect("memory://name")`` in a process shares one broker named
``name`` (``memory://`` is the broker ``default``), like clients of a server:
a "restarted" caller re-attaches by connecting again. Clients with different
``TransportConfig.namespace`` share nothing (a broker per name and namespace). Requests are stored as
their JSON encoding, exactly as on the wire, so payloads that a broker would
refuse are refused here too. Thread-safe and usable from several event loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from pydantic import TypeAdapter
from pydantic_core import from_json

from transport import (
    CAUGHT_UP,
    DeadLetter,
    Delivery,
    HealthStatus,
    KeyedChange,
    KeyedLog,
    QueueStats,
    RequestQueue,
    Transport,
    TransportCapabilities,
    TransportConfig,
    WorkRequest,
    encode,
)
from transport.errors import ClosedResourceError, UndecodableMessageError
from transport.kit import DoctorFinding, ProvisionPlan, decode_request, replace_fields
from transport.kit import seconds as _seconds
from transport_inprocess._memory_events import BusState, LogState, MemoryEventBus, MemoryEventLog

__all__ = ["MemoryRequestQueue", "MemoryTransport", "open_memory", "reset_memory"]

_token = itertools.count(1)
_heappush = heapq.heappush


@dataclass(slots=True, eq=False)
class _Msg:
    data: bytes
    request_id: str | None
    attempts: int = 0
    last_error: str | None = None
    # ``data`` is this module's own encoding of a validated WorkRequest (not
    # foreign bytes from inject_raw): it is parsed without re-validation.
    own: bool = False
    # Identity of a foreign message (a body may carry no request id).
    ident: int = 0


_FIELDS = frozenset(WorkRequest.__pydantic_fields__)
_parse_datetime = TypeAdapter(datetime).validator.validate_python
_setattr = object.__setattr__


def _decode_own(data: bytes) -> WorkRequest:
    """``decode(WorkRequest, data)`` for bytes that ``encode`` made from a
    valid WorkRequest, without running its validators again: the same values
    (a fresh copy of payload and headers, datetimes parsed as pydantic does),
    at about half the cost."""
    values = from_json(data)
    for key in ("enqueued_at", "deadline"):
        value = values[key]
        if value is not None:
            value = _parse_datetime(value)
            values[key] = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    request = object.__new__(WorkRequest)
    _setattr(request, "__dict__", values)
    _setattr(request, "__pydantic_extra__", None)
    _setattr(request, "__pydantic_fields_set__", set(_FIELDS))
    _setattr(request, "__pydantic_private__", None)
    return request


@dataclass(slots=True, eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    popped: bool = False  # taken off the waiters deque by _notify_one


@dataclass
class _QueueState:
    ready: deque[_Msg] = field(default_factory=deque)
    delayed: list[tuple[float, int, _Msg]] = field(default_factory=list)
    inflight: dict[int, tuple[_Msg, float]] = field(default_factory=dict)
    leases: list[tuple[float, int]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    waiters: deque[_Waiter] = field(default_factory=deque)


class _Broker:
    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.queues: dict[str, _QueueState] = {}
        self.logs: dict[str, _LogState] = {}
        self.bus = BusState()
        self.events = LogState()

    def queue(self, name: str) -> _QueueState:
        state = self.queues.get(name)
        if state is None:
            state = self.queues[name] = _QueueState()
        return state


# One broker per (URL name, namespace): clients of one ``memory://name`` with
# different ``TransportConfig.namespace`` share nothing.
_BROKERS: dict[tuple[str, str], _Broker] = {}
_BROKERS_LOCK = threading.Lock()


def _broker(name: str, namespace: str) -> _Broker:
    with _BROKERS_LOCK:
        broker = _BROKERS.get((name, namespace))
        if broker is None:
            broker = _BROKERS[(name, namespace)] = _Broker(name)
        return broker


def reset_memory(name: str | None = None) -> None:
    """Forget the state of broker ``name``, every namespace of it (all
    brokers if ``None``)."""
    with _BROKERS_LOCK:
        if name is None:
            _BROKERS.clear()
        else:
            for key in [key for key in _BROKERS if key[0] == name]:
                del _BROKERS[key]


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """``loop.call_soon_threadsafe(fn, *args)``, without its self-pipe write
    (a syscall and an extra loop iteration) when ``loop`` runs this thread.

    Raises: RuntimeError if ``loop`` is closed.
    """
    if asyncio._get_running_loop() is loop:
        loop.call_soon(fn, *args)
    else:
        loop.call_soon_threadsafe(fn, *args)


def _set_none(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _wake(waiter: _Waiter) -> None:
    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
        _call_soon(waiter.loop, _set_none, waiter.future)


def _notify_one(state: _QueueState) -> None:
    # Caller holds the broker lock.
    while state.waiters:
        waiter = state.waiters.popleft()
        waiter.popped = True
        if not waiter.future.done():
            _wake(waiter)
            return


class MemoryDelivery(Delivery):
    __slots__ = ("_queue", "_token")

    def __init__(self, request: WorkRequest, queue: MemoryRequestQueue, token: int) -> None:
        self.request = request
        self._queue = queue
        self._token = token

    async def ack(self) -> bool:
        return self._queue._ack(self._token)

    async def nack(
        self, delay: float | timedelta | None = None, *, error: str | None = None
    ) -> bool:
        return self._queue._settle(self._token, "nack", _seconds(delay), error)

    async def extend(self, seconds: float | timedelta | None = None) -> bool:
        return self._queue._extend(self._token, _seconds(seconds))

    async def dead_letter(self, error: str) -> bool:
        return self._queue._settle(self._token, "dead", None, error)

    async def _release_uncounted(self) -> bool:
        return self._queue._release_uncounted(self._token)


class MemoryRequestQueue(RequestQueue):
    def __init__(
        self, broker: _Broker, name: str, *, lease_seconds: float, max_attempts: int, limit: int
    ) -> None:
        self.name = name
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self._broker = broker
        self.max_payload_bytes = limit
        self._held: set[int] = set()
        self._closed = False
        with broker.lock:
            self._state = broker.queue(name)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"queue {self.name!r} is closed")

    # -- producer ---------------------------------------------------------
    async def _store_request(self, request: WorkRequest, body: bytes) -> None:
        state = self._state
        with self._broker.lock:
            # (A subclass may encode fields WorkRequest does not have.)
            own = request.__class__ is WorkRequest
            state.ready.append(_Msg(body, request.request_id, 0, None, own))
            if state.waiters:
                _notify_one(state)

    def inject_raw(self, data: bytes) -> None:
        """Put raw bytes on the queue as if a foreign producer had (for tests)."""
        with self._broker.lock:
            self._state.ready.append(_Msg(data, None, ident=next(_token)))
            _notify_one(self._state)

    # -- consumer ---------------------------------------------------------
    def _request_of(self, msg: _Msg) -> WorkRequest | None:
        """The request as its deliveries showed it (None if undecodable)."""
        try:
            return decode_request(msg.data, self._broker.name, self.name, msg.ident)
        except UndecodableMessageError:
            return None

    def _dead(self, msg: _Msg, error: str, request: WorkRequest | None) -> None:
        self._state.dead.append(
            DeadLetter(
                queue=self.name,
                request_id=msg.request_id or (request.request_id if request else None),
                request=request,
                raw=None if request is not None else msg.data.decode("utf-8", "replace"),
                error=error,
                attempts=msg.attempts,
            )
        )

    def _reclaim(self, now: float) -> None:
        # Caller holds the lock. Expired leases go back to the front (they are
        # the oldest work); due delayed messages go to the back.
        state = self._state
        while state.leases and state.leases[0][0] <= now:
            deadline, token = heapq.heappop(state.leases)
            entry = state.inflight.get(token)
            if entry is not None and entry[1] == deadline:
                del state.inflight[token]
                state.ready.appendleft(entry[0])
        while state.delayed and state.delayed[0][0] <= now:
            state.ready.append(heapq.heappop(state.delayed)[2])

    def _lease(self) -> MemoryDelivery | None:
        now = time.monotonic()
        state = self._state
        with self._broker.lock:
            if (state.leases and state.leases[0][0] <= now) or (
                state.delayed and state.delayed[0][0] <= now
            ):
                self._reclaim(now)
            while state.ready:
                msg = state.ready.popleft()
                if msg.attempts >= self.max_attempts:
                    self._dead(
                        msg,
                        msg.last_error or f"not acknowledged after {msg.attempts} deliveries",
                        self._request_of(msg),
                    )
                    continue
                try:
                    request = (
                        _decode_own(msg.data)
                        if msg.own
                        else decode_request(msg.data, self._broker.name, self.name, msg.ident)
                    )
                except UndecodableMessageError as exc:
                    msg.attempts += 1
                    self._dead(msg, str(exc), None)
                    continue
                msg.attempts += 1
                token = next(_token)
                deadline = now + self.lease_seconds
                state.inflight[token] = (msg, deadline)
                _heappush(state.leases, (deadline, token))
                self._held.add(token)
                if request.attempt != msg.attempts:  # the count is ours, never the body's
                    request = replace_fields(request, attempt=msg.attempts)
                return MemoryDelivery(request, self, token)
            return None

    def _next_wake(self) -> float | None:
        state = self._state
        times = []
        if state.leases:
            times.append(state.leases[0][0])
        if state.delayed:
            times.append(state.delayed[0][0])
        return min(times) if times else None

    async def poll(self, timeout: float | None = None) -> MemoryDelivery | None:
        self._check_open()
        timeout = _seconds(timeout)  # a negative timeout is refused, as for nack/extend
        if self._state.ready:  # work is waiting: no deadline or waiter needed
            delivery = self._lease()
            if delivery is not None:
                return delivery
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            delivery = self._lease()
            if delivery is not None:
                return delivery
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            waiter = _Waiter(loop, loop.create_future())
            with self._broker.lock:
                wake = self._next_wake()
                self._state.waiters.append(waiter)
            limit = deadline
            if wake is not None:
                limit = wake if limit is None else min(limit, wake)
            try:
                async with asyncio.timeout(None if limit is None else max(limit - now, 0.0)):
                    await waiter.future
            except TimeoutError:
                pass
            finally:
                with self._broker.lock:
                    # (Checked with a flag, not by catching deque.remove's
                    # ValueError: that formats the waiter's repr every time.)
                    if not waiter.popped:
                        self._state.waiters.remove(waiter)
                    elif waiter.future.done() and not waiter.future.cancelled():
                        # We were woken: if we leave without leasing (cancelled),
                        # pass the wake-up on so no message sits unnoticed.
                        _notify_one(self._state)
            self._check_open()

    def _ack(self, token: int) -> bool:
        state = self._state
        with self._broker.lock:
            entry = state.inflight.pop(token, None)
            self._held.discard(token)
            if len(state.leases) > 4 * len(state.inflight) + 64:
                _compact_leases(state)
            return entry is not None

    def _pop_inflight(self, token: int) -> _Msg | None:
        """Take a lease out of flight (the broker lock is held by the caller)."""
        state = self._state
        entry = state.inflight.pop(token, None)
        self._held.discard(token)
        if entry is None:
            return None
        if len(state.leases) > 4 * len(state.inflight) + 64:
            _compact_leases(state)
        return entry[0]

    def _settle(self, token: int, how: str, delay: float | None, error: str | None) -> bool:
        state = self._state
        with self._broker.lock:
            msg = self._pop_inflight(token)
            if msg is None:
                return False
            if how == "ack":
                return True
            msg.last_error = error or msg.last_error
            if how == "dead" or msg.attempts >= self.max_attempts:
                reason = error or msg.last_error or f"nacked after {msg.attempts} deliveries"
                self._dead(msg, reason, self._request_of(msg))
                return True
            if delay:
                heapq.heappush(state.delayed, (time.monotonic() + delay, next(_token), msg))
            else:
                state.ready.append(msg)
            _notify_one(state)
            return True

    def _release_uncounted(self, token: int) -> bool:
        # Back to the front (a head is the oldest), with this delivery's
        # count withdrawn: its next delivery has the same attempt.
        state = self._state
        with self._broker.lock:
            msg = self._pop_inflight(token)
            if msg is None:
                return False
            msg.attempts -= 1
            state.ready.appendleft(msg)
            _notify_one(state)
            return True

    def _extend(self, token: int, seconds: float | None) -> bool:
        state = self._state
        with self._broker.lock:
            entry = state.inflight.get(token)
            if entry is None:
                return False
            deadline = time.monotonic() + (seconds or self.lease_seconds)
            state.inflight[token] = (entry[0], deadline)
            heapq.heappush(state.leases, (deadline, token))
            return True

    async def stats(self) -> QueueStats:
        self._check_open()
        with self._broker.lock:
            self._reclaim(time.monotonic())
            state = self._state
            head = None
            if state.ready:
                msg = state.ready[0]
                with contextlib.suppress(UndecodableMessageError):
                    head = decode_request(msg.data, self._broker.name, self.name, msg.ident)
            return QueueStats(
                queue=self.name,
                depth=len(state.ready) + len(state.delayed),
                in_flight=len(state.inflight),
                delayed=len(state.delayed),
                dead_lettered=len(state.dead),
                head_enqueued_at=None if head is None else head.enqueued_at,
            )

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        self._check_open()
        with self._broker.lock:
            return list(self._state.dead[:limit])

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        self._check_open()
        wanted = None if request_ids is None else set(request_ids)
        moved = 0
        with self._broker.lock:
            keep: list[DeadLetter] = []
            for dead in self._state.dead:
                if dead.request is None or (wanted is not None and dead.request_id not in wanted):
                    keep.append(dead)
                    continue
                fresh = dead.request.model_copy(update={"attempt": 1})
                self._state.ready.append(_Msg(encode(fresh), fresh.request_id))
                moved += 1
            self._state.dead = keep
            for _ in range(moved):
                _notify_one(self._state)
        return moved

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        state = self._state
        with self._broker.lock:
            # Unsettled leases of this handle go back at once (not after expiry).
            for token in sorted(self._held, reverse=True):
                entry = state.inflight.pop(token, None)
                if entry is not None:
                    state.ready.appendleft(entry[0])
                    _notify_one(state)
            self._held.clear()


def _compact_leases(state: _QueueState) -> None:
    """Drop the lease timers of settled or extended leases (caller holds the
    lock): settling leaves its timer in the heap, where it would stay until
    the lease would have expired. Rebuilt when mostly stale, so the heap
    stays within a few times the number of requests in flight."""
    state.leases = [(deadline, token) for token, (_, deadline) in state.inflight.items()]
    heapq.heapify(state.leases)


@dataclass
class _LogState:
    data: dict[str, bytes] = field(default_factory=dict)
    watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[KeyedChange]]] = field(
        default_factory=list
    )


class MemoryKeyedLog(KeyedLog):
    def __init__(self, broker: _Broker, name: str) -> None:
        self._broker = broker
        with broker.lock:
            state = broker.logs.get(name)
            if state is None:
                state = broker.logs[name] = _LogState()
        self._state = state

    def _publish(self, change: KeyedChange) -> None:
        for loop, queue in list(self._state.watchers):
            try:
                _call_soon(loop, queue.put_nowait, change)
            except RuntimeError:
                self._state.watchers.remove((loop, queue))

    async def put(self, key: str, value: bytes) -> None:
        with self._broker.lock:
            self._state.data[key] = value
            self._publish(KeyedChange(key, value))

    async def delete(self, key: str) -> None:
        with self._broker.lock:
            if self._state.data.pop(key, None) is not None:
                self._publish(KeyedChange(key, None))

    async def get(self, key: str) -> bytes | None:
        with self._broker.lock:
            return self._state.data.get(key)

    async def watch(self) -> AsyncIterator[KeyedChange | object]:
        queue: asyncio.Queue[KeyedChange] = asyncio.Queue()
        entry = (asyncio.get_running_loop(), queue)
        with self._broker.lock:
            snapshot = list(self._state.data.items())
            self._state.watchers.append(entry)
        try:
            for key, value in snapshot:
                yield KeyedChange(key, value)
            yield CAUGHT_UP
            while True:
                yield await queue.get()
        finally:
            with self._broker.lock:
                if entry in self._state.watchers:
                    self._state.watchers.remove(entry)

    async def aclose(self) -> None:
        return None


class MemoryTransport(Transport):
    backend = "memory"
    capabilities = TransportCapabilities(
        persistent=False,
        ordered=True,
        consumer_groups=False,
        native_delay=True,
        lease_extension=True,
        event_bus=True,
        event_log=True,
    )

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        parts = urlsplit(config.url)
        self.broker_name = (parts.netloc + parts.path).strip("/") or "default"
        self._broker = _broker(self.broker_name, config.namespace)

    def _open_queue(
        self, name: str, *, lease_seconds: float, max_attempts: int
    ) -> MemoryRequestQueue:
        return MemoryRequestQueue(
            self._broker,
            name,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            limit=self.config.max_payload_bytes,
        )

    def _open_keyed_log(self, kind: str, name: str) -> MemoryKeyedLog:
        return MemoryKeyedLog(self._broker, f"{kind}:{name}")

    def _open_event_bus(self) -> MemoryEventBus:
        return MemoryEventBus(self._broker.bus, self.config.max_payload_bytes)

    def _open_event_log(self) -> MemoryEventLog:
        return MemoryEventLog(self._broker.events, self.config.max_payload_bytes)

    async def _doctor(self, plan: ProvisionPlan | None) -> list[DoctorFinding]:
        return [
            DoctorFinding(
                severity="warning",
                subject=f"memory://{self.broker_name}",
                finding="everything lives in this process (capability persistent=false)",
                fix="sqlite:// or a broker for anything that must outlive the process",
                guarantee="requests and registry state survive the process",
            )
        ]

    async def health(self) -> HealthStatus:
        return HealthStatus(
            ok=not self._closed, backend="memory", detail=f"broker {self.broker_name!r}"
        )


async def open_memory(config: TransportConfig) -> MemoryTransport:
    """Entry point for ``memory://``."""
    return MemoryTransport(config)
