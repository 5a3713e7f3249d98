"""``KafkaRequestQueue`` and ``KafkaDelivery``: the public face of a
durable request queue on Kafka topics.

A handle is thin: every handle of a queue in one transport shares the
queue's engine (:class:`transport_kafka._engine._QueueEngine`), whose module
docstring describes the design (topics, consuming, leases, attempts, acks,
delays, dead letters).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from transport import (
    DeadLetter,
    Delivery,
    QueueStats,
    RequestQueue,
    WorkRequest,
    decode,
    encode,
)
from transport.errors import ClosedResourceError, TransientTransportError, UndecodableMessageError
from transport.kit import ack_each, acked_or_raise, decode_request, requeued
from transport.kit import seconds as _seconds
from transport_kafka._client import KafkaContext
from transport_kafka._config import TopicNames
from transport_kafka._records import (
    _TICK,
    H_NOT_BEFORE,
    H_REQUEST_ID,
    _int_header,
    _Lease,
)

if TYPE_CHECKING:
    from transport_kafka._member import _GroupMember
    from transport_kafka._settling import _Settling

__all__ = ["KafkaDelivery", "KafkaRequestQueue"]

log = logging.getLogger("transport.kafka")


class KafkaDelivery(Delivery):
    """A request leased from a :class:`KafkaRequestQueue` (client-side lease)."""

    __slots__ = ("_engine", "_lease")

    def __init__(self, request: WorkRequest, engine: _Settling, lease: _Lease) -> None:
        self.request = request  # as Delivery.__init__ (one per delivery: no super() call)
        self._engine = engine
        self._lease = lease

    async def ack(self) -> bool:
        return await self._engine.settle(self._lease, "ack", None, None)

    async def nack(
        self, delay: float | timedelta | None = None, *, error: str | None = None
    ) -> bool:
        return await self._engine.settle(self._lease, "nack", _seconds(delay), error)

    async def extend(self, seconds: float | timedelta | None = None) -> bool:
        return await self._engine.extend(self._lease, _seconds(seconds))

    async def dead_letter(self, error: str) -> bool:
        return await self._engine.settle(self._lease, "dead", None, error)

    def _mark_unseen(self, unseen: bool) -> None:
        self._lease.unseen = unseen

    async def _release_uncounted(self) -> bool:
        return await self._engine.release_uncounted(self._lease)


class KafkaRequestQueue(RequestQueue):
    """A handle on queue ``name``; see :mod:`transport_kafka._engine` for the design."""

    def __init__(
        self,
        ctx: KafkaContext,
        name: str,
        *,
        lease_seconds: float,
        max_attempts: int,
        member: _GroupMember | None = None,
    ) -> None:
        self.name = name
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_payload_bytes = ctx.max_payload_bytes
        self._ctx = ctx
        self._engine = ctx.engines.acquire(name, member)
        self._held: set[int] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<KafkaRequestQueue {self.name!r} topic={self._engine.topics.requests!r}>"

    @property
    def topics(self) -> TopicNames:
        return self._engine.topics

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"queue {self.name!r} is closed")

    async def _store_request(self, request: WorkRequest, body: bytes) -> None:
        await self._engine.ensure_topics()
        await self._engine.clients.produce(
            self.topics.requests,
            request.message_key.encode(),
            body,
            what=f"enqueue to {self.name!r}",
        )

    async def caught_up(self, timeout: float | None = None) -> bool:
        """True once the backlog of the partitions assigned to this process
        is fetched (after joining the group, and again after every
        rebalance that assigns partitions); joins the group if needed."""
        self._check_open()
        await self._engine.start()
        try:
            await self._engine.poller_enter()
            return await self._engine.caught_up(timeout)
        finally:
            self._engine.poller_exit()

    async def poll(self, timeout: float | None = None) -> KafkaDelivery | None:
        self._check_open()
        timeout = _seconds(timeout)  # a negative timeout is refused, as for nack/extend
        await self._engine.start()
        try:
            await self._engine.poller_enter()
            return await self._take_first(timeout)
        finally:
            self._engine.poller_exit()

    async def poll_many(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        """As :meth:`RequestQueue.poll_many`, from the engine's buffer: the
        rest of the batch is what is buffered now, its delivery counts
        written in rounds of up to 1,024 records per state-topic write (the
        whole batch counts as demand, so the rounds are full ones)."""
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        self._check_open()
        timeout = _seconds(timeout)
        engine = self._engine
        await engine.start()
        more = max_count - 1
        try:
            await engine.poller_enter(more)
            first = await self._take_first(timeout)
            if first is None:
                return []
            batch: list[Delivery] = [first]
            try:
                await engine.take_many(self, max_count - 1, batch)
            except Exception as exc:  # what was leased is handed out; the next call meets it
                log.debug("queue %r: poll_many stopped after %d: %s", self.name, len(batch), exc)
            return batch
        finally:
            engine.poller_exit(more)

    async def _take_first(self, timeout: float | None) -> KafkaDelivery | None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        extended = False
        while True:
            self._check_open()
            delivery = await self._engine.take(self)
            if delivery is not None:
                return delivery
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is None:
                self._check_reachable(ended=False)
            elif remaining <= 0:
                self._check_reachable(ended=True)
                if extended or self._engine.primed:
                    return None
                # Still joining the group, or fetching the backlog of
                # partitions just assigned: "nothing" would mean "not known
                # yet", not "empty". The poll's time is extended once until
                # the head is known (a first join takes about 3 s with the
                # broker's group.initial.rebalance.delay.ms), at most the
                # operation timeout, as pulsar:// gives a first poll a
                # grace. A drain loop of poll(timeout=3) on a cold start
                # ended at once with 200 requests waiting.
                extended = True
                await self._engine.caught_up(self._engine.options.operation_timeout_s)
                continue
            await self._engine.wait(_TICK if remaining is None else min(remaining, 1.0))

    def _check_reachable(self, *, ended: bool) -> None:
        """A poll that ends while no broker is reachable raises instead of
        answering "empty" (at its timeout, as on the other backends); one
        without a timeout raises once the brokers have been unreachable for
        the operation timeout."""
        down = self._engine.member.unreachable_for()
        if down is None:
            return
        limit = self._engine.options.operation_timeout_s
        if ended or down >= limit:
            raise TransientTransportError(
                f"queue {self.name!r}: no Kafka broker reachable for {down:.1f} s"
            )

    async def ack_many(self, deliveries: Iterable[Delivery]) -> list[bool]:
        """As :meth:`RequestQueue.ack_many`: this queue's deliveries are
        settled together (one group commit covers them all; a "settled"
        marker only for those an earlier unsettled record keeps uncovered),
        any other delivery by its own ``ack``."""
        items = list(deliveries)
        engine = self._engine
        mine: list[int] = []
        leases: list[_Lease] = []
        others: list[int] = []
        for i, delivery in enumerate(items):
            if isinstance(delivery, KafkaDelivery) and delivery._engine is engine:
                mine.append(i)
                leases.append(delivery._lease)
            else:
                others.append(i)
        results: list[bool | BaseException] = [False] * len(items)
        if others:
            batch, single = await asyncio.gather(
                engine.ack_leases(leases), ack_each(items[i] for i in others)
            )
        else:
            # Only this queue's deliveries (the usual case): settled in this
            # step, so the commit round is requested at once, not after
            # whatever the loop runs before a new task's first step.
            batch, single = await engine.ack_leases(leases), []
        for i, result in zip(mine, batch, strict=True):
            results[i] = result
        for i, result in zip(others, single, strict=True):
            results[i] = result
        return acked_or_raise(results)

    async def stats(self) -> QueueStats:
        """Depth is the group's lag: for partitions this transport consumes,
        the records it has not fetched plus the ones it holds unleased
        (ready or delayed); for the others, the high watermark minus the
        committed offset (their leased and out-of-order-acked records
        included). ``in_flight`` and ``delayed`` are this transport's.

        ``head_enqueued_at`` is the oldest ``enqueued_at`` among the first
        waiting request of each partition: for partitions this transport
        consumes, the requests it holds unleased and not delayed, and the
        first record it has not fetched yet; for the others, the first
        record at the group's committed offset, i.e. the oldest request
        *not yet committed* — it may be leased by another worker, or acked
        out of order and waiting for its commit (a settled marker), until
        that worker commits past it. Records whose ``ae-not-before`` is in
        the future (a delayed nack) and undecodable ones do not count. The
        cost is bounded: one assign()-ed fetch per partition with lag, which
        joins no group and commits nothing, within the operation timeout;
        ``None`` if nothing waits or that read fails (the other figures are
        still reported).

        Raises: TransientTransportError (broker unreachable, timeout).
        """
        self._check_open()
        engine = self._engine
        clients = engine.clients
        await engine.ensure_topics()
        await engine.commit_now()
        topic = self.topics.requests
        parts = await clients.partitions(topic)
        marks = await clients.watermarks(topic, parts)
        # The fetch positions and the local buffer in the same loop step: a
        # batch fetched between the two was counted twice, as lag and as
        # buffered (depth 5 of 4 requests, seen in a fresh-clone run).
        owned = engine.tracker.snapshot() if engine.running else {}
        ready, delayed = engine.local_counts() if engine.running else (0, 0)
        need = [p for p in parts if p not in owned or owned[p][1] is None]
        committed = await clients.committed(self.topics.group, topic, need) if need else {}
        depth = 0
        lag: dict[str, int] = {}
        unread: dict[int, int] = {}  # partition → first offset nobody here has fetched
        for p in parts:
            low, high = marks[p]
            if p in owned and owned[p][1] is not None:
                position = owned[p][1] or 0
            else:
                position = committed.get(p, -1)
                position = position if position >= 0 else low
            lag[str(p)] = max(0, high - position)
            depth += lag[str(p)]
            if high > max(position, low):
                unread[p] = max(position, low)  # below low: trimmed by retention
        dead = await self._dead_entries()
        unread_heads = await self._unread_heads(unread)
        heads = engine.local_heads() if engine.running else []
        # A backlog whose head could not be read: the age is unknown, not
        # the (younger) age of what this process holds.
        head = None if unread_heads is None else min(heads + unread_heads, default=None)
        return QueueStats(
            queue=self.name,
            depth=depth + ready + delayed,
            in_flight=engine.in_flight(),
            delayed=delayed,
            dead_lettered=len(dead),
            head_enqueued_at=head,
            partition_lag=lag,
        )

    async def _unread_heads(self, positions: dict[int, int]) -> list[datetime] | None:
        """``enqueued_at`` of the first waiting request at or after each
        partition's position (see :meth:`stats`); None if the read fails."""
        if not positions:
            return []
        try:
            found = await self._engine.clients.read_heads(self.topics.requests, positions)
        except TransientTransportError as exc:
            log.debug("queue %r: head of the backlog not read: %s", self.name, exc)
            return None
        now = time.time()
        out: list[datetime] = []
        for records in found.values():
            for raw in records:
                if _int_header(raw.headers, H_NOT_BEFORE) / 1000 > now:
                    continue  # a delayed nack: not waiting yet
                carried = raw.headers.get(H_REQUEST_ID)
                try:
                    request = decode_request(
                        raw.value or b"",
                        raw.topic,
                        raw.partition,
                        raw.offset,
                        carried_id=carried.decode("utf-8", "replace") if carried else None,
                        codec=self.request_codec,
                    )
                except UndecodableMessageError:
                    continue  # dead-lettered when a worker reaches it
                if request.enqueued_at is not None:
                    out.append(request.enqueued_at)
                break
        return out

    async def _dead_entries(self) -> list[tuple[bytes, DeadLetter | None]]:
        await self._engine.ensure_topics()
        latest: dict[bytes, tuple[int, bytes | None]] = {}
        for rec in await self._engine.clients.read_to_end(self.topics.dlq):
            if rec.key is not None:
                latest[rec.key] = (rec.offset, rec.value)
        out: list[tuple[bytes, DeadLetter | None]] = []
        for key, (_, value) in sorted(latest.items(), key=lambda kv: kv[1][0]):
            if value is None:
                continue
            try:
                out.append((key, decode(DeadLetter, value)))
            except UndecodableMessageError:
                out.append((key, None))
        return out

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        self._check_open()
        entries = await self._dead_entries()
        return [
            dead.model_copy(update={"dead_letter_id": key.decode("utf-8", "replace")})
            for key, dead in entries
            if dead is not None
        ][:limit]

    async def replace_dead_letter(self, dead_letter_id: str, request: WorkRequest) -> bool:
        self._check_open()
        key = dead_letter_id.encode()
        if not any(k == key and dead is not None for k, dead in await self._dead_entries()):
            return False
        await self.enqueue(requeued(request))
        await self._engine.clients.produce(
            self.topics.dlq, key, None, what="replacing a dead letter (dlq tombstone)"
        )
        return True

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        self._check_open()
        wanted = None if request_ids is None else set(request_ids)
        moved = 0
        clients = self._engine.clients
        for key, dead in await self._dead_entries():
            if dead is None or dead.request is None:
                continue
            if wanted is not None and dead.request_id not in wanted:
                continue
            fresh = requeued(dead.request)
            await clients.produce(
                self.topics.requests, fresh.message_key.encode(), encode(fresh), what="requeue"
            )
            await clients.produce(self.topics.dlq, key, None, what="requeue (dlq tombstone)")
            moved += 1
        return moved

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine.release(self)
        await self._ctx.engines.release(self.name)
