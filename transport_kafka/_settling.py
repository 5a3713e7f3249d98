"""Handing out and settling deliveries of a Kafka queue (event loop).

``take`` hands the head of the buffer out once its delivery is counted;
``settle`` acks (durable on return: group commit, or a "settled" marker
when an earlier record holds the commit back), nacks (re-produce with
headers, then settle) or dead-letters (produce to the DLQ, then settle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Literal

from transport import (
    DeadLetter,
    Delivery,
    WorkRequest,
)
from transport.errors import TransientTransportError
from transport.kit import encode_dead_letter, error_header, replace_fields, wait_within
from transport_kafka._assignment import _Assignment
from transport_kafka._queue import KafkaDelivery
from transport_kafka._records import (
    _MARKER_AFTER_S,
    _SETTLED,
    _TICK,
    H_ATTEMPTS,
    H_ERROR,
    H_NOT_BEFORE,
    H_REQUEST_ID,
    _Lease,
    _Record,
)

if TYPE_CHECKING:
    from transport_kafka._queue import KafkaRequestQueue

log = logging.getLogger("transport.kafka")


def _finish_round(
    future: asyncio.Future[None], waiters: list[asyncio.Future[None]], error: BaseException | None
) -> None:
    """End a commit round (the thread ran it, or it timed out): its future
    and the futures of the acks waiting for it (see ``_Settling._round``)."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
        future.exception()  # a round nobody waits for any more is not an error
    for waiter in waiters:
        if waiter.done():  # its ack was cancelled
            continue
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)
    waiters.clear()


