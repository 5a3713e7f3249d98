"""``EventLog`` on Kafka: one single-partition topic per stream.

Stream ``S`` is topic ``NS.stream.S.events`` (created explicitly, not
compacted). ``append`` produces ``data`` as JSON with the key and headers and
returns the record's offset as the position once the delivery report
(acks=all) arrived. ``appended_at`` is the appender's clock at millisecond
precision; it is stored in the event and set as the record's timestamp
(CreateTime), so a seek to a time and ``appended_at`` agree (on a topic with
``message.timestamp.type=LogAppendTime`` the broker would overwrite the
record timestamp; the library creates stream topics with the default,
CreateTime). A reader assigns the partition (no consumer group, no join) at
a position, an end, or a time: the offset ``offsets_for_times`` answers
for the time rounded up to a millisecond, then skipping events whose
``appended_at`` is before the time (Tansu can answer an offset a record or
two early), and keeps reading live. A named cursor stores its position as the committed
offset of consumer group ``NS.cursor.S.<cursor>`` (committed without joining
the group), so a restarted reader resumes after the last committed event.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from transport import EventLog, EventReader, LogEvent
from transport.errors import ClosedResourceError, TransientTransportError, UndecodableMessageError
from transport.kit import (
    Start,
    check_start,
    decode,
    encode,
    position_number,
    to_millisecond,
    utcnow,
    validate_header,
    validate_name,
    wait_within,
)
from transport_kafka._client import (
    ConsumerThread,
    KafkaContext,
    TopicSpec,
    _client_logger,
    consume_available,
)
from transport_kafka._config import KafkaSettings
from transport_kafka._errors import map_kafka_errors

__all__ = ["KafkaEventLog", "KafkaEventReader"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class KafkaEventReader(EventReader):
    """Reads one stream topic from a start position, then live."""

    def __init__(self, log: KafkaEventLog, stream: str, cursor: str | None) -> None:
        self.stream = stream
        self.cursor = cursor
        self._log = log
        self._topic = log.topic(stream)
        self._queue: asyncio.Queue[LogEvent | BaseException] = asyncio.Queue()
        self._thread: ConsumerThread | None = None
        self._consumer: Consumer | None = None
        self._last: int | None = None  # offset of the last event returned
        # Where the reader was placed (its start, a seek): what a commit
        # stores while no event was returned since.
        self._placed: int | None = None
        self._committed: int | None = None
        # After a start at a time: events appended before it are skipped.
        self._not_before: datetime | None = None
        self._closed = False

    async def _open(self, start: Start) -> None:
        clients = self._log.clients
        group = (
            f"{clients.settings.namespace}.cursor.{self.stream}.{self.cursor}"
            if self.cursor
            else f"{clients.settings.namespace}.reader"
        )
        conf = {
            **clients.settings.consumer_config(group, subscribe=False),
            "enable.partition.eof": False,
            "logger": _client_logger(),
        }
        with map_kafka_errors(f"reading {self.stream}"):
            self._consumer = Consumer(conf)
        offset: int | None = None
        if self.cursor:
            offset = self._committed = await self._call(self._stored_position)
        if offset is None:
            offset = await self._call(lambda: self._resolve(start))
            self._not_before = to_millisecond(start) if isinstance(start, datetime) else None
        self._placed = offset
        self._assign(offset)

    async def _call(self, fn: Any) -> Any:
        """A blocking consumer call, on the transport's executor before the
        reader thread runs, or on the reader thread afterwards."""
        if self._thread is not None:
            return await wait_within(self._thread.submit(fn), self._log.clients.timeout + 5)
        return await self._log.clients.blocking(f"reading {self.stream}", fn)

    def _stored_position(self) -> int | None:
        assert self._consumer is not None
        [tp] = self._consumer.committed(
            [TopicPartition(self._topic, 0)], timeout=self._log.clients.timeout
        )
        return tp.offset if tp.offset >= 0 else None

    def _resolve(self, start: Start) -> int:
        """Offset to start at (blocking)."""
        assert self._consumer is not None
        timeout = self._log.clients.timeout
        if isinstance(start, datetime):
            # appended_at has millisecond precision: compared at it (an
            # event of the same millisecond counts as at or after ``start``).
            millis = _millis(to_millisecond(start))
            [tp] = self._consumer.offsets_for_times(
                [TopicPartition(self._topic, 0, millis)], timeout=timeout
            )
            if tp.offset >= 0:
                return tp.offset
            return self._consumer.get_watermark_offsets(
                TopicPartition(self._topic, 0), timeout=timeout, cached=False
            )[1]
        if start == "earliest":
            return self._consumer.get_watermark_offsets(
                TopicPartition(self._topic, 0), timeout=timeout, cached=False
            )[0]
        if start == "latest":
            return self._consumer.get_watermark_offsets(
                TopicPartition(self._topic, 0), timeout=timeout, cached=False
            )[1]
        try:
            return int(start)
        except ValueError:
            raise ValueError(f"not a Kafka event-log position: {start!r}") from None

    def _assign(self, offset: int) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        if self._thread is None:
            consumer.assign([TopicPartition(self._topic, 0, offset)])
            self._thread = ConsumerThread(f"kafka-events-{self.stream}", self._step, consumer.close)
            self._thread.start()

    def _step(self) -> None:
        assert self._consumer is not None
        events: list[LogEvent | BaseException] = []
        for msg in consume_available(self._consumer, 200, 0.05):
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    events.append(KafkaException(err))
                continue
            events.append(_to_event(self.stream, msg))
        if events:
            with contextlib.suppress(RuntimeError):
                self._log.loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[LogEvent | BaseException]) -> None:
        for event in events:
            self._queue.put_nowait(event)

    async def __anext__(self) -> LogEvent:
        if self._closed:
            raise StopAsyncIteration
        if self.cursor:
            await self.commit()
        while True:
            item = await self._queue.get()
            if self._closed:  # woken by the close (see aclose)
                raise StopAsyncIteration
            if isinstance(item, BaseException):
                raise TransientTransportError(f"reading {self.stream}: {item}") from item
            if self._not_before is not None:
                if item.appended_at < self._not_before:
                    continue
                self._not_before = None
            self._last = int(item.position)
            self._holding = True
            return item

    async def seek(self, to: Start) -> None:
        if self._closed:
            raise ClosedResourceError(f"reader of {self.stream!r} is closed")
        to = check_start(to)
        _check_position(to)
        consumer = self._consumer
        assert consumer is not None and self._thread is not None

        def move() -> int:
            offset = self._resolve(to)
            consumer.assign([TopicPartition(self._topic, 0, offset)])
            # Events fetched before the seek are dropped on the loop side.
            self._log.loop.call_soon_threadsafe(self._drain)
            return offset

        with map_kafka_errors(f"seeking {self.stream}"):
            offset = await wait_within(self._thread.submit(move), self._log.clients.timeout + 5)
        # ``_drain`` was scheduled before this wake-up: the queue is clean.
        await asyncio.sleep(0)
        self._last = None
        self._holding = False
        self._placed = offset
        self._not_before = to_millisecond(to) if isinstance(to, datetime) else None

    def _drain(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()

    async def commit(self) -> None:
        # After the last event returned, or where the reader was placed
        # (``latest``, a seek) if it returned none since.
        if not self.cursor or self._thread is None or self._closed:
            return  # (a closed reader committed at its close)
        await self._commit(self._log.clients.timeout + 5)

    async def _commit(self, limit: float) -> None:
        assert self._thread is not None
        position = self._last + 1 if self._last is not None else self._placed
        if position is None or self._committed == position:
            self._holding = False
            return
        consumer = self._consumer
        assert consumer is not None

        def run() -> None:
            consumer.commit(offsets=[TopicPartition(self._topic, 0, position)], asynchronous=False)

        with map_kafka_errors(f"committing cursor {self.cursor!r}"):
            await wait_within(self._thread.submit(run), limit)
        self._committed = position
        self._holding = False

    async def aclose(self) -> None:
        """Commit a named cursor (within the operation timeout: a broker that
        is down fails the close with TransientTransportError once it is
        over) and stop reading; a read waiting for an event ends."""
        if self._closed:
            return
        join = self._log.clients.settings.options.close_timeout_s + 5
        try:
            alive = self._thread is not None and self._thread.alive
            if self.cursor and alive and self._final_commit_due():
                try:
                    await self._commit(self._log.clients.timeout)
                except TransientTransportError:
                    join = 1.0  # the consumer thread is stuck in that commit
                    raise
        finally:
            self._closed = True
            # A read waiting for the next event ends now.
            self._queue.put_nowait(ClosedResourceError(f"reader of {self.stream!r} is closed"))
            if self._thread is not None:
                await self._thread.join(join)
            self._log._readers.discard(self)


def _check_position(start: Start) -> None:
    """Refuse a malformed position before anything is sent.

    Raises: ValueError.
    """
    if isinstance(start, str) and start not in ("earliest", "latest"):
        try:
            position_number(start)  # digits only, within Kafka's 64-bit offsets
        except ValueError:
            raise ValueError(f"not a Kafka event-log position: {start!r}") from None


def _millis(moment: datetime) -> int:
    """Milliseconds since the epoch (exact for a millisecond-precision time)."""
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _to_event(stream: str, msg: Any) -> LogEvent:
    position = str(msg.offset())
    try:
        event = decode(LogEvent, msg.value() or b"")
    except UndecodableMessageError:
        # A foreign record: keep its bytes as text, its timestamp as the time.
        _, millis = msg.timestamp()
        key = msg.key()
        return LogEvent(
            stream=stream,
            position=position,
            data=(msg.value() or b"").decode("utf-8", "replace"),
            key=key.decode("utf-8", "replace") if isinstance(key, bytes) else None,
            appended_at=datetime.fromtimestamp(max(millis, 0) / 1000, UTC),
        )
    return event.model_copy(update={"stream": stream, "position": position})


def stream_spec(settings: KafkaSettings, stream: str) -> TopicSpec:
    """The topic of event-log stream ``stream``, with its ``retention.ms``
    (option ``stream_retention_ms``, else ``event_retention_ms``, -1 by
    default: every event is kept)."""
    options = settings.options
    retention = options.stream_retention_ms.get(stream, options.event_retention_ms)
    return TopicSpec(
        settings.stream_topic(stream),
        1,
        {"retention.ms": str(retention)},
        what=f"events of stream {stream!r}",
        exact_partitions="an event-log stream is read as one partition (positions are its offsets)",
        compaction_loses="every event but the last of each key",
    )


class KafkaEventLog(EventLog):
    """Streams as single-partition topics ``NS.stream.<name>.events``."""

    def __init__(self, ctx: KafkaContext) -> None:
        self.clients = ctx.clients
        self._limit = ctx.max_payload_bytes
        self._readers: set[KafkaEventReader] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "set by read()"
        return self._loop

    def topic(self, stream: str) -> str:
        return self.clients.settings.stream_topic(stream)

    async def _ready(self, stream: str) -> str:
        if self._closed:
            raise ClosedResourceError("event log is closed")
        validate_name(stream, "stream name")
        topic = self.topic(stream)
        await self.clients.ensure_topics([stream_spec(self.clients.settings, stream)])
        return topic

    async def append(
        self,
        stream: str,
        data: Any = None,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        for name, text in (headers or {}).items():
            validate_header(name, text)
        # The record value is the whole event as JSON (position excepted):
        # validated and size-checked before anything is sent. appended_at is
        # truncated to what the record timestamp (ms) holds exactly.
        now = utcnow()
        millis = now.microsecond // 1000
        event = LogEvent(
            stream=stream,
            position="",
            data=data,
            key=key,
            headers=dict(headers or {}),
            appended_at=now.replace(microsecond=millis * 1000),
        )
        value = encode(event, self._limit)
        topic = await self._ready(stream)
        _, offset = await self.clients.produce(
            topic,
            key.encode() if key is not None else None,
            value,
            what="append",
            timestamp_ms=_millis(event.appended_at),
        )
        return str(offset)

    async def read(
        self, stream: str, start: Start = "earliest", *, cursor: str | None = None
    ) -> KafkaEventReader:
        start = check_start(start)
        _check_position(start)
        if cursor is not None:
            validate_name(cursor, "cursor name")
        await self._ready(stream)
        self._loop = asyncio.get_running_loop()
        reader = KafkaEventReader(self, stream, cursor)
        await reader._open(start)
        self._readers.add(reader)
        return reader

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for reader in list(self._readers):
            with contextlib.suppress(Exception):
                await reader.aclose()
