"""``KafkaRequestQueue``: a durable request queue on Kafka topics.

Topics of queue ``Q`` in namespace ``NS`` (all created explicitly, never by
auto-create):

* ``NS.Q.requests`` — the requests, keyed by their ``ordering_key`` if set,
  else by ``request_id`` (``partitions`` option, default 1): requests of one
  ordering key share a partition, so they are handed out in enqueue order;
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
revocation and close — never past an unsettled record. When the local
buffer holds ``max_buffered`` unsettled records, the partitions are paused
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
a partition up cleanly (``aclose()``, a rebalance) first withdraws the
counts it reserved for records it did not hand out (it rewrites their state
keys: the latest value of a key holds), and a delivery given back unseen by
a handler (a priority queue's held head) is such a reservation again; a process killed has counted a
delivery of those records it never handed out (at most twice the polls in
progress plus the leases held, 256 at most), as a broker counts a
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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

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
from transport.kit import decode_request, retrieve
from transport.kit import seconds as _seconds
from transport_kafka._client import (
    ConsumerThread,
    KafkaClients,
    TopicSpec,
    _client_logger,
    consume_available,
    raw_record,
    read_to_end,
)
from transport_kafka._config import TopicNames
from transport_kafka._errors import map_kafka_errors
from transport_kafka._offsets import OffsetTracker
from transport_kafka._topics import keep_until_consumed

if TYPE_CHECKING:
    from transport_kafka._transport import KafkaTransport

__all__ = ["KafkaDelivery", "KafkaRequestQueue"]

log = logging.getLogger("transport.kafka")

H_ATTEMPTS = "ae-attempts"
H_NOT_BEFORE = "ae-not-before"
H_ERROR = "ae-error"
H_REQUEST_ID = "ae-request-id"

_tokens = itertools.count(1)
_SETTLED = b'{"s":1}'
_TICK = 0.05
# A settled record that no commit covers yet (an earlier record is still
# being worked on) gets a "settled" marker after this long.
_MARKER_AFTER_S = 0.05
_ACK_TICK = 0.001  # consumer poll timeout while acks are waiting for a commit
_RESERVE_MAX = 256  # deliveries counted in one round of state markers


@dataclass(eq=False, slots=True)
class _Record:
    partition: int
    offset: int
    generation: int
    key: bytes | None
    value: bytes | None
    base: int  # deliveries before this record was produced (header)
    deliveries: int  # deliveries of this record (state topic + local)
    not_before: float  # epoch seconds; 0 = at once
    last_error: str | None
    carried_id: str | None = None  # ae-request-id of a re-produced copy
    reserved: bool = False  # the next delivery is already counted in the state topic
    count_key: bytes | None = None  # the state key holding that count
    request: WorkRequest | None = None  # decoded once
    undecodable: str | None = None  # why it could not be decoded

    @property
    def attempts(self) -> int:
        return self.base + self.deliveries

    @property
    def state_key(self) -> bytes:
        return f"{self.partition}:{self.offset}".encode()


@dataclass(eq=False, slots=True)
class _Lease:
    record: _Record
    request: WorkRequest
    handle: KafkaRequestQueue
    deadline: float
    state: Literal["held", "settling", "done", "lost"] = "held"
    token: int = field(default_factory=lambda: next(_tokens))
    # The state key that counted this delivery, with its round's counts and
    # records: a give-back without counting reserves the count again there.
    counted: tuple[bytes, tuple[int, dict[int, int], list[_Record]]] | None = None


def _replay_markers(
    replay: Iterable[Any], assigned: set[int], committed: dict[int, int]
) -> tuple[
    dict[tuple[int, int], dict[str, Any]], set[tuple[int, int]], dict[int, dict[bytes, int]]
]:
    """Fold the state topic into per-record markers for ``assigned``
    partitions, above their committed offsets.

    Keys: ``"<p>:<offset>"`` (one record: ``{"d": n}`` or ``{"s": 1}``) and
    ``"<p>:r<low>-<high>.<id>"`` (a round of delivery counts:
    ``{"ds": [[offset, n], ...]}``). The latest value of a key holds (a
    consumer that gives a partition up rewrites its keys to withdraw counts
    it reserved but did not hand out, as compaction would keep); across keys
    counts merge by maximum and "settled" sticks. Returns the markers, the
    offsets that have a one-record key, and the round keys with their
    highest offset.
    """
    latest: dict[bytes, bytes] = {}
    for rec in replay:
        key = rec.key or b""
        if rec.value is None:
            latest.pop(key, None)
        else:
            latest.pop(key, None)  # keep the order of the latest writes
            latest[key] = rec.value
    markers: dict[tuple[int, int], dict[str, Any]] = {}
    individual: set[tuple[int, int]] = set()
    rounds: dict[int, dict[bytes, int]] = {}
    for key, value in latest.items():
        try:
            p_s, _, o_s = key.decode().partition(":")
            p = int(p_s)
        except (ValueError, UnicodeDecodeError):
            continue
        if p not in assigned:
            continue
        floor = committed.get(p, -1)
        if o_s.startswith("r"):
            try:
                entries = [(int(o), int(n)) for o, n in json.loads(value)["ds"]]
            except (ValueError, KeyError, TypeError):
                continue
            if not entries:
                continue
            rounds.setdefault(p, {})[key] = max(o for o, _ in entries)
            for off, count in entries:
                if off >= floor:
                    marker = markers.setdefault((p, off), {})
                    marker["d"] = max(count, int(marker.get("d", 0)))
            continue
        try:
            off = int(o_s)
        except ValueError:
            continue
        if off < floor:
            continue
        try:
            loaded = json.loads(value)
        except ValueError:
            continue
        if not isinstance(loaded, dict):
            continue
        marker = markers.setdefault((p, off), {})
        if loaded.get("s"):
            marker["s"] = 1
        if "d" in loaded:
            marker["d"] = max(int(loaded["d"]), int(marker.get("d", 0)))
        individual.add((p, off))
    return markers, individual, rounds


def _finish_round(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
        future.exception()  # a round nobody waits for any more is not an error


def _int_header(headers: dict[str, bytes], name: str) -> int:
    try:
        return int(headers.get(name, b"0").decode())
    except (ValueError, UnicodeDecodeError):
        return 0


class _GroupMember:
    """One consumer-group membership: one consumer, on its own thread,
    subscribed to the request topics of one or more queues (engines).

    A plain queue is a member of its own group ``NS.<consumer_group>.<queue>``
    with the ``assignment_strategy`` option. The levels of a priority queue
    are one member of the group ``NS.<consumer_group>.<name>.priority``,
    subscribed to the request topic of every level with the ``range``
    assignor: partition k of every level goes to the same member, and every
    rebalance (eager: all partitions revoked, then assigned) moves all levels
    at once. A process therefore holds the heads of all levels of a
    partition index or of none, and a start costs one group join, not one
    per level. Hand-off (an idle process with buffered work leaves the
    group) and rejoining are per member too."""

    def __init__(
        self, transport: KafkaTransport, group: str, strategy: str | None, label: str
    ) -> None:
        self.transport = transport
        self.options = transport.settings.options
        self.group = group
        self.strategy = strategy  # None: the assignment_strategy option
        self.label = label
        self.engines: list[_QueueEngine] = []
        self._by_topic: dict[str, _QueueEngine] = {}
        self.consumer: Consumer | None = None
        self.thread: ConsumerThread | None = None
        self.subscribed = False
        self.consumer_closed = False
        # commits and consumer close, in order (reentrant: close calls on_revoke)
        self.commit_lock = threading.RLock()
        # From the start of a revocation to the end of the next assignment
        # nothing is handed out: the queues of a member are revoked one after
        # the other, and a lower level still held must not be served once a
        # higher one is gone (several queues only; a plain queue's
        # incremental revocations need no such gate).
        self.rebalancing = False
        # Eager rebalances (several queues, range): a revocation is only
        # tentative while the member stays subscribed. The partitions stay
        # with their leases and buffer until the assignment says whether
        # they come back (kept) or went to another member (dropped then).
        self.tentative = strategy == "range"
        self._start_task: asyncio.Future[None] | None = None
        self._handoff_task: asyncio.Task[None] | None = None
        self._last_commit = 0.0

    def add(self, engine: _QueueEngine) -> None:
        self.engines.append(engine)
        self._by_topic[engine.topics.requests] = engine

    # -- lifecycle (event loop) ---------------------------------------------------
    async def start(self) -> None:
        """Join the group for every queue of this member (once)."""
        task = self._start_task
        if task is None:
            task = self._start_task = asyncio.ensure_future(self._start())
        if task.done():
            task.result()  # a failed start raises again
        else:
            await asyncio.shield(task)

    async def _start(self) -> None:
        await asyncio.gather(*(engine.ensure_topics() for engine in self.engines))
        loop = asyncio.get_running_loop()
        with map_kafka_errors(f"creating consumer of {self.label!r}"):
            consumer = self._new_consumer()
            self._subscribe(consumer)
        self.consumer = consumer
        for engine in self.engines:
            engine._started(loop)
        self.subscribed = True
        self.thread = ConsumerThread(f"kafka-consumer-{self.label}", self._step, self._finish)
        self.thread.start()

    def _new_consumer(self) -> Consumer:
        conf = self.transport.settings.consumer_config(self.group, subscribe=True)
        if self.strategy is not None:
            conf["partition.assignment.strategy"] = self.strategy
        if self.tentative:
            # Member ids are "<client.id>-<uuid>" and the range assignor
            # gives partition k of every topic to the first member id in
            # order: the member that joined first keeps the work, and one
            # joining later idles instead of taking it over mid-lease.
            conf["client.id"] = f"{time.time_ns():020d}-{conf.get('client.id', 'transport')}"
        return Consumer({**conf, "logger": _client_logger()})

    def _renew(self) -> None:
        """Consumer thread: a member joining again after a hand-off joins as
        the newest member (it must not take the work back from the one that
        took it over)."""
        with self.commit_lock:
            old = self.consumer
            self.consumer = self._new_consumer()
            self._subscribe(self.consumer)
        if old is not None:
            try:
                old.close()
            except (KafkaException, RuntimeError) as exc:
                log.debug("queue %r: closing the consumer left behind: %s", self.label, exc)

    def _subscribe(self, consumer: Consumer) -> None:
        consumer.subscribe(
            sorted(self._by_topic),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    # A member whose queues hold buffered work but whose process stopped
    # polling gives its partitions up (like a consumer exceeding
    # max.poll.interval.ms, but without losing live leases), so other
    # processes get the work; the next poll() joins the group again.
    def consider_hand_off(self) -> None:
        idle = self.options.handoff_idle_s
        if not idle or not self.subscribed or self._handoff_task is not None:
            return
        work = False
        for engine in self.engines:
            state = engine._idle_with_work(idle)
            if state is None:
                return  # one busy queue keeps the whole member
            work = work or state
        if work:
            self._handoff_task = asyncio.create_task(self._hand_off())

    async def _hand_off(self) -> None:
        thread = self.thread
        consumer = self.consumer
        if thread is None or consumer is None:
            return
        log.info("queue %r: idle with buffered work; leaving the group", self.label)
        self.subscribed = False
        try:
            await asyncio.wait_for(
                thread.submit(consumer.unsubscribe), self.options.operation_timeout_s
            )
        except Exception as exc:
            log.warning("queue %r: unsubscribe failed: %s", self.label, exc)

    async def rejoin(self) -> None:
        """Join the group again after a hand-off (a poll begins)."""
        if self._handoff_task is not None:
            with contextlib.suppress(Exception):
                await self._handoff_task
            self._handoff_task = None
        if not self.subscribed and self.consumer is not None and self.thread is not None:
            consumer = self.consumer
            self.subscribed = True
            for engine in self.engines:
                engine._unprime()  # no partitions until the group is joined again
            join = self._renew if self.tentative else lambda: self._subscribe(consumer)
            await asyncio.wait_for(self.thread.submit(join), self.options.operation_timeout_s)

    async def stop_if_idle(self) -> None:
        """Close the consumer once every queue of this member is stopped."""
        if not all(engine._stopped for engine in self.engines):
            return
        task = self._start_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self.thread is not None:
            await self.thread.join(self.options.close_timeout_s + 5)

    # -- consumer thread ------------------------------------------------------------
    def _step(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        engines = self.engines
        now = time.monotonic()
        if now - self._last_commit >= self.options.commit_interval_ms / 1000:
            self._last_commit = now
            for engine in engines:
                engine._commit()
        for engine in engines:
            engine._flow_control(consumer)
        busy = any(now < engine._acks_busy_until for engine in engines)
        batches: dict[_QueueEngine, list[_Record]] = {}
        for msg in consume_available(consumer, 500, _ACK_TICK if busy else _TICK):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise KafkaException(err)
                log.warning("queue %r: consumer error: %s", self.label, err)
                continue
            owner = self._by_topic.get(msg.topic() or "")
            rec = None if owner is None else owner._ingest(msg)
            if owner is not None and rec is not None:
                batches.setdefault(owner, []).append(rec)
        for engine, batch in batches.items():
            engine._post(engine._on_records, batch)
        for engine in engines:
            engine._flow_control(consumer)
            engine._check_primed()

    def _finish(self) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        for engine in self.engines:
            engine._commit()
        with self.commit_lock:
            self.consumer_closed = True
            try:
                consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("queue %r: consumer close: %s", self.label, exc)
        for engine in self.engines:
            engine._settle_tentative(set())

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        positions: list[TopicPartition] = []
        for engine in self.engines:
            own = engine._own(partitions)
            kept = engine._settle_tentative({tp.partition for tp in own})
            engine._on_assign(consumer, [tp for tp in own if tp.partition not in kept])
            # A kept partition goes on from what this member fetched already
            # (its records are buffered or leased here), not from the commit.
            for tp in own:
                position = kept.get(tp.partition)
                positions.append(
                    tp if position is None else TopicPartition(tp.topic, tp.partition, position)
                )
        if self.tentative:
            if any(tp.offset >= 0 for tp in positions):
                consumer.assign(positions)
            for engine in self.engines:
                engine._paused = False  # an eager assignment starts unpaused
        self.rebalancing = False
        for engine in self.engines:
            engine._post(engine._notify)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if len(self.engines) > 1:
            self.rebalancing = True
        tentative = self.tentative and self.subscribed and not self.consumer_closed
        for engine in self.engines:
            own = engine._own(partitions)
            if tentative:
                engine._revoke_tentatively(consumer, own)
            else:
                engine._settle_tentative(set())  # anything pending is gone
                engine._on_revoke(consumer, own)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if len(self.engines) > 1:
            self.rebalancing = True
        for engine in self.engines:
            engine._settle_tentative(set())
            engine._on_lost(consumer, engine._own(partitions))


class _QueueEngine:
    """One queue in one transport, shared by every handle of that queue in
    the transport; it consumes through its :class:`_GroupMember` (its own,
    or the one of its priority queue). Loop-side state (buffer, timers,
    leases) is touched only on the event loop; the consumer only on its
    thread; the offset tracker is the thread-safe meeting point."""

    def __init__(
        self, transport: KafkaTransport, name: str, member: _GroupMember | None = None
    ) -> None:
        self.transport = transport
        self.clients: KafkaClients = transport.clients
        self.name = name
        topics = transport.settings.queue_topics(name)
        # A level of a priority queue had a group of its own before the
        # levels shared one: its committed positions are adopted from there.
        self.former_group: str | None = None
        if member is None:  # a plain queue: a membership of its own
            member = _GroupMember(transport, topics.group, None, name)
        elif member.group != topics.group:
            self.former_group = topics.group
            topics = dataclasses.replace(topics, group=member.group)
        self.topics: TopicNames = topics
        self.member = member
        self._topic_names = frozenset((self.topics.requests, self.topics.state, self.topics.dlq))
        self.options = transport.settings.options
        self.tracker = OffsetTracker()
        self.handles = 0
        self.ready: deque[_Record] = deque()
        self.delayed: list[tuple[float, int, _Record]] = []
        self.leases: dict[int, _Lease] = {}
        self.exhausted: list[_Lease] = []
        self._next_deadline = float("inf")  # no held lease expires before this
        self._changed = asyncio.Event()
        self._maint: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._pollers = 0
        self._last_active = time.monotonic()
        self._next_commit: asyncio.Future[None] | None = None
        self._commit_token: object | None = None
        # While acks wait for a commit, the consumer thread polls with a short
        # timeout so that it runs the commit promptly (a commit from another
        # thread waits for the consumer's poll to return).
        self._acks_busy_until = 0.0
        self._reserving: asyncio.Future[None] | None = None
        # Loop side: state keys holding reserved counts → the partition, the
        # counts written under the key, and its records (to withdraw them).
        self._counted: dict[bytes, tuple[int, dict[int, int], list[_Record]]] = {}
        # consumer-thread state
        self._markers: dict[tuple[int, int], dict[str, Any]] = {}
        self._marked: dict[int, set[int]] = {}  # offsets with state markers, per partition
        self._marked_lock = threading.Lock()  # loop adds, consumer thread drops
        # delivery-count rounds: partition → state key → highest offset in it
        self._marked_rounds: dict[int, dict[bytes, int]] = {}
        self._round_prefix = os.urandom(4).hex()
        self._paused = False
        self._wake: list[TopicPartition] = []  # one assigned partition per leader
        # Tentatively revoked partitions and where their fetch had got to.
        self._pending_revoke: set[int] = set()
        self._fetch_positions: dict[int, int] = {}
        # Backlog loading ("priming"), consumer-thread side: the high
        # watermarks that the fetch of newly assigned partitions must reach;
        # None when nothing is loading.
        self._prime_targets: dict[int, int] | None = None
        self._fetched: dict[int, int] = {}
        # loop side: the head is known (see caught_up); until _sync_deadline
        self.primed = False
        self._sync_deadline = float("inf")
        member.add(self)

    # -- topics ------------------------------------------------------------------
    def topic_specs(self) -> list[TopicSpec]:
        compact = {"cleanup.policy": "compact"}
        q = f"queue {self.name!r}"
        # One partition is what ordered=True promises (a capability flag).
        ordered = self.transport.capabilities.ordered
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

    # -- lifecycle (the consumer, its thread and the group: see _GroupMember) ----
    @property
    def running(self) -> bool:
        return self.member.thread is not None and not self._stopped

    @property
    def _consumer(self) -> Consumer | None:
        return self.member.consumer

    @property
    def _thread(self) -> ConsumerThread | None:
        return self.member.thread

    @property
    def _consumer_closed(self) -> bool:
        return self.member.consumer_closed

    @property
    def _commit_lock(self) -> threading.RLock:
        return self.member.commit_lock

    async def start(self) -> None:
        if self._stopped:
            raise ClosedResourceError(f"queue {self.name!r} is closed")
        await self.member.start()
        thread = self._thread
        if thread is not None and thread.done.done() and thread.done.exception() is not None:
            raise TransientTransportError(
                f"consumer of queue {self.name!r} failed: {thread.done.exception()}"
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

    async def poller_enter(self) -> None:
        """Called when a poll begins: joins the group again after a hand-off."""
        self._pollers += 1
        self._last_active = time.monotonic()
        await self.member.rejoin()

    def poller_exit(self) -> None:
        self._pollers -= 1
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

    # -- consumer thread -----------------------------------------------------------
    def _post(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _ingest(self, msg: Any) -> _Record | None:
        """A fetched record of this queue's topic (consumer thread): tracked,
        and returned for the buffer unless already settled or stale."""
        raw = raw_record(msg)
        p, off = raw.partition, raw.offset
        self._fetched[p] = max(self._fetched.get(p, 0), off + 1)
        gen = self.tracker.generation(p)
        if gen is None:
            return None
        marker = self._markers.pop((p, off), None) or {}
        if marker.get("s"):
            self.tracker.track(p, off, gen, settled=True)
            return None
        if not self.tracker.track(p, off, gen):
            return None
        error = raw.headers.get(H_ERROR)
        carried = raw.headers.get(H_REQUEST_ID)
        return _Record(
            partition=p,
            offset=off,
            generation=gen,
            key=raw.key,
            value=raw.value,
            base=_int_header(raw.headers, H_ATTEMPTS),
            deliveries=int(marker.get("d", 0)),
            not_before=_int_header(raw.headers, H_NOT_BEFORE) / 1000,
            last_error=error.decode("utf-8", "replace") if error else None,
            carried_id=carried.decode("utf-8", "replace") if carried else None,
        )

    def _own(self, partitions: Iterable[TopicPartition]) -> list[TopicPartition]:
        return [tp for tp in partitions if tp.topic == self.topics.requests]

    def _flow_control(self, consumer: Consumer) -> None:
        outstanding = self.tracker.outstanding()
        limit = self.options.max_buffered
        try:
            if not self._paused and outstanding >= limit:
                consumer.pause(self._own(consumer.assignment()))
                self._paused = True
            elif self._paused and outstanding <= limit // 2:
                consumer.resume(self._own(consumer.assignment()))
                self._paused = False
                self._wake_fetchers(consumer)
        except KafkaException as exc:
            log.debug("queue %r: pause/resume: %s", self.name, exc)

    def _wake_fetchers(self, consumer: Consumer) -> None:
        """librdkafka starts fetching a resumed partition only when the
        leader's broker thread next wakes up, up to about a second later (the
        local buffer runs dry meanwhile and throughput halves). Any request
        to that broker wakes it: ask one watermark per leader."""
        limit = min(self.options.operation_timeout_s, 1.0)
        for tp in self._wake:
            try:
                consumer.get_watermark_offsets(tp, timeout=limit, cached=False)
            except KafkaException as exc:
                log.debug("queue %r: waking the fetcher of %s: %s", self.name, tp, exc)

    def _commit(self, candidates: dict[int, int] | None = None) -> None:
        """Synchronously commit the safe positions (consumer thread only: a
        synchronous commit from another thread waits for the consumer's
        poll to return)."""
        consumer = self._consumer
        if consumer is None:
            return
        with self._commit_lock:  # one commit at a time: positions never go back
            if candidates is None:
                candidates = self.tracker.commit_candidates()
            if not candidates:
                return
            generations = {p: self.tracker.generation(p) for p in candidates}
            if self._consumer_closed:
                return
            tps = [TopicPartition(self.topics.requests, p, off) for p, off in candidates.items()]
            try:
                result = consumer.commit(offsets=tps, asynchronous=False)
            except (KafkaException, RuntimeError) as exc:
                log.info("queue %r: commit failed, will retry: %s", self.name, exc)
                return
            for tp in result or []:
                gen = generations.get(tp.partition)
                if tp.error is None and gen is not None:
                    self.tracker.committed(tp.partition, tp.offset, gen)
                    self._drop_markers(tp.partition, tp.offset)

    def _drop_markers(self, partition: int, below: int) -> None:
        # State markers of committed records are no longer needed: tombstone them.
        with self._marked_lock:
            marked = self._marked.get(partition)
            done = [o for o in marked if o < below] if marked else []
            if marked:
                marked.difference_update(done)
            rounds = self._marked_rounds.get(partition)
            keys = [k for k, high in rounds.items() if high < below] if rounds else []
            for key in keys:
                del rounds[key]  # type: ignore[union-attr]
        for off in done:
            self.clients.produce_nowait(self.topics.state, f"{partition}:{off}".encode(), None)
        for key in keys:
            self.clients.produce_nowait(self.topics.state, key, None)

    def _targets(
        self, consumer: Consumer, partitions: list[TopicPartition], committed: dict[int, int]
    ) -> dict[int, int]:
        """High watermarks the first fetch must reach before this engine is
        primed (its initial backlog is in the local buffer)."""
        targets: dict[int, int] = {}
        for tp in partitions:
            try:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topics.requests, tp.partition),
                    timeout=self.options.operation_timeout_s,
                    cached=False,
                )
            except KafkaException:
                continue
            start = committed.get(tp.partition, -1)
            if high > (start if start >= 0 else low):
                targets[tp.partition] = high
        return targets

    def _check_primed(self) -> None:
        targets = self._prime_targets
        if targets is None:
            return
        # Primed: the backlog of the assigned partitions is buffered, or as
        # much of it as the bounded buffer takes (paused).
        if self._paused or all(self._fetched.get(p, 0) >= high for p, high in targets.items()):
            self._prime_targets = None
            self._post(self._on_primed)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not partitions:
            # Nothing (more) for this member: what it has is what it knows.
            if self._prime_targets is None:
                self._prime_targets = {}
            return
        try:
            committed = {
                tp.partition: tp.offset
                for tp in consumer.committed(partitions, timeout=self.options.operation_timeout_s)
            }
        except KafkaException as exc:
            log.warning("queue %r: committed offsets unavailable: %s", self.name, exc)
            committed = {}
        if self.former_group is not None:
            committed.update(self._adopt_former(consumer, partitions, committed))
        assigned = {tp.partition for tp in partitions}
        # After every assignment (start, rebalance) the head is unknown until
        # the backlog of the new partitions is fetched.
        self._post(self._on_unprimed)
        for p in assigned:
            self._fetched.pop(p, None)
        self._prime_targets = {
            **(self._prime_targets or {}),
            **self._targets(consumer, partitions, committed),
        }
        try:
            replay = read_to_end(
                self.clients.reader_config(), self.topics.state, self.options.operation_timeout_s
            )
        except Exception as exc:  # degrade to duplicates, never to losses
            log.warning(
                "queue %r: state replay failed (attempt counts may restart): %s", self.name, exc
            )
            replay = []
        markers, individual, rounds = _replay_markers(replay, assigned, committed)
        for p in assigned:
            self.tracker.assign(p, committed.get(p))
            with self._marked_lock:
                self._marked.setdefault(p, set()).update(o for (pp, o) in individual if pp == p)
                self._marked_rounds.setdefault(p, {}).update(rounds.get(p, {}))
        self._markers.update(markers)
        self._paused = False
        self._wake = self._one_per_leader(consumer, sorted(assigned))
        log.debug("queue %r: assigned %s", self.name, sorted(assigned))

    def _adopt_former(
        self, consumer: Consumer, partitions: list[TopicPartition], committed: dict[int, int]
    ) -> dict[int, int]:
        """Positions of partitions that have none in this group yet, taken
        from the level's former group of its own (before the levels of a
        priority queue shared one group), and committed here so that the
        fetch starts from them: without this, an upgrade would deliver
        again every request the level ever consumed (they are kept until
        consumed). Consumer thread, inside the assignment callback."""
        missing = [tp.partition for tp in partitions if committed.get(tp.partition, -1) < 0]
        if not missing or self.former_group is None:
            return {}
        topic = self.topics.requests
        former = Consumer(
            {
                **self.transport.settings.consumer_config(self.former_group, subscribe=False),
                "logger": _client_logger(),
            }
        )
        try:
            found = former.committed(
                [TopicPartition(topic, p) for p in missing],
                timeout=self.options.operation_timeout_s,
            )
        except KafkaException as exc:
            log.warning("queue %r: former group's offsets unavailable: %s", self.name, exc)
            return {}
        finally:
            former.close()
        adopted = {tp.partition: tp.offset for tp in found if tp.error is None and tp.offset >= 0}
        if not adopted:
            return {}
        try:
            consumer.commit(
                offsets=[TopicPartition(topic, p, off) for p, off in adopted.items()],
                asynchronous=False,
            )
        except KafkaException as exc:
            log.warning("queue %r: adopting the former group's offsets: %s", self.name, exc)
            return {}
        log.info(
            "queue %r: adopted committed offsets %s of group %r",
            self.name,
            adopted,
            self.former_group,
        )
        return adopted

    def _one_per_leader(self, consumer: Consumer, partitions: list[int]) -> list[TopicPartition]:
        """One of ``partitions`` per leader broker (see ``_wake_fetchers``)."""
        topic = self.topics.requests
        leaders: dict[int, int] = {}
        try:
            meta = consumer.list_topics(topic, timeout=self.options.operation_timeout_s)
            parts = meta.topics[topic].partitions
            for p in partitions:
                leaders.setdefault(parts[p].leader if p in parts else -1, p)
        except (KafkaException, KeyError) as exc:
            log.debug("queue %r: leaders unknown: %s", self.name, exc)
            leaders = {-1: partitions[0]} if partitions else {}
        return [TopicPartition(topic, p) for p in leaders.values()]

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._commit_lock:
            safe: dict[int, tuple[int, int]] = {}
            for tp in partitions:
                gen = self.tracker.generation(tp.partition)
                position = self.tracker.revoke(tp.partition)
                if position is not None and gen is not None:
                    safe[tp.partition] = (position, gen)
            if safe:
                tps = [TopicPartition(self.topics.requests, p, off) for p, (off, _) in safe.items()]
                try:
                    result = consumer.commit(offsets=tps, asynchronous=False)
                except KafkaException as exc:
                    log.warning("queue %r: commit on revoke failed: %s", self.name, exc)
                else:
                    for tp in result or []:
                        if tp.error is None:
                            self.tracker.committed(tp.partition, tp.offset, safe[tp.partition][1])
        # Still the owner until this callback returns: take back the delivery
        # counts reserved for records not handed out (revoked above, so no
        # poll hands them out meanwhile).
        self._withdraw_from_thread({tp.partition for tp in partitions})
        self._forget(partitions)

    def _revoke_tentatively(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """An eager rebalance began (see ``_GroupMember.tentative``): commit
        what is safe and withdraw the delivery counts reserved ahead, as a
        revocation does (another member may get the partitions), but keep
        them (generation, leases, buffer) until the assignment is known."""
        if not partitions:
            return
        gone = {tp.partition for tp in partitions}
        self._commit({p: off for p, off in self.tracker.commit_candidates().items() if p in gone})
        self._withdraw_from_thread(gone)
        self._pending_revoke |= gone
        self._fetch_positions.update({p: self._fetched[p] for p in gone if p in self._fetched})

    def _settle_tentative(self, assigned: set[int]) -> dict[int, int]:
        """The assignment after a tentative revocation: the partitions not
        assigned again are revoked now; returns the kept ones with the
        position to fetch from (where this member's fetch had got to)."""
        pending, self._pending_revoke = self._pending_revoke, set()
        positions, self._fetch_positions = self._fetch_positions, {}
        gone = pending - assigned
        if gone:
            for p in gone:
                self.tracker.revoke(p)
            self._forget([TopicPartition(self.topics.requests, p) for p in gone])
        kept: dict[int, int] = {}
        for p in pending & assigned:
            gen = self.tracker.generation(p)
            if gen is None:
                continue
            kept[p] = positions.get(p, -1001)  # OFFSET_INVALID: from the commit
        return kept

    def _withdraw_from_thread(self, partitions: set[int]) -> None:
        loop = self._loop
        if loop is None or not partitions or loop.is_closed() or not loop.is_running():
            return  # nothing can run the withdrawal: the counts stay (over-count)
        try:
            future = asyncio.run_coroutine_threadsafe(self._withdraw(partitions), loop)
        except RuntimeError:  # the loop is closed: nothing to withdraw with
            return
        try:
            future.result(self.options.operation_timeout_s)
        except Exception as exc:  # the counts stay: attempts over-count, nothing is lost
            future.cancel()
            log.warning(
                "queue %r: reserved delivery counts not withdrawn (%s): %s",
                self.name,
                type(exc).__name__,
                exc,
            )

    async def _withdraw(self, partitions: set[int]) -> None:
        """Withdraw the delivery counts reserved in the state topic for
        records of ``partitions`` not handed out: rewrite each state key
        holding one with the count before the reservation."""
        pending = self._reserving
        if pending is not None and not pending.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(pending)
        writes: list[tuple[bytes, bytes]] = []
        for key, (partition, counts, recs) in list(self._counted.items()):
            if partition not in partitions:
                continue
            del self._counted[key]
            taken = [r for r in recs if r.reserved and r.count_key == key]
            for rec in taken:
                rec.deliveries -= 1
                rec.reserved = False
                rec.count_key = None
                counts[rec.offset] = rec.deliveries
            if not taken:
                continue
            if key.startswith(f"{partition}:r".encode()):
                value = json.dumps({"ds": sorted(counts.items())}, separators=(",", ":"))
                writes.append((key, value.encode()))
            else:
                writes.append((key, b'{"d":%d}' % counts[taken[0].offset]))
        if writes:
            await asyncio.gather(
                *(
                    self.clients.produce(
                        self.topics.state, key, value, what="withdrawing delivery counts"
                    )
                    for key, value in writes
                )
            )

    def _prune_counted(self) -> None:
        """Forget state keys none of whose records is still reserved there."""
        for key, (_, _, recs) in list(self._counted.items()):
            if not any(r.reserved and r.count_key == key for r in recs):
                del self._counted[key]

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.tracker.revoke(tp.partition)
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions}
        if self._prime_targets is not None:
            for p in gone:
                self._prime_targets.pop(p, None)
        for key in [k for k in self._markers if k[0] in gone]:
            del self._markers[key]
        with self._marked_lock:
            for p in gone:
                self._marked.pop(p, None)
                self._marked_rounds.pop(p, None)
        self._post(self._purge)

    # -- event loop: buffer, timers, leases ------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, limit: float | None) -> None:
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), limit)

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
                if now >= self._sync_deadline:
                    log.warning(
                        "queue %r: no partition assignment within the session timeout + 5 s; "
                        "serving without it",
                        self.name,
                    )
                    self.primed = True
                    continue
                left = self._sync_deadline - now
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

    def _live(self, rec: _Record) -> bool:
        return self.tracker.is_outstanding(rec.partition, rec.offset, rec.generation)

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

    async def _drain_exhausted(self) -> None:
        while self.exhausted:
            lease = self.exhausted.pop(0)
            rec = lease.record
            if not self._live(rec):
                continue
            try:
                await self.dead_letter(
                    rec,
                    rec.last_error or f"not acknowledged after {rec.attempts} deliveries",
                    lease.request,
                )
            except BaseException:
                self.exhausted.insert(0, lease)
                raise

    def _drop_lease(self, lease: _Lease, state: Literal["done", "lost"]) -> None:
        lease.state = state
        self.leases.pop(lease.token, None)
        lease.handle._held.discard(lease.token)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            self._reclaim()
            self.member.consider_hand_off()
            try:
                await self._drain_exhausted()
            except Exception as exc:  # retried at the next tick
                log.warning("queue %r: dead-lettering failed: %s", self.name, exc)

    def in_flight(self) -> int:
        return sum(1 for lease in self.leases.values() if lease.state in ("held", "settling"))

    # -- records -------------------------------------------------------------------------
    async def _write_marker(self, rec: _Record, value: bytes) -> None:
        """Write a state marker (JSON: ``{"d": deliveries}`` or ``{"s": 1}``)."""
        await self.clients.produce(
            self.topics.state, rec.state_key, value, what="writing delivery state"
        )
        with self._marked_lock:
            self._marked.setdefault(rec.partition, set()).add(rec.offset)

    async def _write_counts(self, partition: int, recs: list[_Record]) -> bytes:
        """One state record with the delivery counts of ``recs`` (all of
        ``partition``), keyed uniquely so that compaction keeps it until
        the committed offset passes all of them. Returns its key."""
        low = min(r.offset for r in recs)
        high = max(r.offset for r in recs)
        key = f"{partition}:r{low}-{high}.{self._round_prefix}{next(_tokens)}".encode()
        value = json.dumps({"ds": [[r.offset, r.deliveries] for r in recs]}, separators=(",", ":"))
        await self.clients.produce(
            self.topics.state, key, value.encode(), what="writing delivery state"
        )
        with self._marked_lock:
            self._marked_rounds.setdefault(partition, {})[key] = high
        return key

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
        since = time.monotonic()
        self._acks_busy_until = since + 1.0
        while not self._stopped:
            try:
                await asyncio.shield(self._commit_round())
            except Exception as exc:  # the marker below still makes it durable
                log.info("queue %r: commit for acks failed: %s", self.name, exc)
                break
            if tracker.covered(p, off, gen):
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
        return tracker.covered(p, off, gen) or tracker.current(p, gen)

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

        def run() -> None:  # on the consumer thread
            if self._commit_token is token:  # later acks join a new round
                self._commit_token = None
            try:
                self._commit()
            finally:
                with contextlib.suppress(RuntimeError):  # loop closed
                    loop.call_soon_threadsafe(_finish_round, future, None)

        timer = loop.call_later(
            self.options.operation_timeout_s,
            _finish_round,
            future,
            TransientTransportError(f"queue {self.name!r}: no commit within the timeout"),
        )
        future.add_done_callback(lambda _: timer.cancel())
        thread.post(run)
        return future

    async def dead_letter(
        self, rec: _Record, error: str, request: WorkRequest | None, *, attempts: int | None = None
    ) -> bool:
        raw = None
        if request is None:
            raw = (rec.value or b"").decode("utf-8", "replace")
        dead = DeadLetter(
            queue=self.name,
            request_id=request.request_id if request else None,
            request=request,
            raw=raw,
            error=error,
            attempts=attempts if attempts is not None else rec.attempts,
        )
        key = f"{request.request_id if request else 'raw'}.{rec.partition}.{rec.offset}".encode()
        await self.clients.produce(self.topics.dlq, key, encode(dead), what="dead-lettering")
        return await self.settle_record(rec)

    async def republish(self, rec: _Record, delay: float | None, error: str | None) -> None:
        headers = {H_ATTEMPTS: str(rec.attempts).encode()}
        if rec.request is not None:
            headers[H_REQUEST_ID] = rec.request.request_id.encode()
        last = error or rec.last_error
        if last:
            headers[H_ERROR] = last.encode()[:4096]
        if delay:
            headers[H_NOT_BEFORE] = str(int((time.time() + delay) * 1000)).encode()
        # The record's own key (the ordering key or request id it was
        # enqueued with): the copy stays on its partition, behind the
        # requests of that key enqueued since.
        await self.clients.produce(self.topics.requests, rec.key, rec.value, headers, what="nack")

    def _decoded(self, rec: _Record) -> WorkRequest | None:
        if rec.request is None and rec.undecodable is None:
            try:
                rec.request = decode_request(
                    rec.value or b"",
                    self.topics.requests,
                    rec.partition,
                    rec.offset,
                    carried_id=rec.carried_id,
                )
            except UndecodableMessageError as exc:
                rec.undecodable = str(exc)
        return rec.request

    async def _reserve(self, max_attempts: int) -> None:
        """Count the next delivery of the records at the head of the buffer
        in the state topic, one round of markers for all waiting pollers."""
        task = self._reserving
        if task is None or task.done():
            task = self._reserving = asyncio.ensure_future(self._reserve_round(max_attempts))
        await asyncio.shield(task)

    def _demand(self) -> int:
        """Polls in progress plus leases held (their workers poll next)."""
        return self._pollers + len(self.leases)

    def _reserve_ahead(self, max_attempts: int) -> None:
        """Start the next round of delivery counts before the polls in
        progress need it (background; a failure shows in the next poll)."""
        if self._reserving is not None and not self._reserving.done():
            return
        index = min(self._demand(), len(self.ready) - 1)
        if index >= 0 and not self.ready[index].reserved:
            self._reserving = asyncio.ensure_future(self._reserve_round(max_attempts))
            self._reserving.add_done_callback(retrieve)

    async def _reserve_round(self, max_attempts: int) -> None:
        # Twice the demand: the next polls find their record counted
        # already. A process killed now over-counts at most these (like a
        # broker counting a prefetched batch as delivered).
        want = min(_RESERVE_MAX, 2 * max(1, self._demand()))
        picked: list[_Record] = []
        for rec in self.ready:
            if len(picked) >= want:
                break
            if rec.reserved or not self._live(rec) or self._decoded(rec) is None:
                continue
            if rec.attempts >= max_attempts:
                continue
            picked.append(rec)
        by_partition: dict[int, list[_Record]] = {}
        for rec in picked:
            rec.deliveries += 1
            by_partition.setdefault(rec.partition, []).append(rec)
        groups = list(by_partition.items())
        results = await asyncio.gather(
            *(self._write_counts(p, recs) for p, recs in groups), return_exceptions=True
        )
        failed: BaseException | None = None
        self._prune_counted()
        for (partition, recs), result in zip(groups, results, strict=True):
            for rec in recs:
                if isinstance(result, BaseException):
                    rec.deliveries -= 1
                else:
                    rec.reserved = True
            if isinstance(result, BaseException):
                failed = failed or result
            else:
                key = result
                for rec in recs:
                    rec.count_key = key
                self._counted[key] = (partition, {r.offset: r.deliveries for r in recs}, recs)
        if failed is not None:
            raise failed

    async def take(self, handle: KafkaRequestQueue) -> KafkaDelivery | None:
        self._reclaim(wake=False)
        if self.exhausted:
            await self._drain_exhausted()
        while self.ready:
            if self.member.rebalancing:
                return None  # the member's queues are moving together (see _GroupMember)
            rec = self.ready[0]
            if not self._live(rec):
                self.ready.popleft()
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
                except BaseException:
                    self.ready.appendleft(rec)
                    raise
                continue
            if not rec.reserved:
                await self._reserve(handle.max_attempts)
                continue  # the head may have changed meanwhile
            self.ready.popleft()
            key = rec.count_key
            entry = None if key is None else self._counted.get(key)
            rec.reserved = False
            rec.count_key = None
            self._reserve_ahead(handle.max_attempts)
            request = request.model_copy(update={"attempt": rec.attempts})
            lease = _Lease(rec, request, handle, time.monotonic() + handle.lease_seconds)
            if key is not None and entry is not None:
                lease.counted = (key, entry)
            self._next_deadline = min(self._next_deadline, lease.deadline)
            self.leases[lease.token] = lease
            handle._held.add(lease.token)
            return KafkaDelivery(request, self, lease)
        return None

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

    def release_uncounted(self, lease: _Lease) -> bool:
        """Give back a delivery no handler saw, as if it had not happened:
        its count in the state topic becomes a reservation again (the next
        hand-out uses it; a clean close or revocation withdraws it)."""
        if lease.counted is None or not self._valid(lease):
            return False
        key, entry = lease.counted
        rec = lease.record
        self._drop_lease(lease, "done")
        rec.reserved = True
        rec.count_key = key
        self._counted.setdefault(key, entry)
        self.ready.appendleft(rec)
        self._notify()
        return True

    def _valid(self, lease: _Lease) -> bool:
        if lease.state != "held" or self._stopped:
            return False
        if time.monotonic() >= lease.deadline:
            self._reclaim()
            return False
        return self._live(lease.record)

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

    async def _rebalanced(self) -> None:
        """Wait (up to ``operation_timeout_s``) while the member's queues are
        being reassigned: whether a lease is still this process's is known
        only when the assignment is (see ``_GroupMember.tentative``)."""
        if not self.member.rebalancing:
            return
        deadline = time.monotonic() + self.options.operation_timeout_s
        while self.member.rebalancing and not self._stopped and time.monotonic() < deadline:
            await self.wait(_TICK)

    async def extend(self, lease: _Lease, seconds: float | None) -> bool:
        # During a reassignment a lease stays this process's until the
        # assignment says otherwise (then the next extend or ack is False).
        if not self._valid(lease):
            return False
        lease.deadline = time.monotonic() + (seconds or lease.handle.lease_seconds)
        return True

    async def commit_now(self) -> None:
        if self._thread is not None and self._thread.alive and not self._stopped:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._thread.submit(self._commit), self.options.operation_timeout_s
                )

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

    def local_counts(self) -> tuple[int, int]:
        live_ready = sum(1 for r in self.ready if self._live(r))
        live_delayed = sum(1 for d in self.delayed if self._live(d[2]))
        return live_ready, live_delayed


