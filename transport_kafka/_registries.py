"""Registries on Kafka: one compacted topic per keyed log, and one for its
checkpoint.

``NS.registry.delivery.<name>`` and ``NS.registry.capability.capabilities``
hold one record per key (the registry's live records); a delete is a
tombstone (null value), which compaction eventually removes. ``watch()``
assigns every partition from the beginning (no consumer group, nothing
committed), replays to the high watermark taken when the watch starts,
yields ``CAUGHT_UP``, then keeps reading live; every change carries its
position, ``b"<partition>:<offset>"``. ``get(key)`` is served from a
materialised view that has read at least up to the high watermark taken at
call time, so it reflects every write that returned before the call.

**Checkpoints.** A log is resumable: its checkpoint (the blob the shared
registry view writes: the live records older than a resume position, and
that position) is the last record, key ``checkpoint``, of a compacted
single-partition topic of its own, ``<registry topic>.checkpoint``,
created with the registry topic. The log's history is not touched: a reader
that knows nothing of checkpoints reads the registry topic as before. A new
reader (the shared view, and ``get``'s view here) starts from the checkpoint
and replays from its resume position, so a restart reads what is live and
what changed since, not everything a broker that has not compacted (Tansu
never does; Kafka does eventually) still holds. A checkpoint is ignored
(the reader replays from the beginning) if it was written for another topic
of the same name (the registry topic was deleted and re-created: its id is
in the record's ``ae-topic-id`` header), if it is older than the registry
topic's ``delete.retention.ms`` (compaction may since have removed
tombstones written after its resume position, which a reader starting there
would miss), and for a registry topic of more than one partition (one
position cannot say where to resume in each).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from transport import CAUGHT_UP, CapabilityRegistry, DeliveryRegistry, KeyedChange, KeyedLog
from transport.errors import (
    ClosedResourceError,
    TransientTransportError,
    TransportError,
)
from transport.kit import read_checkpoint, wait_within
from transport_kafka._client import (
    ConsumerThread,
    KafkaClients,
    KafkaContext,
    RawRecord,
    TopicSpec,
    _client_logger,
    consume_available,
    raw_record,
)
from transport_kafka._errors import map_kafka_errors
from transport_kafka._topics import TopicState, checked_length

__all__ = ["KafkaCapabilityRegistry", "KafkaDeliveryRegistry", "KafkaKeyedLog"]

log = logging.getLogger("transport.kafka")

#: The registries are the shared implementations over :class:`KafkaKeyedLog`.
KafkaDeliveryRegistry = DeliveryRegistry
KafkaCapabilityRegistry = CapabilityRegistry

_Event = tuple[str, Any]

#: The key of every checkpoint record.
CHECKPOINT_KEY = b"checkpoint"
#: The header naming the id of the registry topic a checkpoint was written for.
TOPIC_ID_HEADER = "ae-topic-id"
#: Kafka's default ``delete.retention.ms`` (1 day): the age past which a
#: checkpoint is ignored where the broker does not report the topic's own.
_DEFAULT_DELETE_RETENTION_MS = 86_400_000


def registry_spec(topic: str) -> TopicSpec:
    """A registry topic: compacted (the last record of every key, kept)."""
    return TopicSpec(topic, 1, {"cleanup.policy": "compact"}, what="a registry")


def checkpoint_spec(topic: str) -> TopicSpec:
    """A registry's checkpoint topic: compacted like the registry topic (its
    one key's last record is the checkpoint)."""
    return TopicSpec(topic, 1, {"cleanup.policy": "compact"}, what="a registry's checkpoint")


def checkpoint_topic(topic: str) -> str:
    """The checkpoint topic of registry topic ``topic``: ``topic`` plus a
    part ``checkpoint`` (what :func:`~transport_kafka._topics.topic_name`
    makes of the registry topic's parts and ``"checkpoint"``: no other
    topic of the library has five parts, so it collides with none).

    Raises: InvalidNameError if it would be longer than Kafka allows.
    """
    return checked_length(f"{topic}.checkpoint")


def _position(partition: int, offset: int) -> bytes:
    return b"%d:%d" % (partition, offset)


