"""Keyed topics: the :class:`~transport.KeyedLog` behind the registries, and
the dead-letter topics of the queues.

A keyed topic is an ordinary persistent topic whose messages carry the key as
their partition key. A delete is a tombstone: a message with Pulsar's
``null_value`` flag (what topic compaction and TableView treat as a delete)
and, for readers that drop that flag, an ``ae-tombstone`` property. State is
rebuilt by a reader from the earliest message up to the topic's last message
(``hasMessageAvailable`` turns false: :data:`~transport.CAUGHT_UP`), then
followed live. Last writer wins per key, in topic order.

**Checkpoints.** A topic keeps every message (pulsar-lite never deletes;
Apache Pulsar keeps them under the infinite retention the readers need, and
compacts only when an operator runs compaction), so a reader from the
earliest message replays the registry's whole history. A registry's keyed
topic is therefore resumable: every change carries its position (the
serialized message id), a reader can start at a position (inclusive), and
the shared registry readers save a checkpoint now and then — the live
records older than a resume position, and that position — as one message
of a companion topic ``<topic>__checkpoint``. The last message of that
topic is the checkpoint (its id asked with GetLastMessageId, the message
read by a reader placed on it): a new reader applies the records it carries
and reads the keyed topic from its resume position, not from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import _pulsar

from transport import CAUGHT_UP, CapabilityRegistry, DeliveryRegistry, KeyedChange, KeyedLog
from transport.errors import PermanentTransportError, TransientTransportError, TransportError
from transport.kit import SharedRun, encode_checkpoint, internal_name, read_checkpoint
from transport_pulsar._client import (
    AsyncProducer,
    AsyncPulsarClient,
    AsyncReader,
    Message,
    MessageId,
)
from transport_pulsar._errors import PulsarResultError

__all__ = [
    "KeyedTopic",
    "PulsarCapabilityRegistry",
    "PulsarDeliveryRegistry",
    "PulsarKeyedLog",
    "checkpoint_name",
]

#: The shared registry implementations run unchanged on a PulsarKeyedLog.
PulsarDeliveryRegistry = DeliveryRegistry
PulsarCapabilityRegistry = CapabilityRegistry

MARKER_PROPERTY = "ae-marker"
TOMBSTONE_PROPERTY = "ae-tombstone"
#: ``<registry>__checkpoint``: the registry's checkpoint topic, beside its keyed topic.
CHECKPOINT_SUFFIX = "checkpoint"
#: The largest checkpoint a view saves of itself (a broker's default message
#: size limit is 5 MB).
_VIEW_CHECKPOINT_MAX_BYTES = 4 * 1024 * 1024
_VIEW_CHECKPOINT_MAX_RECORDS = 30_000
#: Seconds a watch's reader waits for the next message before the broker is
#: asked whether one is due (see :meth:`KeyedTopic._due`): a
#: GetLastMessageId round trip per idle spell.
_IDLE_CHECK = 30.0

log = logging.getLogger("transport.pulsar")


def checkpoint_name(name: str) -> str:
    """The name (``kind`` prefix left to the caller) of the checkpoint topic
    of the registry ``name``."""
    return internal_name(name, CHECKPOINT_SUFFIX)


def keyed_change(message: Message, *, positioned: bool = False) -> KeyedChange | None:
    """The change a message carries (with its serialized message id as
    position if ``positioned``), or ``None`` for markers and unkeyed noise."""
    properties = message.properties()
    if MARKER_PROPERTY in properties:
        return None
    key = message.partition_key()
    if not key:
        return None
    position = message.message_id().serialize() if positioned else None
    if message.has_null_value() or properties.get(TOMBSTONE_PROPERTY) == "1":
        return KeyedChange(key, None, position)
    return KeyedChange(key, bytes(message.data()), position)


def _message_id(position: bytes) -> MessageId | None:
    """The message id a position encodes; ``None`` for one that does not."""
    try:
        return _pulsar.MessageId.deserialize(position)
    except (ValueError, TypeError, RuntimeError):
        return None


def _same_message(a: MessageId, b: MessageId) -> bool:
    return (a.ledger_id(), a.entry_id(), a.batch_index()) == (
        b.ledger_id(),
        b.entry_id(),
        b.batch_index(),
    )


def _topic_unusable(exc: BaseException) -> bool:
    """Whether a failure says the topic does not exist (and is not created
    on use) or may not be read: not one that goes away by retrying."""
    cause = exc.__cause__
    if isinstance(exc, PermanentTransportError):
        return True
    return isinstance(cause, PulsarResultError) and cause.result_name == "TopicNotFound"


def _is_empty_topic_error(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, PulsarResultError) and cause.result_name == "UnknownError"


class KeyedTopic:
    """Writes to one keyed topic, and an incrementally maintained view of it.

    With a ``checkpoint_topic`` (a registry's), the view behind :meth:`synced`
    starts from the last checkpoint saved there (see the module docstring),
    and :meth:`watch` can start at a position; without one (dead letters,
    hand-out counts, cursors) every reader starts at the earliest message.
    """

    def __init__(
        self,
        client: AsyncPulsarClient,
        topic: str,
        *,
        timeout: float,
        close_timeout: float,
        checkpoint_topic: str | None = None,
        checkpoint_every: int | None = None,
        merge: Callable[[bytes | None, bytes | None], bytes | None] | None = None,
    ):
        self._client = client
        self.topic = topic
        self.checkpoint_topic = checkpoint_topic
        # Save a checkpoint of the view itself every ``checkpoint_every``
        # changes it applies (a registry's shared reader saves its own).
        self._checkpoint_every = checkpoint_every if checkpoint_topic is not None else None
        self._since_checkpoint = 0
        self._saving: asyncio.Task[None] | None = None
        # How a value written meets the one the view holds (default: the
        # last writer wins).
        self._merge = merge
        self._ready = False  # the view has caught up once (and not failed since)
        #: Counts the views built: a new one after a read failed.
        self.generation = 0
        self._timeout = timeout
        self._close_timeout = close_timeout
        self._producer: AsyncProducer | None = None
        self._producer_lock = asyncio.Lock()
        self._checkpoint_producer: AsyncProducer | None = None
        self._reader: AsyncReader | None = None
        self._state: dict[str, bytes] = {}
        self._sync = SharedRun(self._catch_up)
        self._readers: set[AsyncReader] = set()
        # The view's reader is read by one catch-up or read-through at a time.
        self._read_lock = asyncio.Lock()
        self._position: MessageId | None = None  # the last message the view applied
        #: Called with every change the view applies (see the queue's hand-out counts).
        self.observer: Callable[[str, bytes | None], None] | None = None

    async def _get_producer(self) -> AsyncProducer:
        async with self._producer_lock:
            if self._producer is None:
                self._producer = await self._client.create_producer(self.topic)
            return self._producer

    async def write(self, key: str, value: bytes | None) -> MessageId:
        """Append a value (or a tombstone); durable when this returns, with
        the id of the message written."""
        producer = await self._get_producer()
        if value is None:
            return await producer.send(
                b"", key=key, properties={TOMBSTONE_PROPERTY: "1"}, null_value=True
            )
        return await producer.send(value, key=key)

    def write_at_exit(self, key: str, value: bytes | None, deadline: float) -> None:
        """:meth:`write` at interpreter exit (no event loop), waiting for the
        receipt until ``deadline`` at most; nothing if no producer was made."""
        if self._producer is None:
            return
        if value is None:
            self._producer.send_before(
                b"",
                key=key,
                deadline=deadline,
                properties={TOMBSTONE_PROPERTY: "1"},
                null_value=True,
            )
        else:
            self._producer.send_before(value, key=key, deadline=deadline)

    async def _mark(self) -> None:
        producer = await self._get_producer()
        await producer.send(b"", properties={MARKER_PROPERTY: "1"})

    async def _available(self, reader: AsyncReader) -> bool:
        try:
            return await reader.has_message_available()
        except TransientTransportError as exc:
            # pulsar-lite answers GetLastMessageId on a topic that has never
            # held a message with an error ("Topic has no messages") where
            # Apache Pulsar answers with an empty position. A marker message
            # (skipped by every reader) makes the question answerable.
            if not _is_empty_topic_error(exc):
                raise
        await self._mark()
        return await reader.has_message_available()

    async def _next_available(self, reader: AsyncReader) -> Message | None:
        """The reader's next message; ``None`` once it has read the topic's
        last message. Copies of messages read before are skipped
        (:meth:`AsyncReader.fresh`): a change applied again out of order
        would bring back a value overwritten since."""
        while True:
            # What the client holds already needs no question to the broker.
            message = await reader.poll()
            if message is None:
                message = await self._due(reader)
                if message is None:
                    return None
            if reader.fresh(message):
                return message

    async def _due(self, reader: AsyncReader) -> Message | None:
        """The message the topic holds for ``reader`` if there is one (asked
        of the broker), which must then arrive within the operation timeout;
        ``None`` if none is due. A reader that holds a due message back is
        given up with :class:`~transport.errors.TransientTransportError`
        (a catch-up starts over; a watch, asking after :data:`_IDLE_CHECK`
        seconds without a message, is re-watched from the last position
        applied): a follower's reader on pulsar-lite has been seen to go
        quiet with messages due, which left a registry's view, and every
        caller waiting on it, behind for good."""
        if not await self._available(reader):
            return None
        message = await reader.read_next(self._timeout)
        if message is None:
            raise TransientTransportError(
                f"read {self.topic}: the reader stopped delivering (a message is due and"
                f" none arrived within {self._timeout:g} s)"
            )
        return message

    async def _reader_on(self, position: bytes) -> tuple[AsyncReader, Message] | None:
        """A reader on the message at ``position`` (inclusive) and that
        message; ``None`` if the topic does not hold it (any more): a
        position of another topic, or of this one before it was deleted."""
        start = _message_id(position)
        if start is None:
            return None
        reader = await self._client.create_reader(self.topic, start, inclusive=True)
        try:
            # A reader placed on a missing id starts at the next message
            # there is (or at the end): the first message tells.
            first = await self._next_available(reader)
        except BaseException:
            await reader.close(self._close_timeout)
            raise
        if first is not None and _same_message(first.message_id(), start):
            return reader, first
        await reader.close(self._close_timeout)
        return None

    async def _reader_at(self, position: bytes | None) -> tuple[AsyncReader, Message | None]:
        """A reader on ``position`` and the message there, else (no
        position, or one the topic does not hold) one from the earliest
        message and ``None``."""
        if position is not None:
            found = await self._reader_on(position)
            if found is not None:
                return found
            log.warning(
                "%s: position %s is not in the topic; reading from the earliest message",
                self.topic,
                position.hex(),
            )
        return await self._client.create_reader(self.topic), None

    def _apply(self, change: KeyedChange) -> None:
        value = change.value
        if self._merge is not None:
            value = self._merge(self._state.get(change.key), value)
        if value is None:
            self._state.pop(change.key, None)
        else:
            self._state[change.key] = value
        if self.observer is not None:
            self.observer(change.key, change.value)

    def _apply_message(self, message: Message) -> None:
        change = keyed_change(message)
        if change is not None:
            self._apply(change)
        self._position = message.message_id()
        if self._checkpoint_every is not None:
            self._since_checkpoint += 1
            if self._since_checkpoint >= self._checkpoint_every and (
                self._saving is None or self._saving.done()
            ):
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # at interpreter exit (catch_up_at_exit)
                    return
                self._since_checkpoint = 0
                self._saving = loop.create_task(self._save_view(self._view_checkpoint()))

    def catch_up_at_exit(self, deadline: float) -> bool:
        """Without an event loop (at interpreter exit): apply every message
        written after the view's position, through a reader of its own,
        until ``deadline`` (``time.monotonic``) at most; whether the view
        caught up with the topic's end."""
        if not self._ready or self._position is None:
            return False

        def wait(start: Callable[[Callable[..., None]], None]) -> Any:
            done = threading.Event()
            box: list[Any] = []

            def callback(*args: Any) -> None:
                box.append(args)
                done.set()

            start(callback)
            if not done.wait(max(deadline - time.monotonic(), 0.0)):
                raise TimeoutError
            return box[0]

        conf = _pulsar.ReaderConfiguration()
        conf.receiver_queue_size(200)
        conf.start_message_id_inclusive(False)
        try:
            result, reader = wait(
                lambda cb: self._client._core.create_reader_async(
                    self.topic, self._position, conf, cb
                )
            )
            if result != _pulsar.Result.Ok:
                return False
        except (TimeoutError, Exception):
            return False
        try:
            while time.monotonic() < deadline:
                result, available = wait(reader.has_message_available_async)
                if result != _pulsar.Result.Ok:
                    return False
                if not available:
                    return True
                left = int((deadline - time.monotonic()) * 1000)
                if left <= 0:
                    return False
                message = reader.read_next(left)
                if self._position is None or self._position < message.message_id():
                    self._apply_message(message)
            return False
        except Exception:  # a timeout, the client closing: not caught up
            return False
        finally:
            with contextlib.suppress(Exception):
                reader.close_async(lambda *_: None)

    def _view_checkpoint(self) -> bytes | None:
        """The view as a checkpoint: every live record, resuming at the
        last message applied (applied again on load, harmlessly); ``None``
        if it would be too large."""
        assert self._position is not None
        if len(self._state) > _VIEW_CHECKPOINT_MAX_RECORDS:
            log.warning(
                "%s: checkpoint not saved: %d live records (at most %d)",
                self.topic,
                len(self._state),
                _VIEW_CHECKPOINT_MAX_RECORDS,
            )
            return None
        resume = self._position.serialize()
        return encode_checkpoint(resume, ((key, resume, v) for key, v in self._state.items()))

    async def _save_view(self, data: bytes | None) -> None:
        if data is None:
            return
        if len(data) > _VIEW_CHECKPOINT_MAX_BYTES:
            log.warning(
                "%s: checkpoint not saved: %d live records take %d bytes (at most %d)",
                self.topic,
                len(self._state),
                len(data),
                _VIEW_CHECKPOINT_MAX_BYTES,
            )
            return
        try:
            await self.save_checkpoint(data)
        except TransportError as exc:
            log.warning("%s: checkpoint not saved (%s); the next one is tried", self.topic, exc)

    @property
    def view(self) -> dict[str, bytes] | None:
        """The view as far as it has been read (no round trip); ``None``
        until a :meth:`synced` has completed (again, after a read failed)."""
        return self._state if self._ready else None

    async def read_through(self, message_id: MessageId) -> None:
        """Read until the view has applied ``message_id``, a message this
        handle wrote: every message written before it is in the view then,
        without asking the broker for the topic's last message."""
        # Whoever holds the lock reads for a bounded time: the wait for it is
        # bounded too. Only the reads are timed, and a reset happens under
        # the lock (never under a catch-up using the reader).
        async with self._read_lock:
            reader = self._reader
            if reader is None or not self._ready:
                self._ready = False  # the next lookup builds the view
                raise TransientTransportError(f"read {self.topic}: no view to read through")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._timeout
            try:
                async with asyncio.timeout_at(deadline):
                    while self._position is None or self._position < message_id:
                        message = await reader.poll()
                        if message is None:
                            message = await reader.read_next(max(deadline - loop.time(), 0.0))
                            if message is None:
                                continue
                        if reader.fresh(message):
                            self._apply_message(message)
            except TimeoutError:
                # A reader that does not deliver is not trusted again: the
                # next lookup builds the view anew.
                await self._reset()
                raise TransientTransportError(
                    f"read {self.topic}: a message written was not read back "
                    f"within {self._timeout:g} s"
                ) from None

    async def snapshot(self) -> dict[str, bytes]:
        """The committed state as of this call (every write that returned
        before the call is included)."""
        return dict(await self.synced())

    async def synced(self) -> dict[str, bytes]:
        """Like :meth:`snapshot`, without the copy: the mapping is not to be
        changed, and later catch-ups may add to it. Concurrent callers share
        catch-ups (:class:`~transport.kit.SharedRun`): a burst of ``get``
        calls costs two GetLastMessageId round trips, not one each in a queue
        behind a lock."""
        return await self._sync()

    async def _catch_up(self) -> dict[str, bytes]:
        async with self._read_lock:
            return await self._catch_up_locked()

    async def _catch_up_locked(self) -> dict[str, bytes]:
        try:
            if self._reader is None:
                self.generation += 1
                self._reader = await self._start_view()
            while (message := await self._next_available(self._reader)) is not None:
                self._apply_message(message)
        except Exception:
            # A half-read position is fine to continue from, but after an
            # error start over rather than trust it (in a new mapping: the
            # one handed out before stays as it was).
            await self._reset()
            raise
        self._ready = True
        return self._state

    async def _reset(self) -> None:
        """Drop the view (the next :meth:`synced` builds it anew)."""
        reader, self._reader = self._reader, None
        self._ready = False
        self._state = {}
        self._position = None
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader.close(self._close_timeout)

    async def _start_view(self) -> AsyncReader:
        """The view's reader: on the checkpoint's resume position, with the
        records it carries and the message there applied, if there is a
        usable checkpoint; else from the earliest message."""
        loaded = await self._load_checkpoint()
        if loaded is None:
            return await self._client.create_reader(self.topic)
        _, records, reader, first = loaded
        for key, _, value in records:
            self._state[key] = value
        self._apply_message(first)
        return reader

    async def _load_checkpoint(
        self,
    ) -> tuple[bytes, list[tuple[str, bytes, bytes]], AsyncReader, Message] | None:
        """The last checkpoint saved (raw, and its records) with a reader on
        its resume position and the message there; ``None`` if there is no
        checkpoint, or it cannot be read, or its position is not in the
        topic (a checkpoint of a topic deleted since: its records are not
        this topic's)."""
        if self.checkpoint_topic is None:
            return None
        try:
            last = await self._client.last_message_id(self.checkpoint_topic)
        except (TransientTransportError, PermanentTransportError) as exc:
            if not _topic_unusable(exc):
                raise
            # A broker without topic auto-creation and a registry provisioned
            # before checkpoints existed: replay from the start, as before.
            log.warning(
                "%s: no checkpoint read (%s); `transport provision` creates the topic",
                self.checkpoint_topic,
                exc,
            )
            return None
        if last is None:
            return None
        reader = await self._client.create_reader(self.checkpoint_topic, last, inclusive=True)
        try:
            message = await reader.read_next(self._timeout)
        finally:
            await reader.close(self._close_timeout)
        if message is None:
            raise TransientTransportError(
                f"read {self.checkpoint_topic}: its last message did not arrive"
            )
        data = bytes(message.data())
        try:
            resume, records = read_checkpoint(data)
        except ValueError as exc:
            log.warning("%s: ignoring an unreadable checkpoint (%s)", self.checkpoint_topic, exc)
            return None
        found = await self._reader_on(resume)
        if found is None:
            log.warning(
                "%s: ignoring the checkpoint: its position %s is not in %s",
                self.checkpoint_topic,
                resume.hex(),
                self.topic,
            )
            return None
        reader, first = found
        return data, records, reader, first

    async def load_checkpoint(self) -> bytes | None:
        """The last checkpoint saved, if it is usable (see
        :meth:`_load_checkpoint`); ``None`` otherwise."""
        loaded = await self._load_checkpoint()
        if loaded is None:
            return None
        data, _, reader, _ = loaded
        await reader.close(self._close_timeout)
        return data

    async def save_checkpoint(self, data: bytes) -> None:
        """Append ``data`` to the checkpoint topic (its last message is the
        checkpoint)."""
        if self.checkpoint_topic is None:
            raise NotImplementedError(f"{self.topic} has no checkpoint topic")
        async with self._producer_lock:
            if self._checkpoint_producer is None:
                self._checkpoint_producer = await self._client.create_producer(
                    self.checkpoint_topic
                )
            producer = self._checkpoint_producer
        await producer.send(data)

    async def watch(self, position: bytes | None = None) -> AsyncIterator[KeyedChange | object]:
        """Every change from ``position`` on (inclusive; from the earliest
        message without one, or if the topic does not hold it), each with
        its position, in topic order; then CAUGHT_UP once the topic's last
        message was read; then every later change."""
        reader, message = await self._reader_at(position)
        self._readers.add(reader)
        try:
            if message is None:
                message = await self._next_available(reader)
            while message is not None:
                change = keyed_change(message, positioned=True)
                if change is not None:
                    yield change
                message = await self._next_available(reader)
            yield CAUGHT_UP
            while True:
                message = await reader.read_next(_IDLE_CHECK)
                if message is None:
                    message = await self._due(reader)
                if message is None or not reader.fresh(message):
                    continue
                change = keyed_change(message, positioned=True)
                if change is not None:
                    yield change
        finally:
            self._readers.discard(reader)
            await reader.close(self._close_timeout)

    async def aclose(self) -> None:
        await self._sync.aclose()
        if self._saving is not None and not self._saving.done():
            await asyncio.wait({self._saving}, timeout=self._close_timeout)
        readers = [r for r in (self._reader, *self._readers) if r is not None]
        self._reader = None
        self._readers.clear()
        for reader in readers:
            await reader.close(self._close_timeout)
        for attribute in ("_producer", "_checkpoint_producer"):
            producer = getattr(self, attribute)
            if producer is not None:
                setattr(self, attribute, None)
                await producer.close(self._close_timeout)


class PulsarKeyedLog(KeyedLog):
    """A registry's keyed log on one Pulsar topic (see the module docstring):
    resumable when its topic has a checkpoint topic."""

    resumable = True

    def __init__(self, topic: KeyedTopic) -> None:
        self._topic = topic
        self._closed = False
        self.resumable = topic.checkpoint_topic is not None

    async def put(self, key: str, value: bytes) -> None:
        await self._topic.write(key, value)

    async def delete(self, key: str) -> None:
        await self._topic.write(key, None)

    async def get(self, key: str) -> bytes | None:
        return (await self._topic.synced()).get(key)

    def watch(self) -> AsyncIterator[KeyedChange | object]:
        return self._topic.watch()

    def watch_from(self, position: bytes) -> AsyncIterator[KeyedChange | object]:
        return self._topic.watch(position)

    async def load_checkpoint(self) -> bytes | None:
        return await self._topic.load_checkpoint()

    async def save_checkpoint(self, data: bytes) -> None:
        await self._topic.save_checkpoint(data)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._topic.aclose()
