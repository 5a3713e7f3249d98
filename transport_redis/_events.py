"""Event bus on Redis pub/sub and event log on Redis Streams.

Bus: subject ``s`` is published on channel ``<ns>:ev:<s>``. A subscription
pattern becomes a ``PSUBSCRIBE`` glob with every ``*`` and ``>`` token as
``*``; Redis's ``*`` also matches across dots, so each event is checked
against the subscription's own pattern (``*`` one token, ``>`` the rest)
before it is handed out. One pub/sub connection per bus carries every
subscription; a subscription returns once the server confirmed it, so an
event published afterwards by any client is seen. Queue groups: each event
goes to one member. Members are listed in the sorted set
``<ns>:evq:<group>:<pattern>:members`` (score: when the entry lapses; renewed every
10 s while the bus runs, so a crashed process's members leave within 30 s);
every process that sees an event picks the member at ``crc32(event id)``
modulo the live members, and the process holding it delivers it after
winning ``SET NX`` on ``<ns>:evq:<group>:<pattern>:<event id>`` (kept one minute),
so two processes with different views of the members never both deliver. At most once, no persistence: an event published
while a subscriber is disconnected is not seen by it. ``request`` subscribes
to an inbox channel ``<ns>:inbox:<random>`` first, then publishes with
``reply_to`` set; no reply within the timeout (nobody listening included)
raises ``TimeoutError`` naming the subject.

Log: stream ``s`` is the Redis stream ``<ns>:log:{s}``; one entry per event
(field ``event``: JSON ``{"data", "key", "headers"}``). A position is the
entry id (``<ms>-<seq>``); ``appended_at`` is the id's millisecond time (the
server's clock, never going backwards within a stream), so a read from a
time starts at the id ``<ms>-0`` of that time rounded up to the next
millisecond. Readers wait for appends with ``XREAD BLOCK``. Named cursors are
fields of the hash ``<ns>:log:{s}:cursors`` (the position of the last event
committed). Retention: every event is kept unless the option
``event_max_len`` trims streams (``XADD MAXLEN ~``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
import zlib
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import Field

from transport import (
    Event,
    EventBus,
    EventLog,
    EventReader,
    LogEvent,
    Subscription,
    decode,
    encode,
    subject_matches,
    utcnow,
    validate_subject,
)
from transport.errors import (
    ClosedResourceError,
    TransientTransportError,
    TransportError,
    UndecodableMessageError,
)
from transport.kit import (
    EventInbox,
    OutageLog,
    Start,
    check_headers,
    check_start,
    make_event,
    to_millisecond,
    validate_name,
    wait_within,
)
from transport.kit import WireModel as _WireModel
from transport_redis._client import RedisContext, keys

__all__ = ["RedisEventBus", "RedisEventLog"]

log = logging.getLogger("transport.redis")

_CLOSED = object()
_BLOCK_MS = 1000
_GROUP_CLAIM_MS = 60_000
_MEMBER_TTL_S = 30.0
_MEMBER_RENEW_S = 10.0
_POSITION = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_SEQ = 2**64 - 1


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# -- bus ---------------------------------------------------------------------
class _RedisSubscription(Subscription):
    def __init__(self, bus: RedisEventBus, pattern: str, glob: str, queue_group: str | None):
        self.pattern = pattern
        self.queue_group = queue_group
        self.glob = glob
        self.queue = EventInbox(f"subscription {pattern!r}")
        self.member = f"{bus._id}:{uuid.uuid4().hex[:12]}"
        self._bus = bus
        self._closed = False

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        item = await self.queue.get()
        if item is _CLOSED:
            raise StopAsyncIteration
        assert isinstance(item, Event)
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.queue.put_nowait(_CLOSED)
        await self._bus._unsubscribe(self)


class RedisEventBus(EventBus):
    """Redis pub/sub (see the module docstring)."""

    def __init__(self, ctx: RedisContext) -> None:
        self._ctx = ctx
        self._client = ctx.client
        self._ns = ctx.config.namespace
        self._limit = ctx.config.max_payload_bytes
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._subs: dict[str, list[_RedisSubscription]] = {}  # by glob
        self._confirm: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._inboxes: dict[str, asyncio.Future[Event]] = {}
        self._id = uuid.uuid4().hex
        self._members: dict[str, _RedisSubscription] = {}
        self._renewed = 0.0
        self._lock = asyncio.Lock()
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("event bus is closed")
        self._ctx.check_open()
        self._client.check_open()

    def _channel(self, subject: str) -> str:
        return keys.channel(self._ns, subject)

    async def publish(
        self, subject: str, data: Any = None, *, headers: dict[str, str] | None = None
    ) -> None:
        self._check()
        event = make_event(validate_subject(subject), data, headers)
        body = encode(event, self._limit)
        with self._client.errors(f"publishing {subject}"):
            await self._client.redis.publish(self._channel(subject), body)

    async def _command(self, command: str, name: str) -> None:
        """(P)SUBSCRIBE and wait for the server's confirmation."""
        loop = asyncio.get_running_loop()
        confirmed: asyncio.Future[None] = loop.create_future()
        self._confirm.setdefault(name.encode(), deque()).append(confirmed)
        try:
            with self._client.errors(f"subscribing to {name}"):
                if self._pubsub is None:
                    self._pubsub = self._client.redis.pubsub()
                await getattr(self._pubsub, command)(name)
                if self._reader is None or self._reader.done():
                    self._reader = asyncio.create_task(self._read())
                async with asyncio.timeout(self._client.request_timeout):
                    await confirmed
        except TimeoutError as exc:
            raise TransientTransportError(f"subscribing to {name}: no confirmation") from exc
        finally:
            waiting = self._confirm.get(name.encode())
            if waiting is not None and confirmed in waiting:
                waiting.remove(confirmed)

    async def subscribe(self, pattern: str, queue_group: str | None = None) -> Subscription:
        self._check()
        validate_subject(pattern, pattern=True)
        if queue_group is not None:
            validate_name(queue_group, "queue group")
        tokens = ["*" if t in ("*", ">") else t for t in pattern.split(".")]
        glob = self._channel(".".join(tokens))
        subscription = _RedisSubscription(self, pattern, glob, queue_group)
        if queue_group is not None:
            await self._join(subscription)
        async with self._lock:
            first = glob not in self._subs
            self._subs.setdefault(glob, []).append(subscription)
            if first:
                try:
                    await self._command("psubscribe", glob)
                except BaseException:
                    self._subs[glob].remove(subscription)
                    if not self._subs[glob]:
                        del self._subs[glob]
                    raise
        return subscription

    def _members_key(self, group: str, pattern: str) -> str:
        return f"{self._ns}:evq:{group}:{pattern}:members"

    async def _join(self, subscription: _RedisSubscription) -> None:
        assert subscription.queue_group is not None
        self._members[subscription.member] = subscription
        with self._client.errors(f"joining queue group {subscription.queue_group}"):
            await self._client.redis.zadd(
                self._members_key(subscription.queue_group, subscription.pattern),
                {subscription.member: time.time() + _MEMBER_TTL_S},
            )

    async def _renew_members(self) -> None:
        if time.monotonic() - self._renewed < _MEMBER_RENEW_S or not self._members:
            return
        self._renewed = time.monotonic()
        lapse = time.time() + _MEMBER_TTL_S
        with contextlib.suppress(TransportError), self._client.errors("renewing group members"):
            async with self._client.redis.pipeline(transaction=False) as pipe:
                for member, sub in self._members.items():
                    assert sub.queue_group is not None
                    key = self._members_key(sub.queue_group, sub.pattern)
                    pipe.zadd(key, {member: lapse})
                    pipe.zremrangebyscore(key, "-inf", time.time())
                await pipe.execute()

    async def _unsubscribe(self, subscription: _RedisSubscription) -> None:
        if self._members.pop(subscription.member, None) is not None:
            assert subscription.queue_group is not None
            with contextlib.suppress(Exception):
                await self._client.redis.zrem(
                    self._members_key(subscription.queue_group, subscription.pattern),
                    subscription.member,
                )
        async with self._lock:
            members = self._subs.get(subscription.glob, [])
            if subscription in members:
                members.remove(subscription)
            if not members and subscription.glob in self._subs:
                del self._subs[subscription.glob]
                if self._pubsub is not None and not self._closed:
                    with contextlib.suppress(Exception):
                        await self._pubsub.punsubscribe(subscription.glob)

    async def _read(self) -> None:
        backoff = 0.05
        while not self._closed:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis-py reconnects and re-subscribes
                if self._closed:
                    return
                log.debug("event bus: reading failed, retrying: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            await self._renew_members()
            if message is None:
                continue
            kind = message.get("type")
            if kind in ("psubscribe", "subscribe"):
                name = message.get("pattern") or message.get("channel")
                key = name if isinstance(name, bytes) else _text(name).encode()
                waiting = self._confirm.get(key)
                while waiting:
                    future = waiting.popleft()
                    if not future.done():
                        future.set_result(None)
                        break
                continue
            if kind == "message":
                self._on_reply(message)
            elif kind == "pmessage":
                await self._on_event(message)

    def _on_reply(self, message: dict[str, Any]) -> None:
        future = self._inboxes.get(_text(message["channel"]))
        if future is None or future.done():
            return
        try:
            future.set_result(decode(Event, message["data"]))
        except UndecodableMessageError as exc:
            log.warning("event bus: dropping an undecodable reply: %s", exc)

    async def _on_event(self, message: dict[str, Any]) -> None:
        members = self._subs.get(_text(message["pattern"]))
        if not members:
            return
        try:
            event = decode(Event, message["data"])
        except UndecodableMessageError as exc:
            log.warning("event bus: dropping an undecodable event: %s", exc)
            return
        plain: list[_RedisSubscription] = []
        groups: set[tuple[str, str]] = set()
        for sub in members:
            if sub._closed or not subject_matches(sub.pattern, event.subject):
                continue
            if sub.queue_group is None:
                plain.append(sub)
            else:
                groups.add((sub.queue_group, sub.pattern))
        for sub in plain:
            sub.queue.put_nowait(event)
        for group, pattern in groups:
            chosen = await self._chosen(group, pattern, event)
            if chosen is not None:
                chosen.queue.put_nowait(event)

    async def _chosen(self, group: str, pattern: str, event: Event) -> _RedisSubscription | None:
        """This process's member of ``group`` that gets ``event``, if any."""
        try:
            with self._client.errors("queue group"):
                live = await self._client.redis.zrangebyscore(
                    self._members_key(group, pattern), time.time(), "+inf"
                )
                if not live:
                    return None
                names = sorted(_text(m) for m in live)
                member = names[zlib.crc32(event.id.encode()) % len(names)]
                local = self._members.get(member)
                if local is None or local._closed:
                    return None
                claim = f"{self._ns}:evq:{group}:{pattern}:{event.id}"
                won = await self._client.redis.set(claim, b"1", nx=True, px=_GROUP_CLAIM_MS)
        except TransportError as exc:
            log.warning("event bus: queue group %s dropped an event: %s", group, exc)
            return None
        return local if won else None

    async def request(
        self,
        subject: str,
        data: Any = None,
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> Event:
        self._check()
        inbox = f"{self._ns}:inbox:{uuid.uuid4().hex}"
        event = make_event(validate_subject(subject), data, headers, reply_to=inbox)
        body = encode(event, self._limit)
        reply: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._inboxes[inbox] = reply
        try:
            async with self._lock:
                await self._command("subscribe", inbox)
            with self._client.errors(f"request to {subject}"):
                receivers = await self._client.redis.publish(self._channel(subject), body)
            if not receivers:
                # PUBLISH counts the subscribers it reached (patterns too):
                # nobody to answer, as NATS reports "no responders".
                raise TimeoutError(f"nobody answers requests on {subject!r}")
            try:
                async with asyncio.timeout(timeout):
                    return await reply
            except TimeoutError:
                raise TimeoutError(f"no reply on {subject!r} within {timeout:g}s") from None
        finally:
            self._inboxes.pop(inbox, None)
            if self._pubsub is not None and not self._closed:
                with contextlib.suppress(Exception):
                    await self._pubsub.unsubscribe(inbox)

    async def reply(
        self, request: Event, data: Any = None, *, headers: dict[str, str] | None = None
    ) -> None:
        self._check()
        if request.reply_to is None:
            raise ValueError("this event is not a request (no reply_to)")
        if not request.reply_to.startswith(f"{self._ns}:inbox:"):
            raise ValueError("reply_to is not an inbox of this namespace")
        event = Event(subject=request.subject, data=data, headers=check_headers(headers))
        with self._client.errors(f"replying to {request.subject}"):
            await self._client.redis.publish(request.reply_to, encode(event, self._limit))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        subs = [s for members in self._subs.values() for s in members]
        self._subs = {}
        joined, self._members = self._members, {}
        for member, sub in joined.items():
            assert sub.queue_group is not None
            with contextlib.suppress(Exception):
                await wait_within(
                    self._client.redis.zrem(
                        self._members_key(sub.queue_group, sub.pattern), member
                    ),
                    self._client.request_timeout,
                )
        for sub in subs:
            sub._closed = True
            sub.queue.put_nowait(_CLOSED)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await wait_within(self._pubsub.aclose(), self._client.request_timeout)


# -- log ---------------------------------------------------------------------
class _Record(_WireModel):
    """What a log entry carries (the position and time are the entry id's)."""

    data: Any = None
    key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


def _parse(position: str) -> tuple[int, int]:
    match = _POSITION.fullmatch(position)
    if match is None:
        raise ValueError(f"not a position of this log: {position!r}")
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms > _MAX_SEQ or seq > _MAX_SEQ:
        raise ValueError(f"not a position of this log: {position!r}")
    return ms, seq


def _before(ms: int, seq: int) -> str:
    """The id just before ``ms-seq`` (reads are exclusive of it)."""
    if seq > 0:
        return f"{ms}-{seq - 1}"
    if ms > 0:
        return f"{ms - 1}-{_MAX_SEQ}"
    return "0-0"


def _time_of(entry_id: str) -> datetime:
    return _EPOCH + timedelta(milliseconds=_parse(entry_id)[0])


def _millisecond_of(at: datetime) -> int:
    """The entry-id millisecond ``at`` falls in: entries of that millisecond
    count as at or after it (entry ids have millisecond precision)."""
    return (to_millisecond(at) - _EPOCH) // timedelta(milliseconds=1)


class _RedisReader(EventReader):
    def __init__(self, log_: RedisEventLog, stream: str, after: str, cursor: str | None) -> None:
        self._log = log_
        self.stream = stream
        self.cursor = cursor
        self._after = after  # the last event returned, or where the reader was placed
        self._buffer: deque[LogEvent] = deque()
        self._committed: str | None = None
        self._closed = False
        # A server restarting: the read retries, logged once per outage.
        self._outage = OutageLog(log, f"event log {stream}: read")
        # The blocking read in progress: a close cancels it (the read ends
        # at once, and its connection is dropped, not left blocked).
        self._reading: asyncio.Future[list[LogEvent]] | None = None

    async def __anext__(self) -> LogEvent:
        if self._closed:
            raise StopAsyncIteration
        await self.commit()
        backoff = 0.05
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            reading = self._reading = asyncio.ensure_future(
                self._log._read_after(self.stream, self._after)
            )
            try:
                events = await reading
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and (task is None or not task.cancelling()):
                    raise StopAsyncIteration from None  # the close cancelled the read
                raise
            except ClosedResourceError:
                # The log or its transport closed as this read began (before
                # the close reached this reader): the iteration ends, as it
                # does for a read the close cancels.
                raise StopAsyncIteration from None
            except TransientTransportError as exc:
                if self._closed:
                    raise StopAsyncIteration from None
                # Server restarting or unreachable: keep waiting (a caller's
                # ``next(timeout)`` bounds it).
                self._outage.failed(exc, "retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            self._outage.recovered()
            self._buffer.extend(events)
        if self._closed:
            raise StopAsyncIteration
        event = self._buffer.popleft()
        self._after = event.position
        self._holding = True
        return event

    async def seek(self, to: Start) -> None:
        if self._closed:
            raise ClosedResourceError("reader is closed")
        after = await self._log._after_for(self.stream, check_start(to))
        self._buffer.clear()
        self._after = after
        self._holding = False

    async def commit(self) -> None:
        # After the last event returned, or where the reader was placed
        # (``latest``, a seek) if it returned none since.
        if self.cursor is None or self._closed:
            return  # (a closed reader committed at its close)
        after = self._after
        if after != self._committed:
            await self._log._store_cursor(self.stream, self.cursor, after)
            self._committed = after
        self._holding = False

    async def aclose(self) -> None:
        if self._closed:
            return
        try:
            if self._final_commit_due():
                await self.commit()
        finally:
            self._closed = True
            self._log._readers.discard(self)
            reading = self._reading
            if reading is not None and not reading.done():
                reading.cancel()
                await asyncio.wait({reading}, timeout=1.0)


class RedisEventLog(EventLog):
    """Redis streams as event logs (see the module docstring)."""

    def __init__(self, ctx: RedisContext) -> None:
        self._ctx = ctx
        self._client = ctx.client
        self._ns = ctx.config.namespace
        self._limit = ctx.config.max_payload_bytes
        self._max_len = ctx.options.event_max_len
        self._readers: set[_RedisReader] = set()
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("event log is closed")
        self._ctx.check_open()
        self._client.check_open()

    def _key(self, stream: str) -> str:
        return keys.event_stream(self._ns, stream)

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
        record = _Record(data=data, key=key, headers=check_headers(headers))
        # The size limit applies to the event as readers receive it.
        encode(
            LogEvent(stream=stream, position="0-0", appended_at=utcnow(), **record.model_dump()),
            self._limit,
        )
        with self._client.errors(f"appending to {stream}"):
            entry = await self._client.redis.xadd(
                self._key(stream),
                {"event": encode(record)},
                maxlen=self._max_len or None,
                approximate=True,
            )
        return _text(entry)

    def _event(self, stream: str, entry: Any, fields: dict[bytes, bytes]) -> LogEvent:
        position = _text(entry)
        try:
            record = decode(_Record, fields.get(b"event", b""))
        except UndecodableMessageError as exc:
            log.warning("event log %s: position %s is not an event: %s", stream, position, exc)
            record = _Record(data=None, headers={})
        return LogEvent(
            stream=stream,
            position=position,
            data=record.data,
            key=record.key,
            headers=record.headers,
            appended_at=_time_of(position),
        )

    async def _read_after(self, stream: str, after: str) -> list[LogEvent]:
        """Events after position ``after`` (waits up to a second for one)."""
        self._check()
        with self._client.errors(f"reading {stream}"):
            reply = await self._client.redis.xread(
                {self._key(stream): after}, count=100, block=_BLOCK_MS
            )
        if not reply:
            return []
        return [self._event(stream, entry, fields) for entry, fields in reply[0][1]]

    async def _after_for(self, stream: str, start: Start) -> str:
        """The position a reader from ``start`` reads after."""
        if start == "earliest":
            return "0-0"
        if start == "latest":
            with self._client.errors(f"reading {stream}"):
                newest = await self._client.redis.xrevrange(self._key(stream), "+", "-", count=1)
            return _text(newest[0][0]) if newest else "0-0"
        if isinstance(start, datetime):
            return _before(_millisecond_of(start), 0)
        return _before(*_parse(start))

    def _cursors(self, stream: str) -> str:
        return keys.event_cursors(self._ns, stream)

    async def _store_cursor(self, stream: str, cursor: str, position: str) -> None:
        with self._client.errors(f"storing cursor {cursor} of {stream}"):
            await self._client.redis.hset(self._cursors(stream), cursor, position)

    async def _load_cursor(self, stream: str, cursor: str) -> str | None:
        with self._client.errors(f"loading cursor {cursor} of {stream}"):
            value = await self._client.redis.hget(self._cursors(stream), cursor)
        if value is None:
            return None
        text = _text(value)
        return text if _POSITION.fullmatch(text) else None

    async def read(
        self, stream: str, start: Start = "earliest", *, cursor: str | None = None
    ) -> EventReader:
        self._check()
        validate_name(stream, "stream name")
        start = check_start(start)
        stored = None
        if cursor is not None:
            validate_name(cursor, "cursor name")
            stored = await self._load_cursor(stream, cursor)
        after = stored if stored is not None else await self._after_for(stream, start)
        reader = _RedisReader(self, stream, after, cursor)
        if stored is not None:
            reader._committed = stored
        self._readers.add(reader)
        return reader

    async def aclose(self) -> None:
        if self._closed:
            return
        readers, self._readers = self._readers, set()
        for reader in readers:
            with contextlib.suppress(Exception):
                await reader.aclose()
        self._closed = True