def _parse_position(position: bytes) -> tuple[int, int]:
    """(partition, offset) of a position; a bare offset is partition 0.

    Raises: ValueError.
    """
    partition, sep, offset = position.partition(b":")
    if not sep:
        partition, offset = b"0", partition
    p, o = int(partition), int(offset)
    if p < 0 or o < 0:
        raise ValueError(f"negative position {position!r}")
    return p, o


class _Tail:
    """Reads partitions of a topic from given offsets (``-2``: the
    beginning), live, on its own thread, and feeds ``("rec", RawRecord)`` /
    ``("eof", (p, offset))`` / ``("error", exc)`` events to an asyncio
    queue."""

    def __init__(self, clients: KafkaClients, topic: str, starts: dict[int, int]) -> None:
        self.queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        with map_kafka_errors(f"reading {topic}"):
            self._consumer = Consumer({**clients.reader_config(), "logger": _client_logger()})
            self._consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
        self._thread = ConsumerThread(f"kafka-tail-{topic}", self._step, self._consumer.close)
        self._thread.start()
        self._close_timeout = clients.settings.options.close_timeout_s

    def _step(self) -> None:
        events: list[_Event] = []
        for msg in consume_available(self._consumer, 500, 0.05):
            err = msg.error()
            if err is None:
                events.append(("rec", raw_record(msg)))
            elif err.code() == KafkaError._PARTITION_EOF:
                events.append(("eof", (msg.partition(), msg.offset())))
            else:
                events.append(("error", KafkaException(err)))
        if events:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[_Event]) -> None:
        for event in events:
            self.queue.put_nowait(event)

    async def aclose(self) -> None:
        await self._thread.join(self._close_timeout + 5)


class _View:
    """The materialised last value per key behind ``get``."""

    def __init__(self, partitions: list[int]) -> None:
        self.partitions = partitions
        self.data: dict[str, bytes] = {}
        #: Per partition, the offset up to which ``data`` reflects it.
        self.positions: dict[int, int] = {}
        self.changed = asyncio.Event()
        #: The last read error, until the next record or end of partition
        #: (librdkafka reports a failed fetch and retries it).
        self.error: BaseException | None = None


def _starts(
    marks: dict[int, tuple[int, int]], position: tuple[int, int] | None
) -> tuple[dict[int, int], dict[int, int]]:
    """Where to read each partition from (``-2``: its beginning) and the
    offset each must reach to be caught up (partitions with nothing to
    replay left out): the beginning of every partition, or ``position``'s
    offset in its partition (the earliest available if retention removed
    it) and the beginning of the others.

    A resume offset at or past the high watermark is its own target: the
    first record or end-of-partition read there reaches it. A broker may
    report the high watermark of a batch of several records as its base
    offset + 1 (Tansu), so such an offset can still have records at and
    after it that were written before the watch started.
    """
    starts = dict.fromkeys(marks, -2)
    targets = {p: high for p, (low, high) in marks.items() if high > low}
    if position is not None and position[0] in marks:
        p, offset = position
        low, high = marks[p]
        if offset > low:
            starts[p] = offset
            targets[p] = max(high, offset)
    return starts, targets