class _Settling(_Assignment):
    """The engine's part that hands deliveries out and settles them."""

    async def take(self, handle: KafkaRequestQueue) -> KafkaDelivery | None:
        self._reclaim(wake=False)
        if self.exhausted:
            await self._drain_exhausted()
        while self.ready:
            if self.member.rebalancing:
                return None  # the member's queues are moving together (see _GroupMember)
            rec = self.ready[0]
            if not self._live(rec) or rec.partition in self._handing_over:
                self.ready.popleft()  # gone, or going: the next owner hands it out
                continue
            if rec.counting:
                # Its count (the coming delivery included) is being
                # written: not exhausted by a delivery not made yet.
                await self._reserve(handle.max_attempts)
                continue
            request = self._decoded(rec)
            exhausted = rec.attempts - rec.reserved >= handle.max_attempts
            if request is None or exhausted:
                self.ready.popleft()
                try:
                    if request is None:
                        reason = rec.undecodable or "undecodable"
                        await self.dead_letter(rec, reason, None, attempts=rec.attempts + 1)
                    else:
                        rec.deliveries -= rec.reserved
                        rec.reserved = False
                        rec.count_key = None
                        reason = (
                            rec.last_error or f"not acknowledged after {rec.attempts} deliveries"
                        )
                        await self.dead_letter(rec, reason, request)
                        handle._report_exhausted(request, reason)
                except BaseException:
                    self.ready.appendleft(rec)
                    raise
                continue
            if not rec.reserved:
                await self._reserve(handle.max_attempts)
                continue  # the head may have changed meanwhile
            # Counted, decoded, live and not exhausted: handed out as a
            # batch poll hands out each of its run.
            out: list[Delivery] = []
            if self._take_counted(handle, 1, out):
                return out[0]  # type: ignore[return-value]
        return None

    async def take_many(self, handle: KafkaRequestQueue, limit: int, out: list[Delivery]) -> None:
        """Hand up to ``limit`` more deliveries out into ``out``, as that
        many ``take`` calls would: the run of records at the head of the
        buffer whose count is written already is leased in one pass
        (:meth:`_take_counted`); a head that needs more (a count to write,
        a dead letter, a record gone) goes through ``take``. Stops when
        nothing is ready; an error after some deliveries were handed out
        leaves them in ``out``."""
        target = len(out) + limit
        self._reclaim(wake=False)
        while len(out) < target and self.ready and not handle._closed:
            if self._take_counted(handle, target - len(out), out):
                continue
            delivery = await self.take(handle)
            if delivery is None:
                return
            out.append(delivery)

    def _take_counted(self, handle: KafkaRequestQueue, limit: int, out: list[Delivery]) -> int:
        """Lease, without waiting, up to ``limit`` records from the head of
        the buffer as ``take`` would hand each out: live, counted (reserved,
        no count being written), decoded and not exhausted; stops at the
        first record that is not. Returns how many were handed out."""
        if self.member.rebalancing:
            return 0
        ready = self.ready
        outstanding = self.tracker.is_outstanding
        handing_over = self._handing_over
        counted = self._counted
        leases = self.leases
        held = handle._held
        max_attempts = handle.max_attempts
        now = time.monotonic()
        deadline = now + handle.lease_seconds
        taken = 0
        while taken < limit and ready:
            rec = ready[0]
            if not outstanding(rec.partition, rec.offset, rec.generation):
                ready.popleft()  # settled or moved away meanwhile
                continue
            request = rec.request
            if (
                request is None
                or not rec.reserved
                or rec.counting
                or rec.partition in handing_over
                or rec.base + rec.deliveries - 1 >= max_attempts
            ):
                break
            ready.popleft()
            key = rec.count_key
            rec.reserved = False
            rec.count_key = None
            attempts = rec.base + rec.deliveries
            if request.attempt != attempts:  # the count is ours, never the body's
                request = replace_fields(request, attempt=attempts)
            lease = _Lease(rec, request, handle, deadline)
            if key is not None:
                entry = counted.get(key)
                if entry is not None:
                    lease.counted = (key, entry)
            leases[lease.token] = lease
            held.add(lease.token)
            out.append(KafkaDelivery(request, self, lease))
            taken += 1
        if taken:
            self._next_deadline = min(self._next_deadline, deadline)
            # Their acks will want a commit soon: the consumer thread polls
            # with the short tick meanwhile, so it runs the commit promptly.
            self._acks_busy_until = now + 1.0
            self._reserve_ahead(max_attempts)
        return taken

    async def release_uncounted(self, lease: _Lease) -> bool:
        """Give back a delivery no handler saw, as if it had not happened:
        its count in the state topic becomes a reservation again (the next
        hand-out uses it; a clean close or revocation withdraws it). With a
        single attempt the count is withdrawn at once instead: left as a
        reservation, a kill would exhaust the request unseen."""
        if lease.counted is None or not self._valid(lease):
            return False
        rec = self._reserve_again(lease, lease.counted)
        # Unreserved (with one attempt) before anyone can take it again.
        write = self._withdrawal_of(rec) if lease.handle.max_attempts < 2 else None
        self.ready.appendleft(rec)
        self._notify()
        if write is not None:
            await self.clients.produce(
                self.topics.state, *write, what="withdrawing a delivery count"
            )
        return True

    async def settle(
        self,
        lease: _Lease,
        how: Literal["ack", "nack", "dead"],
        delay: float | None,
        error: str | None,
    ) -> bool:
        if not self._valid(lease):
            return False
        lease.state = "settling"
        rec = lease.record
        try:
            # Durable on return: during a reassignment, wait for its outcome
            # (the lease was valid when the call was made).
            if self.member.rebalancing:
                await self._rebalanced()
            if not self._live(rec):
                self._drop_lease(lease, "lost")
                return False
            if how == "ack":
                ok = await self.settle_record(rec)
            elif how == "dead" or rec.attempts >= lease.handle.max_attempts:
                reason = error or rec.last_error or f"nacked after {rec.attempts} deliveries"
                ok = await self.dead_letter(rec, reason, lease.request)
            else:
                await self.republish(rec, delay, error)
                ok = await self.settle_record(rec)
        except BaseException:
            if lease.state == "settling":
                lease.state = "held"
                self._next_deadline = min(self._next_deadline, lease.deadline)
            raise
        self._drop_lease(lease, "done")
        return ok

    async def ack_leases(self, leases: list[_Lease]) -> list[bool | BaseException]:
        """Ack many leases as ``settle(lease, "ack")`` would each, together:
        one wait for a reassignment, one commit round for all of them, and
        "settled" markers (written concurrently) only for those an earlier
        record keeps uncovered past ``_MARKER_AFTER_S``. One result per
        lease, in order: its ack's result or the error that left it
        unsettled (that lease is held again, as after a failed ``ack``)."""
        results: list[bool | BaseException] = [False] * len(leases)
        settling: list[int] = []
        if not self._stopped:
            now = time.monotonic()
            expired = False
            for i, lease in enumerate(leases):
                # As _valid(lease), with one clock read for the batch (and
                # being live is what settling it below checks).
                if lease.state != "held":
                    continue
                if now >= lease.deadline:
                    expired = True
                    continue
                lease.state = "settling"
                settling.append(i)
            if expired:
                self._reclaim()
        tracker = self.tracker
        waiting: list[int] = []
        handovers: list[int] = []
        completed = False
        try:
            if self.member.rebalancing:
                await self._rebalanced()
            recs = [leases[i].record for i in settling]
            settled = tracker.settle_many([(r.partition, r.offset, r.generation) for r in recs])
            handing_over = self._handing_over
            for i, rec, ok in zip(settling, recs, settled, strict=True):
                if not ok:  # settled already, or gone with its partition
                    self._drop_lease(leases[i], "lost")
                elif rec.partition in handing_over:
                    handovers.append(i)
                else:
                    waiting.append(i)
            if handovers:
                done = await asyncio.gather(
                    *(self._settle_at_hand_over(leases[i].record) for i in handovers),
                    return_exceptions=True,
                )
                for i, result in zip(handovers, done, strict=True):
                    results[i] = result
            waiting = await self._commit_covering(leases, waiting, results)
            if waiting:
                written = await asyncio.gather(
                    *(self._write_marker(leases[i].record, _SETTLED) for i in waiting),
                    return_exceptions=True,
                )
                for i, error in zip(waiting, written, strict=True):
                    rec = leases[i].record
                    p, off, gen = rec.partition, rec.offset, rec.generation
                    if isinstance(error, BaseException) and not tracker.covered(p, off, gen):
                        tracker.unsettle(p, off, gen)
                        results[i] = error
                        continue
                    results[i] = (
                        tracker.covered(p, off, gen)
                        or tracker.current(p, gen)
                        or rec.marked_at_handover
                    )
            completed = True
        finally:
            live = self.leases
            for i in settling:
                lease = leases[i]
                if lease.state != "settling":
                    continue
                if not completed or isinstance(results[i], BaseException):
                    lease.state = "held"  # not settled: held again, as after a failed ack
                    self._next_deadline = min(self._next_deadline, lease.deadline)
                else:  # _drop_lease(lease, "done"), inline: once per delivery
                    lease.state = "done"
                    live.pop(lease.token, None)
                    lease.handle._held.discard(lease.token)
        return results

    async def _commit_covering(
        self, leases: list[_Lease], waiting: list[int], results: list[bool | BaseException]
    ) -> list[int]:
        """Wait for commit rounds until each settled record of ``waiting`` is
        covered (result True) or its partition moved away (False), for at
        most ``_MARKER_AFTER_S``; returns those still uncovered."""
        tracker = self.tracker
        since = time.monotonic()
        self._acks_busy_until = since + 1.0
        while waiting and not self._stopped:
            try:
                await self._round()
            except Exception as exc:  # the markers still make them durable
                log.info("queue %r: commit for acks failed: %s", self.name, exc)
                break
            left = []
            recs = [leases[i].record for i in waiting]
            covered = tracker.covered_many([(r.partition, r.offset, r.generation) for r in recs])
            for i, rec, done in zip(waiting, recs, covered, strict=True):
                if done or rec.marked_at_handover:
                    results[i] = True
                elif not tracker.current(rec.partition, rec.generation):
                    results[i] = False
                else:
                    left.append(i)
            waiting = left
            if time.monotonic() - since >= _MARKER_AFTER_S:
                break
        return waiting

    async def _rebalanced(self) -> None:
        """Wait (up to ``operation_timeout_s``) while the member's queues are
        being reassigned: whether a lease is still this process's is known
        only when the assignment is (see ``_GroupMember.tentative``)."""
        if not self.member.rebalancing:
            return
        deadline = time.monotonic() + self.options.operation_timeout_s
        while self.member.rebalancing and not self._stopped and time.monotonic() < deadline:
            await self.wait(_TICK)

    async def settle_record(self, rec: _Record) -> bool:
        """Settle ``rec`` durably (group commit): returns True once a commit
        covers it, or — if an earlier record keeps the committable position
        below it for ``_MARKER_AFTER_S`` — once its "settled" marker is
        written. False if its partition moved to another consumer before
        either happened (the new owner delivers it again). Raises if neither
        could be written (the record is then unsettled again)."""
        tracker = self.tracker
        p, off, gen = rec.partition, rec.offset, rec.generation
        if not tracker.settle(p, off, gen):
            return False
        if p in self._handing_over:
            return await self._settle_at_hand_over(rec)
        since = time.monotonic()
        self._acks_busy_until = since + 1.0
        while not self._stopped:
            try:
                await self._round()
            except Exception as exc:  # the marker below still makes it durable
                log.info("queue %r: commit for acks failed: %s", self.name, exc)
                break
            if tracker.covered(p, off, gen) or rec.marked_at_handover:
                return True
            if not tracker.current(p, gen):
                return False  # moved away before a commit covered it
            if time.monotonic() - since >= _MARKER_AFTER_S:
                break
        try:
            await self._write_marker(rec, _SETTLED)
        except BaseException:
            if not tracker.covered(p, off, gen):
                tracker.unsettle(p, off, gen)
            raise
        return tracker.covered(p, off, gen) or tracker.current(p, gen) or rec.marked_at_handover

    async def _settle_at_hand_over(self, rec: _Record) -> bool:
        """An ack while ``rec``'s partition is being handed over (the
        consumer thread waits in the revocation, see ``_hand_over``): made
        durable by a "settled" marker, which the hand-over waits for before
        the partition moves (the next owner then skips the record)."""
        write = asyncio.ensure_future(self._write_marker(rec, _SETTLED))
        self._hand_over_writes.add(write)
        write.add_done_callback(self._hand_over_writes.discard)
        self._notify()  # wakes the hand-over
        try:
            await asyncio.shield(write)
        except BaseException:
            if write.done():  # the marker was not written: not durable
                self.tracker.unsettle(rec.partition, rec.offset, rec.generation)
            raise
        rec.marked_at_handover = True
        return True

    def _round(self) -> asyncio.Future[None]:
        """A future of the caller's own that ends as the next commit round
        does (:meth:`_commit_round`): cancelling it leaves the round to the
        other acks, as ``asyncio.shield`` of the round would, at one future
        per ack instead of two and their callbacks."""
        future = self._commit_round()
        waiter = future.get_loop().create_future()
        if future.done():
            error = future.exception()
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
        else:
            self._round_waiters.append(waiter)
        return waiter

    def _commit_round(self) -> asyncio.Future[None]:
        """The next commit the consumer thread has not started yet: every
        ack settled before it starts is covered by it (unless an earlier
        record is still outstanding). Fails after ``operation_timeout_s``."""
        pending = self._next_commit
        if pending is not None and self._commit_token is not None and not pending.done():
            return pending
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        thread = self._thread
        if thread is None or not thread.alive or self._consumer_closed:
            future.set_result(None)
            return future
        token = object()
        self._commit_token = token
        self._next_commit = future
        waiters: list[asyncio.Future[None]] = []
        self._round_waiters = waiters

        def run() -> None:  # on the consumer thread
            if self._commit_token is token:  # later acks join a new round
                self._commit_token = None
            try:
                self._commit()
            finally:
                with contextlib.suppress(RuntimeError):  # loop closed
                    loop.call_soon_threadsafe(_finish_round, future, waiters, None)

        timer = loop.call_later(
            self.options.operation_timeout_s,
            _finish_round,
            future,
            waiters,
            TransientTransportError(f"queue {self.name!r}: no commit within the timeout"),
        )
        future.add_done_callback(lambda _: timer.cancel())
        self._round_run = run  # a hand-over in progress runs it (see _hand_over_from_thread)
        thread.post(run)
        return future

    async def commit_now(self) -> None:
        if self._thread is not None and self._thread.alive and not self._stopped:
            with contextlib.suppress(Exception):
                await wait_within(
                    self._thread.submit(self._commit), self.options.operation_timeout_s
                )

    async def dead_letter(
        self, rec: _Record, error: str, request: WorkRequest | None, *, attempts: int | None = None
    ) -> bool:
        raw: bytes | None = None
        if request is None:
            raw = rec.value or b""
        dead = DeadLetter(
            queue=self.name,
            request_id=request.request_id if request else None,
            request=request,
            raw=raw,
            error=error_header(error),  # at most 4 KiB: the record stays under the limit
            attempts=attempts if attempts is not None else rec.attempts,
        )
        key = f"{request.request_id if request else 'raw'}.{rec.partition}.{rec.offset}".encode()
        body = encode_dead_letter(dead, self.ctx.max_payload_bytes)
        await self.clients.produce(self.topics.dlq, key, body, what="dead-lettering")
        return await self.settle_record(rec)

    async def republish(self, rec: _Record, delay: float | None, error: str | None) -> None:
        headers = {H_ATTEMPTS: str(rec.attempts).encode()}
        if rec.request is not None:
            headers[H_REQUEST_ID] = rec.request.request_id.encode()
        last = error or rec.last_error
        if last:
            headers[H_ERROR] = error_header(last).encode()
        if delay:
            headers[H_NOT_BEFORE] = str(int((time.time() + delay) * 1000)).encode()
        # The record's own key (the ordering key or request id it was
        # enqueued with): the copy stays on its partition, behind the
        # requests of that key enqueued since.
        await self.clients.produce(self.topics.requests, rec.key, rec.value, headers, what="nack")

    async def _drain_exhausted(self) -> None:
        while self.exhausted:
            lease = self.exhausted.pop(0)
            rec = lease.record
            if not self._live(rec):
                continue
            reason = rec.last_error or f"not acknowledged after {rec.attempts} deliveries"
            try:
                await self.dead_letter(rec, reason, lease.request)
            except BaseException:
                self.exhausted.insert(0, lease)
                raise
            lease.handle._report_exhausted(lease.request, reason)
