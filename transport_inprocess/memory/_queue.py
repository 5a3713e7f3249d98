"""``MemoryRequestQueue``: a queue of the in-process broker. Requests are
stored as their JSON encoding, exactly as on the wire, so payloads that a
broker would refuse are refused here too; FIFO, redeliveries and nacks go to
the back; leases are timers in a heap."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Iterable
from datetime import timedelta

from transport import DeadLetter, Delivery, QueueStats, RequestQueue, WorkRequest, encode
from transport.errors import ClosedResourceError, UndecodableMessageError
from transport.kit import ack_each, acked_or_raise, decode_request, replace_fields, requeued
from transport.kit import seconds as _seconds
from transport_inprocess.memory._client import (
    _Broker,
    _Msg,
    _notify_one,
    _QueueState,
    _Waiter,
    _wake,
)

__all__ = ["MemoryDelivery", "MemoryRequestQueue"]

_token = itertools.count(1)
_heappush = heapq.heappush


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
        # This handle's polls waiting for work: its aclose() wakes them (they
        # then raise ClosedResourceError), as the waiters are the queue's.
        self._waiters: set[_Waiter] = set()
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
            state.ready.append(_Msg(body, request.request_id))
            if state.waiters:
                _notify_one(state)

    async def _store_requests(self, requests: list[WorkRequest], bodies: list[bytes]) -> None:
        # enqueue_many: all at once, in order, one waiting poller woken per request.
        state = self._state
        with self._broker.lock:
            state.ready.extend(
                _Msg(body, request.request_id)
                for request, body in zip(requests, bodies, strict=True)
            )
            for _ in range(min(len(bodies), len(state.waiters))):
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
            return decode_request(
                msg.data, self._broker.name, self.name, msg.ident, codec=self.request_codec
            )
        except UndecodableMessageError:
            return None

    def _dead(self, msg: _Msg, error: str, request: WorkRequest | None) -> None:
        self._state.dead.append(
            DeadLetter(
                queue=self.name,
                request_id=msg.request_id or (request.request_id if request else None),
                request=request,
                raw=None if request is not None else msg.data,
                error=error,
                attempts=msg.attempts,
                dead_letter_id=str(next(_token)),
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
                    reason = msg.last_error or f"not acknowledged after {msg.attempts} deliveries"
                    exhausted = self._request_of(msg)
                    self._dead(msg, reason, exhausted)
                    self._report_exhausted(exhausted, reason)
                    continue
                try:
                    request = decode_request(
                        msg.data, self._broker.name, self.name, msg.ident, codec=self.request_codec
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
                self._waiters.add(waiter)
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
                    self._waiters.discard(waiter)
                    # (Checked with a flag, not by catching deque.remove's
                    # ValueError: that formats the waiter's repr every time.)
                    if not waiter.popped:
                        self._state.waiters.remove(waiter)
                    elif (
                        waiter.future.done() and not waiter.future.cancelled() and not waiter.closed
                    ):
                        # We were woken: if we leave without leasing (cancelled),
                        # pass the wake-up on so no message sits unnoticed.
                        _notify_one(self._state)
            self._check_open()

    async def _poll_more(self, first: Delivery, count: int) -> list[Delivery]:
        """The rest of a ``poll_many`` batch: leased one after the other
        from what is ready now (no waiting, no task per delivery)."""
        more: list[Delivery] = []
        while len(more) < count and self._state.ready and not self._closed:
            delivery = self._lease()
            if delivery is None:
                break
            more.append(delivery)
        return more

    async def ack_many(self, deliveries: Iterable[Delivery]) -> list[bool]:
        """As :meth:`RequestQueue.ack_many`: this queue's deliveries are
        settled directly (no task per delivery), others by their own
        ``ack``."""
        items = list(deliveries)
        results: list[bool | BaseException] = [False] * len(items)
        others: list[int] = []
        for i, delivery in enumerate(items):
            if isinstance(delivery, MemoryDelivery) and delivery._queue is self:
                results[i] = self._ack(delivery._token)
            else:
                others.append(i)
        for i, result in zip(others, await ack_each(items[i] for i in others), strict=True):
            results[i] = result
        return acked_or_raise(results)

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
                    head = decode_request(
                        msg.data, self._broker.name, self.name, msg.ident, codec=self.request_codec
                    )
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
                fresh = requeued(dead.request)
                self._state.ready.append(_Msg(encode(fresh), fresh.request_id))
                moved += 1
            self._state.dead = keep
            for _ in range(moved):
                _notify_one(self._state)
        return moved

    async def replace_dead_letter(self, dead_letter_id: str, request: WorkRequest) -> bool:
        self._check_open()
        with self._broker.lock:
            if not any(d.dead_letter_id == dead_letter_id for d in self._state.dead):
                return False
        await self.enqueue(requeued(request))
        with self._broker.lock:
            self._state.dead = [d for d in self._state.dead if d.dead_letter_id != dead_letter_id]
        return True

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
            # Polls of this handle waiting for work end now (ClosedResourceError).
            for waiter in self._waiters:
                if not waiter.popped:  # (else a wake-up for work is on its way: passed on)
                    waiter.popped = waiter.closed = True
                    state.waiters.remove(waiter)
                    _wake(waiter)


def _compact_leases(state: _QueueState) -> None:
    """Drop the lease timers of settled or extended leases (caller holds the
    lock): settling leaves its timer in the heap, where it would stay until
    the lease would have expired. Rebuilt when mostly stale, so the heap
    stays within a few times the number of requests in flight."""
    state.leases = [(deadline, token) for token, (_, deadline) in state.inflight.items()]
    heapq.heapify(state.leases)
