"""Event bus and event log for ``memory://`` (per process, per broker name)."""

from __future__ import annotations

import asyncio
import bisect
import uuid
from datetime import datetime
from typing import Any

from transport import (
    Event,
    EventBus,
    EventLog,
    EventReader,
    LogEvent,
    Subscription,
    encode,
    subject_matches,
    validate_subject,
)
from transport.errors import ClosedResourceError
from transport.kit import (
    Start,
    check_headers,
    check_start,
    make_event,
    position_number,
    utcnow,
    validate_name,
)
from transport_inprocess.memory._client import BusState, LogState, _Inbox, _Sub

__all__ = ["MemoryEventBus", "MemoryEventLog"]

_CLOSED = object()


class _MemorySubscription(Subscription):
    def __init__(self, bus: MemoryEventBus, sub: _Sub) -> None:
        self._bus = bus
        self._sub = sub
        self.pattern = sub.pattern
        self.queue_group = sub.group
        self._closed = False

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        item = await self._sub.inbox.queue.get()
        if item is _CLOSED:
            raise StopAsyncIteration
        assert isinstance(item, Event)
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bus._remove(self._sub)
        self._sub.inbox.queue.put_nowait(_CLOSED)


class MemoryEventBus(EventBus):
    def __init__(self, state: BusState, limit: int) -> None:
        self._state = state
        self._limit = limit
        self._mine: list[_MemorySubscription] = []
        self._closed = False

    def _remove(self, sub: _Sub) -> None:
        with self._state.lock:
            if sub in self._state.subs:
                self._state.subs.remove(sub)

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("event bus is closed")

    def _deliver(self, event: Event) -> int:
        with self._state.lock:
            matching = [s for s in self._state.subs if subject_matches(s.pattern, event.subject)]
            turn = next(self._state.turn)
        chosen: list[_Sub] = [s for s in matching if s.group is None]
        groups: dict[str, list[_Sub]] = {}
        for s in matching:
            if s.group is not None:
                groups.setdefault(s.group, []).append(s)
        for members in groups.values():
            chosen.append(members[turn % len(members)])
        return sum(1 for s in chosen if s.inbox.put(event))

    async def publish(
        self, subject: str, data: Any = None, *, headers: dict[str, str] | None = None
    ) -> None:
        self._check()
        event = make_event(validate_subject(subject), data, headers)
        encode(event, self._limit)
        self._deliver(event)

    async def _subscribe(self, pattern: str, group: str | None) -> _MemorySubscription:
        sub = _Sub(pattern, group, _Inbox())
        with self._state.lock:
            self._state.subs.append(sub)
        subscription = _MemorySubscription(self, sub)
        self._mine.append(subscription)
        return subscription

    async def subscribe(self, pattern: str, queue_group: str | None = None) -> Subscription:
        self._check()
        validate_subject(pattern, pattern=True)
        if queue_group is not None:
            validate_name(queue_group, "queue group")
        return await self._subscribe(pattern, queue_group)

    async def request(
        self,
        subject: str,
        data: Any = None,
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> Event:
        self._check()
        validate_subject(subject)
        inbox = f"inbox.{uuid.uuid4().hex}"
        replies = await self._subscribe(inbox, None)
        try:
            event = make_event(subject, data, headers, reply_to=inbox)
            encode(event, self._limit)
            if not self._deliver(event):
                # As NATS reports "no responders": say so instead of waiting.
                raise TimeoutError(f"nobody answers requests on {subject!r}")
            try:
                async with asyncio.timeout(timeout):
                    return await replies.__anext__()
            except TimeoutError as exc:
                raise TimeoutError(f"no reply on {subject!r} within {timeout:g}s") from exc
        finally:
            await replies.aclose()

    async def reply(
        self, request: Event, data: Any = None, *, headers: dict[str, str] | None = None
    ) -> None:
        self._check()
        if request.reply_to is None:
            raise ValueError("this event is not a request (no reply_to)")
        event = make_event(request.reply_to, data, headers)
        encode(event, self._limit)
        self._deliver(event)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in self._mine:
            await subscription.aclose()


class _MemoryReader(EventReader):
    def __init__(
        self,
        log: MemoryEventLog,
        stream: str,
        index: int,
        cursor: str | None,
        stored: int | None = None,
    ) -> None:
        self._log = log
        self.stream = stream
        self.cursor = cursor
        self._next = index  # where the reader stands: what a commit stores
        self._committed: int | None = stored
        self._closed = False
        self._inbox: _Inbox | None = None  # set while a read waits for an append

    async def __anext__(self) -> LogEvent:
        if self._closed:
            raise StopAsyncIteration
        await self.commit()
        state = self._log._state
        while True:
            with state.lock:
                events = state.streams.get(self.stream, [])
                if self._next < len(events):
                    event = events[self._next]
                    self._next += 1
                    self._holding = True
                    return event
                inbox = self._inbox = _Inbox()
                state.waiters.setdefault(self.stream, []).append(inbox)
            try:
                await inbox.queue.get()
            finally:
                self._inbox = None
            if self._closed:
                raise StopAsyncIteration

    async def seek(self, to: Start) -> None:
        if self._closed:
            raise ClosedResourceError(f"reader of {self.stream!r} is closed")
        self._next = self._log._index_for(self.stream, check_start(to))
        self._holding = False

    async def commit(self) -> None:
        # The position after the last event returned, or where the reader
        # was placed (``latest``, a seek) if it returned none since.
        if self._closed:
            return  # committed by its close
        if self.cursor is not None and self._next != self._committed:
            with self._log._state.lock:
                self._log._state.cursors[(self.stream, self.cursor)] = self._next
            self._committed = self._next
        self._holding = False

    async def aclose(self) -> None:
        if not self._closed:
            if self._final_commit_due():
                await self.commit()
            self._closed = True
            self._log._readers.discard(self)
            inbox = self._inbox
            if inbox is not None:  # a read waiting for an append ends now
                inbox.put(None)


class MemoryEventLog(EventLog):
    def __init__(self, state: LogState, limit: int) -> None:
        self._state = state
        self._limit = limit
        self._closed = False
        self._readers: set[_MemoryReader] = set()

    async def append(
        self,
        stream: str,
        data: Any = None,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        if self._closed:
            raise ClosedResourceError("event log is closed")
        validate_name(stream, "stream name")
        with self._state.lock:
            events = self._state.streams.setdefault(stream, [])
            event = LogEvent(
                stream=stream,
                position=str(len(events)),
                data=data,
                key=key,
                headers=check_headers(headers),
                appended_at=max(utcnow(), events[-1].appended_at) if events else utcnow(),
            )
            encode(event, self._limit)
            events.append(event)
            for inbox in self._state.waiters.pop(stream, []):
                inbox.put(None)
        return event.position

    def _index_for(self, stream: str, start: Start) -> int:
        with self._state.lock:
            events = self._state.streams.get(stream, [])
            if start == "earliest":
                return 0
            if start == "latest":
                return len(events)
            if isinstance(start, datetime):
                return bisect.bisect_left([e.appended_at for e in events], start)
            return position_number(start)

    async def read(
        self, stream: str, start: Start = "earliest", *, cursor: str | None = None
    ) -> EventReader:
        if self._closed:
            raise ClosedResourceError("event log is closed")
        validate_name(stream, "stream name")
        if cursor is not None:
            validate_name(cursor, "cursor name")
            with self._state.lock:
                stored = self._state.cursors.get((stream, cursor))
            if stored is not None:
                reader = _MemoryReader(self, stream, stored, cursor, stored)
                self._readers.add(reader)
                return reader
        reader = _MemoryReader(self, stream, self._index_for(stream, check_start(start)), cursor)
        self._readers.add(reader)
        return reader

    async def aclose(self) -> None:
        """Close every reader (committing named cursors), then the log."""
        self._closed = True
        for reader in list(self._readers):
            await reader.aclose()
