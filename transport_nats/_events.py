"""Event bus on core NATS and event log on JetStream.

Bus: subject ``s`` is published as ``s`` (or ``<bus_prefix>.s`` with the
option ``bus_prefix``; subscriptions likewise, with NATS's own ``*``/``>``
wildcards and queue groups); at-most-once, no persistence; ``request`` is a
NATS request (no responders → TimeoutError). The body is an
:class:`~transport.Event`; a message another program published with any
other body is received as an event of that subject whose ``data`` is the
body (parsed JSON, else text) and whose headers are the message's valid ones.

Log: stream ``s`` is the JetStream stream ``<ns>__log__<s>`` (limits
retention, file storage, subject ``<ns>.log.<s>``); a position is the stream
sequence; ``appended_at`` is the server's timestamp. Readers fetch by
sequence (direct get) and wait for appends with a core subscription on the
stream's subject, re-checking every second, so a reader survives a server
restart without any consumer to re-create. Named cursors are stored in the
KV bucket ``<ns>__log_cursors`` (key ``<stream>.<cursor>``: next sequence).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue
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
    utcnow,
    validate_subject,
)
from transport.errors import (
    ClosedResourceError,
    InvalidNameError,
    TransientTransportError,
    UndecodableMessageError,
)
from transport.kit import (
    EventInbox,
    OutageLog,
    Start,
    check_headers,
    check_start,
    make_event,
    position_number,
    validate_name,
)
from transport.kit import WireModel as _WireModel
from transport_nats._client import NatsContext
from transport_nats._errors import map_nats_errors

__all__ = ["NatsEventBus", "NatsEventLog"]

log = logging.getLogger("transport.nats")

_CLOSED = object()
_RECHECK = 1.0  # seconds between re-checks of a waiting log reader


def _foreign_event(msg: Msg, subject: str) -> Event:
    """A message another program published: its body as ``data`` (JSON if it
    parses, else text), its valid headers.

    Raises: UndecodableMessageError if the body is neither.
    """
    try:
        data: Any = json.loads(msg.data) if msg.data else None
    except ValueError:
        try:
            data = msg.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UndecodableMessageError(f"a body that is neither JSON nor text: {exc}") from exc
    headers: dict[str, str] = {}
    for name, value in (msg.headers or {}).items():
        with contextlib.suppress(ValueError):
            headers.update(check_headers({name: value}))
    try:
        return Event(subject=subject, data=data, headers=headers)
    except ValueError as exc:
        raise UndecodableMessageError(str(exc)) from exc


class _NatsSubscription(Subscription):
    def __init__(
        self, pattern: str, queue_group: str | None, prefix: str, bus: NatsEventBus
    ) -> None:
        # The bus, held: it closes this subscription when the transport
        # closes, also when the program kept only the subscription
        # (``await transport.event_bus().subscribe(...)``).
        self._bus = bus
        self.pattern = pattern
        self.queue_group = queue_group
        self.prefix = prefix
        self.queue = EventInbox(f"subscription {pattern!r}")
        self.sub: Any = None
        self._closed = False

    async def on_msg(self, msg: Msg) -> None:
        subject = msg.subject[len(self.prefix) :]
        try:
            event = decode(Event, msg.data)
        except UndecodableMessageError:
            try:
                event = _foreign_event(msg, subject)
            except UndecodableMessageError as exc:
                log.warning("event bus: dropping an undecodable event on %s: %s", msg.subject, exc)
                return
        if msg.reply:
            event = event.model_copy(update={"reply_to": msg.reply})
        self.queue.put_nowait(event)

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
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
        self.queue.put_nowait(_CLOSED)


#: Second tokens of the library's own subjects on NATS (``<namespace>.q.<queue>``,
#: ``<namespace>.dlq.<queue>``, ``<namespace>.log.<stream>``): JetStream streams
#: capture every core publish on them, and a core subscription sees them.
_INTERNAL_KINDS = frozenset({"q", "dlq", "log"})


def _reaches_internal(wire: str) -> bool:
    """Whether the subject or pattern ``wire`` (as sent, prefix included)
    names the library's own subjects (second token ``q``, ``dlq`` or
    ``log``), or is a pattern that matches them in every namespace (``>``,
    ``*.>``, ``*.*.…``). A pattern starting with a literal token reaches at
    most the namespace of that name: a deliberate choice, not an accident
    (namespaces are no security boundary between clients of one server:
    NATS accounts and permissions are)."""
    tokens = wire.split(".")
    if tokens[0] == ">":
        return True
    if len(tokens) < 2:
        return False
    return tokens[1] in _INTERNAL_KINDS or (tokens[0] == "*" and tokens[1] in ("*", ">"))


def _bus_subject(prefix: str, subject: str, *, pattern: bool = False) -> str:
    """The subject as sent, refused if it can reach the library's own
    subjects: an event published there would land in a queue or an event
    log of any namespace (bypassing its checks), and a subscription would
    read the requests and events of every namespace on the server.

    Raises: InvalidNameError."""
    wire = prefix + validate_subject(subject, pattern=pattern)
    if _reaches_internal(wire):
        what = "subscription pattern" if pattern else "subject"
        raise InvalidNameError(
            what,
            subject,
            f"on NATS '{wire}' reaches the library's queue and event-log subjects "
            "('<namespace>.q|dlq|log.<name>'): use another second token, or a literal "
            "first one (such as 'agent.events.>')",
        )
    return wire


class NatsEventBus(EventBus):
    """Core NATS publish/subscribe (see the module docstring)."""

    def __init__(self, ctx: NatsContext) -> None:
        self._ctx = ctx
        bus_prefix = ctx.options.bus_prefix
        self._prefix = f"{bus_prefix}." if bus_prefix else ""
        self._limit = ctx.body_limit
        self._subs: list[_NatsSubscription] = []
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("event bus is closed")
        self._ctx.check_open()

    async def publish(
        self, subject: str, data: Any = None, *, headers: dict[str, str] | None = None
    ) -> None:
        self._check()
        wire = _bus_subject(self._prefix, subject)
        event = make_event(subject, data, headers)
        body = encode(event, self._limit)
        nc = self._ctx.nc
        if not nc.is_connected:
            # nats-py would buffer it while it reconnects and never raise:
            # lost without a word if the server comes back after the buffer
            # filled or the process ends, and an Outbox would take it as sent.
            raise TransientTransportError(
                f"publishing {subject}: not connected to the NATS server (reconnecting); "
                "the event was not sent"
            )
        with map_nats_errors(f"publishing {subject}"):
            await nc.publish(wire, body)

    async def subscribe(self, pattern: str, queue_group: str | None = None) -> Subscription:
        self._check()
        wire = _bus_subject(self._prefix, pattern, pattern=True)
        if queue_group is not None:
            validate_name(queue_group, "queue group")
        subscription = _NatsSubscription(pattern, queue_group, self._prefix, self)
        with map_nats_errors(f"subscribing to {pattern}"):
            subscription.sub = await self._ctx.nc.subscribe(
                wire, queue=queue_group or "", cb=subscription.on_msg
            )
            # Registered on the server before this returns: events published
            # afterwards by any client are seen.
            await self._ctx.round_trip(self._ctx.options.request_timeout)
        self._subs.append(subscription)
        return subscription

    async def request(
        self,
        subject: str,
        data: Any = None,
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> Event:
        self._check()
        wire = _bus_subject(self._prefix, subject)
        event = make_event(subject, data, headers)
        body = encode(event, self._limit)
        try:
            reply = await self._ctx.nc.request(wire, body, timeout=timeout)
        except nats.errors.NoRespondersError as exc:
            raise TimeoutError(f"nobody answers requests on {subject!r}") from exc
        except nats.errors.TimeoutError as exc:
            raise TimeoutError(f"no reply on {subject!r} within {timeout:g}s") from exc
        except nats.errors.Error as exc:
            with map_nats_errors(f"request to {subject}"):
                raise exc
        return decode(Event, reply.data)

    async def reply(
        self, request: Event, data: Any = None, *, headers: dict[str, str] | None = None
    ) -> None:
        self._check()
        if request.reply_to is None:
            raise ValueError("this event is not a request (no reply_to)")
        if not request.reply_to.startswith("_INBOX."):
            # A reply goes where the request says: any subject, a queue's
            # or an event log's of any namespace included, unless it is an
            # inbox (what NATS request/reply uses).
            raise ValueError(f"reply_to {request.reply_to!r} is not a NATS inbox (_INBOX.…)")
        event = Event(subject=request.subject, data=data, headers=check_headers(headers))
        with map_nats_errors(f"replying to {request.subject}"):
            await self._ctx.nc.publish(request.reply_to, encode(event, self._limit))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        subs, self._subs = self._subs, []
        for subscription in subs:
            await subscription.aclose()


class _Record(_WireModel):
    """What a log message carries (the position and time are the stream's)."""

    data: Any = None
    key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


class _NatsReader(EventReader):
    def __init__(self, log_: NatsEventLog, stream: str, next_seq: int, cursor: str | None) -> None:
        self._log = log_
        self.stream = stream
        self.cursor = cursor
        self._next = next_seq  # where the reader stands: what a commit stores
        self._committed: int | None = None
        self._wake = asyncio.Event()
        self._sub: Any = None
        self._closed = False
        # A server restarting: the read retries, logged once per outage.
        self._outage = OutageLog(log, f"event log {stream}: read")

    async def _start(self) -> None:
        async def on_append(_: Msg) -> None:
            self._wake.set()

        with map_nats_errors(f"watching {self.stream}"):
            self._sub = await self._log._ctx.nc.subscribe(
                self._log._subject(self.stream), cb=on_append
            )

    async def __anext__(self) -> LogEvent:
        if self._closed:
            raise StopAsyncIteration
        await self.commit()
        backoff = 0.05
        while True:
            if self._closed:
                raise StopAsyncIteration
            self._wake.clear()
            try:
                found = await self._log._get(self.stream, self._next)
            except ClosedResourceError:
                if self._closed:  # closed (with its transport) while reading
                    raise StopAsyncIteration from None
                raise
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
            if self._closed:  # closed while reading: the event comes again
                raise StopAsyncIteration
            if found is not None:
                seq, event = found
                self._next = seq + 1
                self._holding = True
                return event
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RECHECK):
                    await self._wake.wait()
            if self._closed:
                raise StopAsyncIteration

    async def seek(self, to: Start) -> None:
        if self._closed:
            raise ClosedResourceError(f"reader of {self.stream!r} is closed")
        self._next = await self._log._seq_for(self.stream, check_start(to))
        self._holding = False

    async def commit(self) -> None:
        # The position after the last event returned, or where the reader
        # was placed (``latest``, a seek) if it returned none since.
        if self.cursor is None or self._closed:
            return  # (a closed reader committed at its close)
        position = self._next
        if position != self._committed:
            await self._log._store_cursor(self.stream, self.cursor, position)
            self._committed = position
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
            self._wake.set()
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()


