"""The local side of a Kafka queue: buffer, timers, leases, priming.

Records fetched by the consumer thread arrive in the ready buffer (or the
timer heap while their not-before time is in the future). A lease is a
client-side deadline: expired leases go back to the front of the buffer, or
at their last attempt to the dead-letter backlog; a closing handle's
leases go back at once. ``caught_up`` waits until the backlog of the
assigned partitions is buffered. Event loop only.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from transport.errors import ClosedResourceError, TransientTransportError
from transport_kafka._records import (
    _Lease,
    _Record,
    _tokens,
)
from transport_kafka._state import _EngineState

if TYPE_CHECKING:
    from transport_kafka._queue import KafkaRequestQueue

log = logging.getLogger("transport.kafka")


class _Leases(_EngineState):
    """The engine's part that keeps the local buffer, timers and leases."""

    def _on_records(self, batch: list[_Record]) -> None:
        now = time.time()
        for rec in batch:
            if rec.not_before > now:
                heapq.heappush(self.delayed, (rec.not_before, next(_tokens), rec))
            else:
                self.ready.append(rec)
        self._notify()

    def _on_primed(self) -> None:
        self.primed = True
        self._notify()

    def _on_unprimed(self) -> None:
        self._unprime()

    def _unprime(self) -> None:
        self.primed = False
        o = self.options
        # An assignment normally arrives within a group join; past this,
        # caught_up() stops waiting for it (and says so).
        self._sync_deadline = time.monotonic() + o.session_timeout_ms / 1000 + 5.0

    async def caught_up(self, timeout: float | None) -> bool:
        """Wait until the backlog of every partition assigned so far is
        buffered (the head is known) and no reassignment of the member's
        queues is under way (a priority queue's levels move together: a
        held lower head must not win while a higher level is in transit),
        or ``timeout`` passes (False)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        o = self.options
        rebalance_limit = time.monotonic() + o.session_timeout_ms / 1000 + 5.0
        while not self.primed or self.member.rebalancing:
            if self._stopped:
                raise ClosedResourceError(f"queue {self.name!r} is closed")
            thread = self._thread
            if thread is not None and thread.done.done():
                raise TransientTransportError(f"consumer of queue {self.name!r} stopped")
            now = time.monotonic()
            if not self.primed:
                # Not while an assignment is being taken in (its blocking
                # calls are bounded by the operation timeout): it is about
                # to say what this engine holds.
                limit = self._sync_deadline
                if self.member.rebalancing:
                    limit += o.operation_timeout_s
                if now >= limit:
                    log.warning(
                        "queue %r: no partition assignment within the session timeout + 5 s; "
                        "serving without it",
                        self.name,
                    )
                    self.primed = True
                    continue
                left = limit - now
            else:
                if now >= rebalance_limit:
                    break  # served as assigned before; acks still wait for the outcome
                left = rebalance_limit - now
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                left = min(left, remaining)
            await self.wait(min(left, 1.0))
        return True

    def _purge(self) -> None:
        for key, (_, _, recs) in list(self._counted.items()):
            if not any(self._live(r) for r in recs):
                del self._counted[key]
        self.ready = deque(r for r in self.ready if self._live(r))
        self.delayed = [d for d in self.delayed if self._live(d[2])]
        heapq.heapify(self.delayed)

    def _reclaim(self, *, wake: bool = True) -> None:
        """Expired leases back to the front of the buffer (or, at their last
        attempt, to the dead-letter backlog); due delayed records to the back.
        ``wake``: wake the waiting polls if anything is ready, else only if
        something was moved."""
        now = time.monotonic()
        moved = False
        if now >= self._next_deadline:
            expired = [lease for lease in self.leases.values() if lease.deadline <= now]
            self._next_deadline = min(
                (lease.deadline for lease in self.leases.values() if lease.deadline > now),
                default=float("inf"),
            )
            for lease in expired:
                if lease.state != "held":
                    continue
                self._drop_lease(lease, "lost")
                if not self._live(lease.record):
                    continue
                moved = True
                if lease.record.attempts >= lease.handle.max_attempts:
                    self.exhausted.append(lease)
                else:
                    self.ready.appendleft(lease.record)
        if self.delayed:
            wall = time.time()
            while self.delayed and self.delayed[0][0] <= wall:
                self.ready.append(heapq.heappop(self.delayed)[2])
                moved = True
        if (moved or wake) and self.ready:
            self._notify()

    def _drop_lease(self, lease: _Lease, state: Literal["done", "lost"]) -> None:
        lease.state = state
        self.leases.pop(lease.token, None)
        lease.handle._held.discard(lease.token)

    def release(self, handle: KafkaRequestQueue) -> None:
        """Give back the unsettled deliveries of a closing handle at once."""
        for token in sorted(handle._held, reverse=True):
            lease = self.leases.get(token)
            if lease is None or lease.state != "held":
                continue
            self._drop_lease(lease, "lost")
            if self._live(lease.record):
                self.ready.appendleft(lease.record)
        handle._held.clear()
        self._notify()

    def _reserve_unseen_again(self) -> None:
        """At exit: the deliveries a priority queue held to compare levels
        (no handler saw them) become reservations again, for
        ``_withdraw_at_exit`` to withdraw as a clean close does."""
        for lease in list(self.leases.values()):
            counted = lease.counted
            if lease.unseen and lease.state == "held" and counted and self._live(lease.record):
                self._reserve_again(lease, counted)

    def _reserve_again(
        self, lease: _Lease, counted: tuple[bytes, tuple[int, dict[int, int], list[_Record]]]
    ) -> _Record:
        """End ``lease`` and make its count a reservation again (under the
        state key that counted it); returns its record."""
        key, entry = counted
        rec = lease.record
        self._drop_lease(lease, "done")
        rec.reserved = True
        rec.count_key = key
        self._counted.setdefault(key, entry)
        return rec

    def _valid(self, lease: _Lease) -> bool:
        if lease.state != "held" or self._stopped:
            return False
        if time.monotonic() >= lease.deadline:
            self._reclaim()
            return False
        return self._live(lease.record)

    async def extend(self, lease: _Lease, seconds: float | None) -> bool:
        # During a reassignment a lease stays this process's until the
        # assignment says otherwise (then the next extend or ack is False).
        if not self._valid(lease):
            return False
        lease.deadline = time.monotonic() + (seconds or lease.handle.lease_seconds)
        return True

    def local_heads(self) -> list[datetime]:
        """``enqueued_at`` of the oldest request held here unleased and due
        (at most one value; decodes at most the buffer)."""
        oldest: datetime | None = None
        for rec in self.ready:
            if not self._live(rec):
                continue
            request = self._decoded(rec)
            at = None if request is None else request.enqueued_at
            if at is not None and (oldest is None or at < oldest):
                oldest = at
        return [] if oldest is None else [oldest]
