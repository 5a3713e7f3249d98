"""Consumer-group membership of Kafka queues: the one owner of their
consumers and consumer threads.

A :class:`_GroupMember` creates the consumer, subscribes it, starts its
:class:`~transport_kafka._client.ConsumerThread`, runs every step of that
thread (commit timer, flow control, fetching, routing records to the engine
of their topic, priming), receives the rebalance callbacks, leaves the group
when idle with buffered work (hand-off), joins again, and closes the
consumer. The engines (:mod:`transport_kafka._engine`) create no thread
and no group consumer (only a short-lived one, on this thread, that reads a
former group's committed offsets): their consumer-thread code
(:mod:`._assignment`) is called from here, and the event loop reaches the
consumer only through ``ConsumerThread.submit``/``post``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from transport.errors import TransientTransportError
from transport.kit import AtExit, wait_within
from transport_kafka._client import (
    ConsumerThread,
    KafkaContext,
    _client_logger,
    consume_available,
)
from transport_kafka._errors import map_kafka_errors
from transport_kafka._records import (
    _ACK_TICK,
    _TICK,
    _Record,
)

if TYPE_CHECKING:
    from transport_kafka._engine import _QueueEngine

log = logging.getLogger("transport.kafka")

#: A broker with a connection up, in librdkafka's statistics JSON.
_BROKER_UP = re.compile(r'"state":\s*"UP')

#: Members whose consumer thread runs. A program that ends without
#: ``aclose()`` has them closed at interpreter exit, within 3 s for all
#: (:meth:`_GroupMember.close_at_exit`).
_running: AtExit[_GroupMember] = AtExit(
    3.0, lambda member, deadline: member.close_at_exit(deadline)
)


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

    def __init__(self, ctx: KafkaContext, group: str, strategy: str | None, label: str) -> None:
        self.ctx = ctx
        self.options = ctx.settings.options
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
        # When no broker of the cluster was reachable from this member's
        # consumer since (time.monotonic()), or None: set by librdkafka's
        # "all brokers down" error, cleared by its statistics once a broker
        # connection is up again (written on the consumer thread).
        self.down_since: float | None = None

    def add(self, engine: _QueueEngine) -> None:
        self.engines.append(engine)
        self._by_topic[engine.topics.requests] = engine

    # -- lifecycle (event loop) ---------------------------------------------------
    @property
    def started(self) -> bool:
        """The start succeeded (a failed one raises again in :meth:`start`)."""
        task = self._start_task
        return (
            task is not None and task.done() and not task.cancelled() and task.exception() is None
        )

    @property
    def rejoining(self) -> bool:
        """:meth:`rejoin` has work to do (a hand-off ends, or the group is
        to be joined again)."""
        return self._handoff_task is not None or (
            not self.subscribed and self.consumer is not None and self.thread is not None
        )

    async def start(self) -> None:
        """Join the group for every queue of this member (once). A start
        that failed for a transient reason (no broker reachable, the topics
        not confirmed in time) is tried again by the next call; a permanent
        failure (authorization, configuration) raises again."""
        task = self._start_task
        if task is not None and task.done() and not task.cancelled():
            error = task.exception()
            if isinstance(error, TransientTransportError):
                # A worker that began polling during an outage got this
                # error at once from every later poll, even with the broker
                # back, until its process restarted.
                task = None
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
            try:
                self._subscribe(consumer)
            except BaseException:
                # A failed start is tried again (see start): not one
                # consumer left behind per attempt.
                with contextlib.suppress(Exception):
                    consumer.close()
                raise
        self.consumer = consumer
        for engine in self.engines:
            engine._started(loop)
        self.subscribed = True
        self.thread = ConsumerThread(f"kafka-consumer-{self.label}", self._step, self._finish)
        self.thread.start()
        _running.add(self)

    def _new_consumer(self) -> Consumer:
        conf = self.ctx.settings.consumer_config(self.group, subscribe=True)
        if self.strategy is not None:
            conf["partition.assignment.strategy"] = self.strategy
        if self.tentative:
            # Member ids are "<client.id>-<uuid>" and the range assignor
            # gives partition k of every topic to the first member id in
            # order: the member that joined first keeps the work, and one
            # joining later idles instead of taking it over mid-lease.
            conf["client.id"] = f"{time.time_ns():020d}-{conf.get('client.id', 'transport')}"
        return Consumer({**self._watch_reachability(conf), "logger": _client_logger()})

    def _watch_reachability(self, conf: dict[str, Any]) -> dict[str, Any]:
        """``conf`` with callbacks that keep :attr:`down_since` (a user's own
        ``error_cb``/``stats_cb`` are still called). librdkafka reports no
        connection state to ask for: it signals "all brokers down" as an
        error, and its statistics (at most every second) list each broker's
        state, which is how this member learns that a broker is back."""
        user_error = conf.get("error_cb")
        user_stats = conf.get("stats_cb")

        def on_error(err: KafkaError) -> None:
            if err.code() == KafkaError._ALL_BROKERS_DOWN and self.down_since is None:
                self.down_since = time.monotonic()
            if user_error is not None:
                user_error(err)

        def on_stats(raw: str) -> None:
            # Only brokers have an upper-case state ("UP", "UPDATE" when
            # connected; the group's is lower-case): a substring test, not
            # a parse of the whole document (every topic and partition).
            if _BROKER_UP.search(raw):
                self.down_since = None
            elif self.down_since is None:
                self.down_since = time.monotonic()
            if user_stats is not None:
                user_stats(raw)

        interval = int(conf.get("statistics.interval.ms") or 0)
        return {
            **conf,
            "error_cb": on_error,
            "stats_cb": on_stats,
            "statistics.interval.ms": min(interval, 1000) if interval > 0 else 1000,
        }

    def unreachable_for(self) -> float | None:
        """Seconds since no broker was reachable, or None if one is."""
        since = self.down_since
        return None if since is None else time.monotonic() - since

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
            await wait_within(thread.submit(consumer.unsubscribe), self.options.operation_timeout_s)
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
            await wait_within(self.thread.submit(join), self.options.operation_timeout_s)

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
        _running.discard(self)

    def close_at_exit(self, deadline: float) -> None:
        """Interpreter exit, the event loop gone, the transport never
        closed: withdraw the delivery counts reserved ahead (as a clean
        close does), then stop the consumer thread, which commits what is
        settled and closes the consumer. Closing it leaves the group, so
        the next worker gets the partitions at once instead of after this
        member's session timeout, and its requests come back counted as a
        clean close counts them: +1 for those handed out, nothing for the
        rest. Blocking, bounded by ``deadline``."""
        _running.discard(self)
        thread = self.thread
        if thread is None or not thread.alive:
            return
        for engine in self.engines:
            engine._reserve_unseen_again()
            engine._withdraw_at_exit(deadline)
        thread.join_now(deadline - time.monotonic())

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
        fetched = consume_available(consumer, 500, _ACK_TICK if busy else _TICK)
        # A commit round acks are waiting for runs before this batch is read
        # (ingesting it can take milliseconds while the event loop holds the
        # interpreter lock); the records it did not track yet are above
        # every position it may commit.
        if self.thread is not None:
            self.thread.run_posted()
        for msg in fetched:
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
        if len(self.engines) > 1:
            # The levels learn their assignment one after the other, each
            # with blocking calls (committed offsets, watermarks): until the
            # last one has, none is served, and none is taken to know its
            # head for want of an assignment (see _Leases.caught_up). A
            # worker restarted seconds after a crash got its assignment just
            # as that wait ran out, and served a lower level first.
            self.rebalancing = True
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