class NatsEventLog(EventLog):
    """JetStream streams as event logs (see the module docstring)."""

    def __init__(self, ctx: NatsContext) -> None:
        self._ctx = ctx
        self._ns = ctx.config.namespace
        self._limit = ctx.body_limit
        self._readers: set[_NatsReader] = set()
        self._cursors: KeyValue | None = None
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("event log is closed")
        self._ctx.check_open()

    def _stream(self, stream: str) -> str:
        return f"{self._ns}__log__{stream}"

    def _subject(self, stream: str) -> str:
        return f"{self._ns}.log.{stream}"

    async def _ensure(self, stream: str) -> None:
        await self._ctx.ensure_stream(
            StreamConfig(
                name=self._stream(stream),
                subjects=[self._subject(stream)],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=self._ctx.options.replicas,
                max_age=self._ctx.options.stream_max_age.get(
                    stream, self._ctx.options.event_max_age
                ),
            )
        )

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
            LogEvent(stream=stream, position="0", appended_at=utcnow(), **record.model_dump()),
            self._limit,
        )
        await self._ensure(stream)
        # Not into the reconnect buffer (appended after this call raised):
        # a short reconnect is waited out, a longer one raises.
        await self._ctx.wait_connected(f"appending to {stream}")
        with map_nats_errors(f"appending to {stream}"):
            ack = await self._ctx.js.publish(
                self._subject(stream),
                encode(record),
                timeout=self._ctx.options.request_timeout,
                stream=self._stream(stream),
            )
        return str(ack.seq)

    async def _get(self, stream: str, seq: int) -> tuple[int, LogEvent] | None:
        """The first event at or after ``seq``, or None."""
        with map_nats_errors(f"reading {stream}"):
            try:
                raw = await self._ctx.js.get_msg(
                    self._stream(stream), seq=max(seq, 1), subject=self._subject(stream), next=True
                )
            except nats.js.errors.NotFoundError:
                return None
        assert raw.seq is not None
        try:
            record = decode(_Record, raw.data or b"")
        except UndecodableMessageError as exc:
            log.warning("event log %s: position %d is not an event: %s", stream, raw.seq, exc)
            record = _Record(data=None, headers={})
        event = LogEvent(
            stream=stream,
            position=str(raw.seq),
            data=record.data,
            key=record.key,
            headers=record.headers,
            appended_at=raw.time or utcnow(),
        )
        return raw.seq, event

    async def _bounds(self, stream: str) -> tuple[int, int]:
        with map_nats_errors(f"reading {stream}"):
            info = await self._ctx.js.stream_info(self._stream(stream))
        return info.state.first_seq or 1, info.state.last_seq or 0

    async def _seq_for(self, stream: str, start: Start) -> int:
        await self._ensure(stream)
        if start == "earliest":
            return 1
        if start == "latest":
            return (await self._bounds(stream))[1] + 1
        if isinstance(start, datetime):
            # Binary search on the server timestamps (append order = time
            # order): the first sequence appended at or after ``start``.
            low, last = await self._bounds(stream)
            high = last + 1  # the answer is in [low, high]
            while low < high:
                mid = (low + high) // 2
                found = await self._get(stream, mid)
                if found is None or found[0] >= high:
                    high = mid  # nothing stored in [mid, high)
                elif found[1].appended_at >= start:
                    high = found[0]
                else:
                    low = found[0] + 1
            return low
        return max(position_number(start), 1)

    async def _cursor_bucket(self) -> KeyValue:
        if self._cursors is None:
            with map_nats_errors("opening the cursor bucket"):
                self._cursors = await self._ctx.js.create_key_value(
                    KeyValueConfig(
                        bucket=f"{self._ns}__log_cursors",
                        history=1,
                        storage=StorageType.FILE,
                        replicas=self._ctx.options.replicas,
                    )
                )
        return self._cursors

    async def _store_cursor(self, stream: str, cursor: str, position: int) -> None:
        bucket = await self._cursor_bucket()
        with map_nats_errors(f"storing cursor {cursor} of {stream}"):
            await bucket.put(f"{stream}.{cursor}", str(position).encode())

    async def _load_cursor(self, stream: str, cursor: str) -> int | None:
        bucket = await self._cursor_bucket()
        with map_nats_errors(f"loading cursor {cursor} of {stream}"):
            try:
                entry = await bucket.get(f"{stream}.{cursor}")
            except nats.js.errors.KeyNotFoundError:
                return None
        try:
            return int(entry.value or b"")
        except ValueError:
            return None

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
        next_seq = stored if stored is not None else await self._seq_for(stream, start)
        reader = _NatsReader(self, stream, next_seq, cursor)
        if stored is not None:
            reader._committed = stored
        await reader._start()
        self._readers.add(reader)
        return reader

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        readers, self._readers = self._readers, set()
        for reader in readers:
            with contextlib.suppress(Exception):
                await reader.aclose()