class KafkaDelivery(Delivery):
    """A request leased from a :class:`KafkaRequestQueue` (client-side lease)."""

    __slots__ = ("_engine", "_lease")

    def __init__(self, request: WorkRequest, engine: _QueueEngine, lease: _Lease) -> None:
        super().__init__(request)
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

    async def _release_uncounted(self) -> bool:
        return self._engine.release_uncounted(self._lease)


class KafkaRequestQueue(RequestQueue):
    """A handle on queue ``name``; see the module docstring for the design."""

    def __init__(
        self,
        transport: KafkaTransport,
        name: str,
        *,
        lease_seconds: float,
        max_attempts: int,
        member: _GroupMember | None = None,
    ) -> None:
        self.name = name
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_payload_bytes = transport.config.max_payload_bytes
        self._transport = transport
        self._engine = transport._acquire_engine(name, member)
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
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        await self._engine.start()
        try:
            await self._engine.poller_enter()
            while True:
                self._check_open()
                delivery = await self._engine.take(self)
                if delivery is not None:
                    return delivery
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return None
                await self._engine.wait(_TICK if remaining is None else min(remaining, 1.0))
        finally:
            self._engine.poller_exit()

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
        owned = engine.tracker.snapshot() if engine.running else {}
        need = [p for p in parts if p not in owned or owned[p][1] is None]
        committed = await clients.committed(self.topics.group, topic, need) if need else {}
        depth = 0
        unread: dict[int, int] = {}  # partition → first offset nobody here has fetched
        for p in parts:
            low, high = marks[p]
            if p in owned and owned[p][1] is not None:
                position = owned[p][1] or 0
            else:
                position = committed.get(p, -1)
                position = position if position >= 0 else low
            depth += max(0, high - position)
            if high > max(position, low):
                unread[p] = max(position, low)  # below low: trimmed by retention
        ready, delayed = engine.local_counts() if engine.running else (0, 0)
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
        return [dead for _, dead in entries if dead is not None][:limit]

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
            fresh = dead.request.model_copy(update={"attempt": 1})
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
        await self._transport._release_engine(self.name)
