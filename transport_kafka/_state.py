"""The state of a Kafka queue engine: every field, which side touches it,
and the small primitives on it.

:class:`_EngineState` is the base of the engine's parts (:mod:`._counts`,
:mod:`._leases`, :mod:`._assignment`, :mod:`._settling`, joined in
:class:`transport_kafka._engine._QueueEngine`). Loop-side fields (buffer,
timers, leases, reserved counts) are touched only on the event loop;
consumer-thread fields (markers replayed, priming targets, fetch positions)
only on the member's consumer thread; the offset tracker and the
``_marked`` sets (under ``_marked_lock``) are where the two meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from transport import WorkRequest
from transport.errors import UndecodableMessageError
from transport.kit import decode_request, wait_within
from transport_kafka._client import (
    ConsumerThread,
    KafkaClients,
    KafkaContext,
)
from transport_kafka._config import TopicNames
from transport_kafka._member import _GroupMember
from transport_kafka._offsets import OffsetTracker
from transport_kafka._records import (
    _Lease,
    _Record,
)


class _EngineState:
    """The fields of one queue engine and the primitives every part uses
    (see the module docstring); no behaviour of its own."""

    def __init__(self, ctx: KafkaContext, name: str, member: _GroupMember | None = None) -> None:
        self.ctx = ctx
        self.clients: KafkaClients = ctx.clients
        self.name = name
        topics = ctx.settings.queue_topics(name)
        # A level of a priority queue had a group of its own before the
        # levels shared one: its committed positions are adopted from there.
        self.former_group: str | None = None
        if member is None:  # a plain queue: a membership of its own
            member = _GroupMember(ctx, topics.group, None, name)
        elif member.group != topics.group:
            self.former_group = topics.group
            topics = dataclasses.replace(topics, group=member.group)
        self.topics: TopicNames = topics
        self.member = member
        self._topic_names = frozenset((self.topics.requests, self.topics.state, self.topics.dlq))
        self.options = ctx.settings.options
        # The transport's request dialect (its queue handles carry the same).
        self.request_codec = ctx.request_codec
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
        # Deliveries that batch polls in progress (poll_many) still want
        # beyond their first: counted ahead with the rest of the demand.
        self._batch_demand = 0
        self._last_active = time.monotonic()
        self._next_commit: asyncio.Future[None] | None = None
        self._commit_token: object | None = None
        # The futures of the acks waiting for the round ``_next_commit``.
        self._round_waiters: list[asyncio.Future[None]] = []
        # While acks wait for a commit, the consumer thread polls with a short
        # timeout so that it runs the commit promptly (a commit from another
        # thread waits for the consumer's poll to return).
        self._acks_busy_until = 0.0
        self._reserving: asyncio.Future[None] | None = None
        # Loop side: state keys holding reserved counts → the partition, the
        # counts written under the key, and its records (to withdraw them).
        self._counted: dict[bytes, tuple[int, dict[int, int], list[_Record]]] = {}
        # Loop side: state keys of rounds written and not yet reported.
        self._rounds_unconfirmed: set[bytes] = set()
        # consumer-thread state
        self._markers: dict[tuple[int, int], dict[str, Any]] = {}
        self._marked: dict[int, set[int]] = {}  # offsets with state markers, per partition
        self._marked_lock = threading.Lock()  # loop adds, consumer thread drops
        # delivery-count rounds: partition → state key → highest offset in it
        self._marked_rounds: dict[int, dict[bytes, int]] = {}
        self._round_prefix = os.urandom(4).hex()
        self._paused = False
        # One assigned partition per leader; None: not asked since the last
        # assignment.
        self._wake: list[TopicPartition] | None = []
        # Loop side: partitions a rebalance is taking away while their
        # handed-out requests are given time to settle (nothing more of them
        # is handed out meanwhile).
        self._handing_over: set[int] = set()
        # The commit round posted last: the consumer thread runs it early
        # while it waits in a revocation (see _hand_over_from_thread).
        self._round_run: Callable[[], None] | None = None
        # Loop side: "settled" markers being written by acks during a hand-over.
        self._hand_over_writes: set[asyncio.Future[None]] = set()
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

    def _post(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _own(self, partitions: Iterable[TopicPartition]) -> list[TopicPartition]:
        return [tp for tp in partitions if tp.topic == self.topics.requests]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, limit: float | None) -> None:
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await wait_within(event.wait(), limit)

    def _live(self, rec: _Record) -> bool:
        return self.tracker.is_outstanding(rec.partition, rec.offset, rec.generation)

    def _decoded(self, rec: _Record) -> WorkRequest | None:
        if rec.request is None and rec.undecodable is None:
            try:
                rec.request = decode_request(
                    rec.value or b"",
                    self.topics.requests,
                    rec.partition,
                    rec.offset,
                    carried_id=rec.carried_id,
                    codec=self.request_codec,
                )
            except UndecodableMessageError as exc:
                rec.undecodable = str(exc)
        return rec.request

    def _demand(self) -> int:
        """Polls in progress (a batch poll for as many as it wants) plus
        leases held (their workers poll next)."""
        return self._pollers + self._batch_demand + len(self.leases)

    def in_flight(self) -> int:
        return sum(1 for lease in self.leases.values() if lease.state in ("held", "settling"))

    def local_counts(self) -> tuple[int, int]:
        live_ready = sum(1 for r in self.ready if self._live(r))
        live_delayed = sum(1 for d in self.delayed if self._live(d[2]))
        return live_ready, live_delayed
