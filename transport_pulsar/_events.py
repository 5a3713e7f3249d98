"""``PulsarEventLog``: one persistent topic per stream, read with readers.

* append: a non-batched send; the position is the message id
  (``<ledger>-<entry>``), returned on the send receipt. ``appended_at`` is
  the appender's clock at millisecond precision, stored in the event and also
  sent as the message's event time (``event_timestamp``); the publish time is
  stamped by the producer client when it sends and is not used.
* read/seek: a reader from the earliest message, a position (inclusive), the
  latest message (exclusive: only events appended after the reader was
  created) or a time: the first event whose ``appended_at`` is at or after
  it, found by reading from the earliest event (pulsar-lite does not
  implement seeking by publish time), so a time seek costs a scan of the
  stream, and a time seek and ``appended_at`` always agree.
* named cursors: positions kept in a keyed topic ``<prefix>.logcursor.<stream>``
  (key = cursor name), so they survive restarts without relying on
  subscription state; a resumed reader starts after the stored event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import _pulsar

from transport import EventLog, EventReader, LogEvent, encode, utcnow
from transport.errors import ClosedResourceError, TransientTransportError, TransportError
from transport.kit import (
    Start,
    check_headers,
    check_start,
    position_number,
    to_millisecond,
    validate_name,
)
from transport_pulsar._client import (
    AsyncProducer,
    AsyncReader,
    Message,
    MessageId,
    PulsarContext,
)
from transport_pulsar._registries import KeyedTopic

__all__ = ["PulsarEventLog", "PulsarEventReader"]

log = logging.getLogger("transport.pulsar")

#: Seconds a reader waits for an event before it asks the broker whether
#: one is due (see :meth:`PulsarEventReader._read`).
_IDLE_CHECK = 30.0


def _position(message_id: Any) -> str:
    return f"{message_id.ledger_id()}-{message_id.entry_id()}"


def _message_id(position: str) -> MessageId:
    """Raises: ValueError (not ``<ledger>-<entry>``, each digits only
    within 64 bits)."""
    try:
        ledger, entry = (position_number(part) for part in position.split("-"))
    except ValueError:
        raise ValueError(f"not a position of this log: {position!r}") from None
    return _pulsar.MessageId(-1, ledger, entry, -1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _millis(moment: datetime) -> int:
    """Milliseconds since the epoch (exact for a millisecond-precision time)."""
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _now_ms() -> datetime:
    """The current time truncated to a millisecond: what the message's event
    time (milliseconds) can carry exactly."""
    now = utcnow()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _target(start: Start) -> MessageId:
    """The message id to start at; a time starts at the earliest message and
    is applied by the reader (see :class:`PulsarEventReader`)."""
    if isinstance(start, datetime) or start == "earliest":
        return _pulsar.MessageId.earliest
    if start == "latest":
        return _pulsar.MessageId.latest
    return _message_id(start)


def _inclusive(start: Start) -> bool:
    """Whether the reader returns the message at :func:`_target`.

    A position is inclusive by contract. ``latest`` must not be: an inclusive
    reader at ``MessageId.latest`` is placed *on* the last existing message
    (the client looks up the last message id and seeks to it), so the last
    old event would be returned, where "latest" means only later events.
    """
    return start != "latest"


class PulsarEventReader(EventReader):
    def __init__(
        self,
        log: PulsarEventLog,
        stream: str,
        reader: AsyncReader,
        cursor: str | None,
        skip: str | None,
        start: Start,
    ) -> None:
        self.stream = stream
        self.cursor = cursor
        self._log = log
        self._reader = reader
        self._skip = skip  # the committed event a resumed cursor starts on
        # Where the reader was placed (at open or by the last seek), for a
        # reader given up before it returned an event (see _reopen).
        self._start: Start = start
        self._opened_at = _now_ms()
        self._returned: str | None = None  # the last event returned since then
        self._start_skip = skip  # skipped at the start (a resumed cursor's event)
        # Seeks to a time scan from the earliest event and skip what was
        # appended before it: pulsar-lite answers a seek by publish time
        # with success and then delivers nothing.
        self._not_before: datetime | None = None
        # What a commit stores: the last event returned, or, while none was
        # returned since the reader was placed, the placement (see _placement).
        self._last: str | None = skip
        self._committed: str | None = skip
        self._closed = False
        # The stall guard's state (see _read): since when the reader has
        # delivered nothing, and by when a message known to be due must come.
        self._idle_since = 0.0
        self._due_by: float | None = None
        self._delivering()
        self._reopening: asyncio.Future[None] | None = None

    async def __anext__(self) -> LogEvent:
        if self._closed:
            raise StopAsyncIteration
        # "Each event is committed when the next one is requested."
        await self.commit()
        while True:
            try:
                message = await self._read()
            except (ClosedResourceError, asyncio.CancelledError):
                # Closed while waiting: the client fails the pending read
                # (ClosedResourceError) or the close cancels it, which
                # reaches this task through its shield although nobody
                # cancelled the task: the iteration ends.
                task = asyncio.current_task()
                if self._closed and (task is None or not task.cancelling()):
                    raise StopAsyncIteration from None
                raise
            if self._closed:
                raise StopAsyncIteration
            if message is None or not self._reader.fresh(message):
                continue  # nothing yet, or a copy (pulsar-lite sends readers some)
            position = _position(message.message_id())
            if self._skip is not None:
                skip, self._skip = self._skip, None
                if position == skip:
                    continue
            event = self._decode(message, position)
            if event is None:
                continue
            if self._not_before is not None:
                if event.appended_at < self._not_before:
                    continue
                self._not_before = None
            self._last = self._returned = position
            self._holding = True
            return event

    async def _read(self) -> Message | None:
        """The next message of the reader, or ``None`` after a wait.

        Guards against a reader that stops delivering (a reader on
        pulsar-lite has been seen to go quiet with messages due, on a
        registry's keyed topic; an event reader would then wait for good):
        after :data:`_IDLE_CHECK` seconds without a message it asks the
        broker whether one is due, and if one is and does not arrive within
        the operation timeout, the reader is replaced where it was
        (:meth:`_reopen`). The idle time and the deadline are kept on the
        reader, so callers polling with short ``next(timeout)`` calls are
        guarded as well as one waiting for good."""
        now = time.monotonic()
        if self._due_by is not None:
            if now >= self._due_by:
                log.warning(
                    "event log %r: the reader stopped delivering (an event is due and"
                    " none arrived within %g s); reading on with a new reader",
                    self.stream,
                    self._log._timeout,
                )
                await self._replace()
                return None
            wait = self._due_by - now
        else:
            wait = self._idle_since + _IDLE_CHECK - now
            if wait <= 0:
                if await self._is_due():
                    self._due_by = time.monotonic() + self._log._timeout
                else:
                    self._idle_since = time.monotonic()  # ask again after a while
                return None
        message = await self._reader.read_next(wait)
        if message is not None:
            self._delivering()
        return message

    def _delivering(self) -> None:
        """The reader delivers (or is new): the stall guard starts over."""
        self._idle_since, self._due_by = time.monotonic(), None

    async def _is_due(self) -> bool:
        """Whether the broker holds a message for this reader; ``False`` if
        it cannot be asked (unreachable, or a topic never written): the
        reader waits on."""
        try:
            return bool(await self._reader.has_message_available())
        except TransientTransportError as exc:
            log.debug("event log %r: asking for a due event: %s", self.stream, exc)
            return False

    async def _replace(self) -> None:
        """Run :meth:`_reopen` once, to its end even when the caller's
        ``next(timeout)`` ends first (the next call then waits for it)."""
        if self._reopening is None:
            self._reopening = asyncio.ensure_future(self._reopen())
        try:
            await asyncio.shield(self._reopening)
        finally:
            if self._reopening.done():
                self._reopening = None

    async def _reopen(self) -> None:
        """Replace the reader with one placed where it was: on the last
        event returned (inclusive, skipped again), else where it was opened
        or seeked to; one opened at ``latest`` that returned nothing reads
        from the earliest event, skipping what was appended before it was
        opened (by ``appended_at``, the appender's clock). If no reader can
        be created (the broker is down), the old one is kept and the check
        runs again after another idle period."""
        start: Start
        skip: str | None = None
        not_before: datetime | None = None
        if self._returned is not None:
            start = skip = self._returned
        elif self._start == "latest":
            start, not_before = "earliest", self._opened_at
        else:
            start, skip = self._start, self._start_skip
        try:
            reader = await self._log._ctx.client.create_reader(
                self._reader.topic, _target(start), inclusive=_inclusive(start)
            )
        except TransientTransportError as exc:
            log.warning("event log %r: no new reader (%s); waiting on", self.stream, exc)
            self._delivering()  # asked again after another idle period
            return
        if self._closed:  # closed meanwhile
            await reader.close(self._log._close_timeout)
            return
        self._skip = skip
        if not_before is not None:
            self._not_before = not_before
        old, self._reader = self._reader, reader
        self._delivering()
        await old.close(self._log._close_timeout)

    def _decode(self, message: Message, position: str) -> LogEvent | None:
        try:
            event = LogEvent.model_validate_json(bytes(message.data()))
        except ValueError:
            # A foreign record: surface nothing rather than crash the reader.
            return None
        return event.model_copy(update={"position": position, "stream": self.stream})

    async def seek(self, to: Start) -> None:
        if self._closed:
            raise ClosedResourceError("event reader is closed")
        self._skip = None
        to = check_start(to)
        placed = await self._log._placement(self._reader.topic, to) if self.cursor else None
        # A fresh reader at the target rather than the seek command: brokers
        # answer a seek by disconnecting the consumer, and pulsar-lite does so
        # before confirming, so the client reports the seek as failed.
        reader = await self._log._ctx.client.create_reader(
            self._reader.topic, _target(to), inclusive=_inclusive(to)
        )
        old, self._reader = self._reader, reader
        self._not_before = to_millisecond(to) if isinstance(to, datetime) else None
        self._start, self._opened_at, self._returned = to, _now_ms(), None
        self._start_skip = None
        self._last = placed
        self._holding = False
        self._delivering()
        await old.close(self._log._close_timeout)

    async def commit(self) -> None:
        if self._closed:
            return  # committed at its close
        if self.cursor is None or self._last is None or self._last == self._committed:
            self._holding = False
            return
        await self._log._cursors(self.stream).write(self.cursor, self._last.encode())
        self._committed = self._last
        self._holding = False

    async def aclose(self) -> None:
        if self._closed:
            return
        try:
            if self._final_commit_due():
                with contextlib.suppress(TransportError):
                    await self.commit()
        finally:
            self._closed = True
            self._log._readers.discard(self)
            if self._reopening is not None and not self._reopening.done():
                # It closes the reader it creates once it sees this one closed.
                with contextlib.suppress(Exception):
                    await self._reopening
            await self._reader.close(self._log._close_timeout)


class PulsarEventLog(EventLog):
    def __init__(self, ctx: PulsarContext) -> None:
        self._ctx = ctx
        self._close_timeout = ctx.settings.options.close_timeout_seconds
        self._timeout = ctx.settings.options.operation_timeout_seconds
        self._producers: dict[str, AsyncProducer] = {}
        self._cursor_topics: dict[str, KeyedTopic] = {}
        self._readers: set[PulsarEventReader] = set()
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("event log is closed")
        self._ctx.check_open()

    def _cursors(self, stream: str) -> KeyedTopic:
        topic = self._cursor_topics.get(stream)
        if topic is None:
            options = self._ctx.settings.options
            topic = self._cursor_topics[stream] = KeyedTopic(
                self._ctx.client,
                self._ctx.topic("logcursor", stream),
                timeout=options.operation_timeout_seconds,
                close_timeout=options.close_timeout_seconds,
            )
        return topic

    async def append(
        self,
        stream: str,
        data: Any = None,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        self._check()
        validate_name(stream, "stream name")
        event = LogEvent(
            stream=stream,
            position="0",
            data=data,
            key=key,
            headers=check_headers(headers),
            appended_at=_now_ms(),
        )
        body = encode(event, self._ctx.config.max_payload_bytes)
        producer = self._producers.get(stream)
        if producer is None:
            topic = self._ctx.topic("log", stream)
            producer = await self._ctx.retrying(lambda: self._ctx.client.create_producer(topic))
            self._producers[stream] = producer
        message_id = await producer.send(body, key=key, event_time_ms=_millis(event.appended_at))
        return _position(message_id)

    async def _placement(self, topic: str, start: Start) -> str | None:
        """What a named cursor placed at ``start`` stores until it returns an
        event (a stored value is the last event read, skipped on resuming):
        the topic's last message for ``latest`` (looked up before the reader
        is created, so an event appended in between is read again rather
        than missed), ``earliest`` as such; ``None`` (nothing stored) for a
        position or a time, which a stored value cannot express."""
        if start == "earliest":
            return "earliest"
        if start == "latest":
            last = await self._ctx.client.last_message_id(topic)
            return "earliest" if last is None else _position(last)
        return None

    async def read(
        self, stream: str, start: Start = "earliest", *, cursor: str | None = None
    ) -> EventReader:
        self._check()
        validate_name(stream, "stream name")
        skip: str | None = None
        placed: str | None = None
        topic = self._ctx.topic("log", stream)
        if cursor is not None:
            validate_name(cursor, "cursor name")
            stored = (await self._cursors(stream).synced()).get(cursor)
            if stored is not None:
                skip = stored.decode()
                start = skip
            else:
                placed = await self._placement(topic, check_start(start))
        start = check_start(start)
        reader = await self._ctx.client.create_reader(
            topic, _target(start), inclusive=_inclusive(start)
        )
        event_reader = PulsarEventReader(self, stream, reader, cursor, skip, start)
        if placed is not None:
            event_reader._last = placed
        if isinstance(start, datetime):
            event_reader._not_before = to_millisecond(start)
        self._readers.add(event_reader)
        return event_reader

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for reader in list(self._readers):
            with contextlib.suppress(Exception):
                await reader.aclose()
        for producer in self._producers.values():
            await producer.close(self._close_timeout)
        for topic in self._cursor_topics.values():
            with contextlib.suppress(Exception):
                await topic.aclose()