class KafkaKeyedLog(KeyedLog):
    """A keyed log on one compacted topic (one partition), resumable: its
    checkpoint is the last record of ``checkpoint_topic``."""

    resumable = True

    def __init__(self, ctx: KafkaContext, topic: str, checkpoint: str | None = None) -> None:
        self.topic = topic
        self.checkpoint_topic = checkpoint or checkpoint_topic(topic)
        self._clients = ctx.clients
        self._view: _View | None = None
        self._view_task: asyncio.Task[None] | None = None
        self._view_lock = asyncio.Lock()
        self._described: TopicState | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<KafkaKeyedLog {self.topic!r}>"

    async def _ready(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"keyed log {self.topic!r} is closed")
        await self._clients.ensure_topics(
            [registry_spec(self.topic), checkpoint_spec(self.checkpoint_topic)]
        )

    async def put(self, key: str, value: bytes) -> None:
        await self._ready()
        await self._clients.produce(self.topic, key.encode(), value, what=f"put to {self.topic}")

    async def delete(self, key: str) -> None:
        await self._ready()
        await self._clients.produce(self.topic, key.encode(), None, what=f"delete in {self.topic}")

    async def get(self, key: str) -> bytes | None:
        await self._ready()
        view = self._view
        # The view reads the partitions it was started with; their list is
        # only looked up once (a keyed log topic has one partition).
        if view is None:
            view = await self._ensure_view()
        marks = await self._clients.high_watermarks(self.topic, view.partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._clients.timeout
        while any(view.positions.get(p, 0) < high for p, high in marks.items()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                # The client retries a read that failed (a broker
                # reconnecting, a fetch timing out): an error reported on
                # the way is only the reason given here.
                why = f" (last read error: {view.error})" if view.error is not None else ""
                raise TransientTransportError(f"reading {self.topic}: timed out catching up{why}")
            event = view.changed
            with contextlib.suppress(TimeoutError):
                await wait_within(event.wait(), min(remaining, 0.5))
        return view.data.get(key)

    async def _ensure_view(self) -> _View:
        """The view behind ``get``, started at the first call: from the
        checkpoint's records and resume position if there is one, else
        from the beginning."""
        async with self._view_lock:
            if self._view is not None:
                return self._view
            partitions = await self._clients.partitions(self.topic)
            view = _View(partitions)
            position: tuple[int, int] | None = None
            data = await self.load_checkpoint() if len(partitions) == 1 else None
            if data is not None:
                try:
                    resume, carried = read_checkpoint(data)
                    position = _parse_position(resume)
                except ValueError as exc:
                    log.warning("%s: ignoring an unreadable checkpoint (%s)", self.topic, exc)
                else:
                    view.data = {key: value for key, _, value in carried}
            marks = await self._clients.watermarks(self.topic, partitions)
            starts, _ = _starts(marks, position)
            # ``positions`` start at 0: a ``get`` waits for the first record
            # or end-of-partition read from the resume offset (see _starts).
            tail = _Tail(self._clients, self.topic, starts)
            self._view = view
            self._view_task = asyncio.create_task(self._feed_view(view, tail))
            return view

    async def _feed_view(self, view: _View, tail: _Tail) -> None:
        try:
            while True:
                kind, item = await tail.queue.get()
                if kind == "rec":
                    rec: RawRecord = item
                    key = (rec.key or b"").decode("utf-8", "replace")
                    if rec.value is None:
                        view.data.pop(key, None)
                    else:
                        view.data[key] = rec.value
                    view.positions[rec.partition] = max(
                        view.positions.get(rec.partition, 0), rec.offset + 1
                    )
                elif kind == "eof":
                    p, offset = item
                    view.positions[p] = max(view.positions.get(p, 0), offset)
                else:
                    view.error = item
                    log.debug("%s: read error (the client retries): %s", self.topic, item)
                if kind != "error":
                    view.error = None  # reading again
                if tail.queue.empty():
                    view.changed.set()
                    view.changed = asyncio.Event()
        finally:
            await tail.aclose()

    def watch(self) -> AsyncIterator[KeyedChange | object]:
        return self._follow(None)

    def watch_from(self, position: bytes) -> AsyncIterator[KeyedChange | object]:
        """:meth:`watch` from ``position`` (``b"<partition>:<offset>"``, that
        record included; the earliest record still there if retention
        removed it). On a topic of several partitions the others are
        replayed from their beginning (correct, not shorter); so is every
        partition for a position this log cannot read (logged)."""
        try:
            parsed: tuple[int, int] | None = _parse_position(position)
        except ValueError:
            log.warning(
                "%s: cannot resume at %r; replaying from the beginning", self.topic, position
            )
            parsed = None
        return self._follow(parsed)

    async def _follow(
        self, position: tuple[int, int] | None
    ) -> AsyncIterator[KeyedChange | object]:
        await self._ready()
        # A position of an earlier topic of the same name (deleted and
        # re-created, or a broker that lost its data) means nothing here:
        # resuming there would skip the new topic's first records.
        seen = self._described.topic_id if self._described is not None else None
        state = await self._state(fresh=True)
        if position is not None and seen and state and state.topic_id not in (None, seen):
            log.warning(
                "%s: the topic was re-created since position %d:%d was read; replaying it "
                "from the beginning",
                self.topic,
                *position,
            )
            position = None
        partitions = await self._clients.partitions(self.topic)
        marks = await self._clients.watermarks(self.topic, partitions)
        starts, targets = _starts(marks, position)
        positions: dict[int, int] = {}
        ended: set[int] = set()  # read to their end (after the watch started)
        tail = _Tail(self._clients, self.topic, starts)
        caught_up = False
        try:
            if not targets:
                caught_up = True
                yield CAUGHT_UP
            while True:
                kind, item = await tail.queue.get()
                if kind == "rec":
                    rec: RawRecord = item
                    positions[rec.partition] = rec.offset + 1
                    yield KeyedChange(
                        (rec.key or b"").decode("utf-8", "replace"),
                        rec.value,
                        _position(rec.partition, rec.offset),
                    )
                elif kind == "eof":
                    p, offset = item
                    positions[p] = max(positions.get(p, 0), offset)
                    ended.add(p)
                else:
                    raise TransientTransportError(f"reading {self.topic}: {item}")
                # Caught up at the end of every partition to replay, read
                # after the watch started (an end-of-partition event): the
                # high watermark alone can fall short (Tansu reports a batch
                # of several records as its base offset + 1), and the rest
                # of such a batch must not come after CAUGHT_UP.
                if not caught_up and all(
                    p in ended and positions.get(p, 0) >= t for p, t in targets.items()
                ):
                    caught_up = True
                    yield CAUGHT_UP
        finally:
            await tail.aclose()

    # -- checkpoints ---------------------------------------------------------
    async def _state(self, *, fresh: bool = False) -> TopicState | None:
        """The registry topic as described (its id and
        ``delete.retention.ms``): once, and again when ``fresh``; ``None``
        if it could never be described."""
        if self._described is None or fresh:
            try:
                self._described = await self._clients.describe(self.topic)
            except ClosedResourceError:
                raise
            except TransportError as exc:
                log.debug("%s: not described (%s)", self.topic, exc)
        return self._described

    async def load_checkpoint(self) -> bytes | None:
        """The last checkpoint record's value, ``None`` if there is none (an
        empty checkpoint topic answers at once), if the registry topic has
        several partitions, or if the checkpoint is not to be trusted (see
        the module docstring)."""
        await self._ready()
        topic = self.checkpoint_topic
        if len(await self._clients.partitions(self.topic)) != 1:
            return None
        marks = await self._clients.watermarks(topic, await self._clients.partitions(topic))
        starts = {p: max(low, high - 1) for p, (low, high) in marks.items() if high > low}
        if not starts:
            return None
        last = await self._clients.read_last(topic, starts)
        found = [r for r in last.values() if r.key == CHECKPOINT_KEY and r.value is not None]
        if not found:
            return None
        record = max(found, key=lambda r: (r.timestamp_ms or 0, r.partition, r.offset))
        state = await self._state()
        written_for = record.headers.get(TOPIC_ID_HEADER)
        if (
            state is not None
            and state.topic_id
            and written_for is not None
            and written_for.decode("ascii", "replace") != state.topic_id
        ):
            log.warning(
                "%s: ignoring the checkpoint in %s: it was written for an earlier "
                "topic of the same name; replaying from the beginning",
                self.topic,
                topic,
            )
            return None
        limit = _DEFAULT_DELETE_RETENTION_MS
        if state is not None and state.delete_retention_ms is not None:
            limit = state.delete_retention_ms
        if record.timestamp_ms is not None and time.time() * 1000 - record.timestamp_ms > limit:
            log.info(
                "%s: the checkpoint is older than delete.retention.ms (%d ms); replaying "
                "from the beginning",
                self.topic,
                limit,
            )
            return None
        return record.value

    async def save_checkpoint(self, data: bytes) -> None:
        """Write ``data`` as the last record of the checkpoint topic, with
        the registry topic's id (where the broker has one). Nothing is
        written for a registry topic of several partitions."""
        await self._ready()
        if len(await self._clients.partitions(self.topic)) != 1:
            return
        state = await self._state()
        headers = {TOPIC_ID_HEADER: state.topic_id.encode()} if state and state.topic_id else None
        await self._clients.produce(
            self.checkpoint_topic,
            CHECKPOINT_KEY,
            data,
            headers,
            what=f"checkpoint of {self.topic}",
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._view_task is not None:
            self._view_task.cancel()
            with contextlib.suppress(BaseException):
                await self._view_task
