"""The Kafka queue engine: the design of ``KafkaRequestQueue``, a durable
request queue on Kafka topics (the handles are in :mod:`._queue`).

Topics of queue ``Q`` in namespace ``NS`` (all created explicitly, never by
auto-create):

* ``NS.Q.requests`` — the requests, keyed by their ``ordering_key`` if set,
  else by ``request_id`` (``partitions`` option, default 4; 1 is the
  strict-FIFO mode): requests of one ordering key share a partition, so
  they are handed out in enqueue order;
* ``NS.Q.state`` — compacted, one partition: per-record delivery counts and
  "settled" markers, keyed ``"<partition>:<offset>"``;
* ``NS.Q.dlq`` — compacted, one partition: dead letters keyed
  ``"<request_id>.<partition>.<offset>"``; a tombstone means "requeued";
* consumer group ``NS.<consumer_group>.Q``.

**Priority queues: one membership for all levels.** The levels
``Q__p0`` … of priority queue ``Q`` are one consumer per transport
(:class:`_GroupMember`) subscribed to every level's request topic in the
group ``NS.<consumer_group>.Q.priority`` with the ``range`` assignor, so
partition k of every level belongs to the same member, a rebalance revokes
and assigns all levels together, and a start is one group join. With one
partition per level one process serves the whole priority queue (others
idle, as on any ordered single-partition queue): no process serves a lower
level while another holds a higher level's backlog. The member that joined
first sorts first (join time in its ``client.id``) and so keeps the levels
when another joins; ``range`` being eager, its revocation is tentative while
it stays subscribed (safe positions committed, reserved counts withdrawn,
nothing handed out) and partitions assigned back keep their leases and
buffer. A level's committed positions in its former own group
(``NS.<consumer_group>.Q__pL``) are adopted when the new group has none.

**Consuming.** Each transport runs one consumer per queue (per priority
queue) in the group, on its own thread, which polls continuously (so ``max.poll.interval.ms`` never
expires however long a handler runs) and hands records to the event loop.
Auto-commit and auto offset store are off. Settled offsets are tracked per
partition (:mod:`transport_kafka._offsets`) and only the contiguous settled
prefix is committed, every ``commit_interval_ms`` and synchronously on
revocation and close — never past an unsettled record. **Hand-over:** a
revocation while the consumer stays in the group (another process joined)
first waits, up to ``handover_wait_s``, for the requests handed out from the
revoked partitions to be settled (no more of them are handed out
meanwhile; the thread runs the commits that acks of the kept partitions
wait for); acks made meanwhile write "settled" markers, so the next owner
skips those records and the acks return True. When the local
buffer holds ``max_buffered`` records fetched and not handed out (the
deliveries the application holds do not count), the partitions are paused
(backpressure) and resumed at half of that. After every assignment the
queue is not ``caught_up()`` until the backlog of the new partitions (up to
their high watermarks) is fetched or the buffer is full.

**Leases are client-side.** Kafka has no per-record lease: a partition
belongs to one consumer until a rebalance. A delivery not acked or extended
within ``lease_seconds`` goes back to this process's local buffer and is
handed to the next ``poll`` of *this process* (any handle of this transport
on the queue). Kafka moves partitions between processes only on rebalance,
i.e. when a consumer dies (session timeout), leaves (``aclose``) or joins;
then the new owner resumes from the committed offset.

**Attempts.** Kafka counts no deliveries, so before a record is handed out
its delivery count is written to the state topic (acks=all). Polls in
progress share one round of these writes, which also counts the next few
records ahead (at most twice the polls in progress). A consumer that gives
a partition up cleanly (``aclose()``, a rebalance, interpreter exit
without ``aclose()``) first withdraws the counts it reserved for records
it did not hand out (it rewrites their state
keys: the latest value of a key holds), and a delivery given back unseen by
a handler (a priority queue's held head) is such a reservation again; a process killed has counted a
delivery of those records it never handed out (at most twice the demand:
polls in progress, the rest of a batch poll, leases held; 1,024 at most),
as a broker counts a
prefetched batch. A consumer that gets a partition replays the state
topic, so after a crash ``attempt`` keeps counting.

**Acks are durable on return (group commit).** An ack marks the offset
settled locally and waits for a synchronous commit covering it; the acks
given while one commit is on the wire share the next one. A record acked
out of order (an earlier one is still being worked on) gets a "settled"
marker in the state topic instead if no commit covers it within 50 ms, so
that it is not delivered again after a crash or rebalance. If the
partition moves to another consumer before either, the ack returns False
(the record will be delivered again). Markers below the committed offset
are tombstoned.

**nack and delays.** A partition cannot skip one record, so ``nack(delay)``
re-produces the request to the same topic (same key, so the same partition)
with headers ``ae-attempts`` (deliveries so far), ``ae-not-before`` (epoch
ms), ``ae-error`` and ``ae-request-id`` (the id delivered, so a foreign body
without one keeps the id derived from its original partition and offset),
and then settles the original. A consumer that reads a
record whose not-before time is in the future keeps it in a local timer heap
(still unsettled, so it is never committed past and survives a crash) while
the rest of the partition keeps flowing. A crash between the re-produce and
the settle gives a duplicate, never a loss. Delays are therefore
client-side (``native_delay`` is false) and a redelivered request goes to the
back of its partition.

**Dead letters.** After ``max_attempts`` deliveries (a nack at the last
attempt, or a lease that ran out at the last attempt) or on
``dead_letter()``, the request is produced to the DLQ with its last error
and attempt count, then settled. Undecodable records are dead-lettered with
``request=None`` and the raw text. ``dead_letters()`` reads the DLQ to its
high watermark (last record per key wins); ``requeue_dead_letters()``
re-produces the request first and tombstones its DLQ key second (a crash in
between gives a duplicate, never a loss).

**Layout.** One engine per queue and transport, shared by its handles
(counted in the transport's :class:`Engines`, reached through its
:class:`~transport_kafka._client.KafkaContext`):
:class:`_QueueEngine` (here: topics, start, stop, the maintenance task)
joins its parts, each on the fields of :mod:`._state`:
:mod:`._counts` (delivery-count rounds and their withdrawal),
:mod:`._leases` (buffer, timers, leases, priming; event loop),
:mod:`._assignment` (the consumer-thread side: commits, markers,
assignment, revocation) and :mod:`._settling` (hand-out, ack, nack, dead
letters). :mod:`._member` owns the consumer and its thread;
:mod:`._records` holds the record and lease types, headers and the
state-topic format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from transport.errors import ClosedResourceError, TransientTransportError
from transport_kafka._client import KafkaContext, TopicSpec
from transport_kafka._records import _TICK
from transport_kafka._settling import _Settling
from transport_kafka._topics import keep_until_consumed

if TYPE_CHECKING:
    from transport_kafka._member import _GroupMember

log = logging.getLogger("transport.kafka")


class _QueueEngine(_Settling):
    """One queue in one transport, shared by every handle of that queue in
    the transport; it consumes through its :class:`_GroupMember` (its own,
    or the one of its priority queue). Loop-side state (buffer, timers,
    leases) is touched only on the event loop; the consumer only on its
    thread; the offset tracker is the thread-safe meeting point. Its parts
    are listed under **Layout** in the module docstring."""

    def __init__(self, ctx: KafkaContext, name: str, member: _GroupMember | None = None) -> None:
        super().__init__(ctx, name, member)
        self.member.add(self)

    def topic_specs(self) -> list[TopicSpec]:
        compact = {"cleanup.policy": "compact"}
        q = f"queue {self.name!r}"
        # One partition is what ordered=True promises (a capability flag).
        ordered = self.ctx.ordered
        return [
            TopicSpec(
                self.topics.requests,
                self.options.partitions,
                what=f"requests of {q}",
                exact_partitions=f"{q} reports ordered=True, which holds on one partition "
                "only (the option partitions>1 gives that promise up)"
                if ordered
                else None,
                compaction_loses="requests that share a key (ordering key or request id)",
                config=keep_until_consumed(self.options.retention_bytes),
                retention_loses="requests not yet consumed",
            ),
            TopicSpec(self.topics.state, 1, compact, what=f"delivery state of {q}"),
            TopicSpec(self.topics.dlq, 1, compact, what=f"dead letters of {q}"),
        ]

    async def ensure_topics(self) -> None:
        if not self.clients.known(self._topic_names):
            await self.clients.ensure_topics(self.topic_specs())

    async def start(self) -> None:
        if self._stopped:
            raise ClosedResourceError(f"queue {self.name!r} is closed")
        if not self.member.started:  # started: checked without a coroutine per poll
            await self.member.start()
        thread = self._thread
        if thread is not None and thread.failed is not None:
            raise TransientTransportError(
                f"consumer of queue {self.name!r} failed: {thread.failed}"
            )

    def _started(self, loop: asyncio.AbstractEventLoop) -> None:
        """The member subscribed (loop side, before its thread starts)."""
        self._loop = loop
        self._unprime()
        if self._maint is None and not self._stopped:
            self._maint = asyncio.create_task(self._maintain(), name=f"kafka-maint-{self.name}")

    def _idle_with_work(self, idle: float) -> bool | None:
        """For the member's hand-off: None if this queue is busy (a poll in
        progress, active within ``idle`` seconds or a live lease), else
        whether it holds buffered work."""
        if self._stopped:
            return False
        if self._pollers or time.monotonic() - self._last_active < idle:
            return None
        if any(lease.state in ("held", "settling") for lease in self.leases.values()):
            return None
        ready, delayed = self.local_counts()
        return bool(ready or delayed)

    async def poller_enter(self, more: int = 0) -> None:
        """Called when a poll begins (``more``: the further deliveries a
        batch poll wants): joins the group again after a hand-off."""
        self._pollers += 1
        self._batch_demand += more
        self._last_active = time.monotonic()
        if self.member.rejoining:
            await self.member.rejoin()

    def poller_exit(self, more: int = 0) -> None:
        self._pollers -= 1
        self._batch_demand -= more
        self._last_active = time.monotonic()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._maint is not None:
            self._maint.cancel()
            with contextlib.suppress(BaseException):
                await self._maint
        # The member closes its consumer when its last queue stops: the
        # revocation then commits and withdraws for every queue it served.
        await self.member.stop_if_idle()
        for lease in self.leases.values():
            lease.state = "lost"
        self.leases.clear()
        self.ready.clear()
        self.delayed.clear()
        self._notify()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            self._reclaim()
            self.member.consider_hand_off()
            try:
                await self._drain_exhausted()
            except Exception as exc:  # retried at the next tick
                log.warning("queue %r: dead-lettering failed: %s", self.name, exc)


class Engines:
    """The queue engines of one transport, by queue name. Every handle of a
    queue shares its engine: :meth:`acquire` creates it for the first handle,
    :meth:`release` stops it when the last handle is closed, :meth:`stop_all`
    stops every engine when the transport closes."""

    def __init__(self, ctx: KafkaContext) -> None:
        self._ctx = ctx
        self._by_name: dict[str, _QueueEngine] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> _QueueEngine:
        return self._by_name[name]

    def acquire(self, name: str, member: _GroupMember | None = None) -> _QueueEngine:
        """The engine of queue ``name`` (created with ``member``, or a
        membership of its own, if no handle holds it), counted once more."""
        engine = self._by_name.get(name)
        if engine is None:
            engine = self._by_name[name] = _QueueEngine(self._ctx, name, member)
        engine.handles += 1
        return engine

    async def release(self, name: str) -> None:
        """A handle of ``name`` is closed: stop its engine if it was the last."""
        engine = self._by_name.get(name)
        if engine is None:
            return
        engine.handles -= 1
        if engine.handles <= 0:
            del self._by_name[name]
            await engine.stop()

    async def stop_all(self) -> None:
        """Stop every engine (the transport is closing)."""
        engines, self._by_name = list(self._by_name.values()), {}
        for engine in engines:
            await engine.stop()
