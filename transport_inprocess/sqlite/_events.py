"""Event log for ``sqlite://``: one table of events, one of named cursors.

Positions are the events' row ids (decimal strings): increasing within a
stream, usable across processes sharing the file. Readers tail the table;
appends by the same transport wake them at once, appends by other processes
are noticed within ``poll_interval``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
from collections import deque
from datetime import UTC, datetime
from typing import Any

from transport import EventLog, EventReader, LogEvent, encode
from transport.errors import ClosedResourceError, TransportError
from transport.kit import Start, check_headers, check_start, position_number, utcnow, validate_name
from transport_inprocess.sqlite._client import SqliteContext

__all__ = ["SqliteEventLog"]


def _row_event(stream: str, row: tuple[int, bytes]) -> LogEvent:
    row_id, body = row
    fields = json.loads(body)
    return LogEvent.model_validate({**fields, "stream": stream, "position": str(row_id)})


def _fetch(conn: sqlite3.Connection, stream: str, after: int) -> list[tuple[int, bytes]]:
    return conn.execute(
        "SELECT id, body FROM events WHERE stream = ? AND id >= ? ORDER BY id LIMIT 256",
        (stream, after),
    ).fetchall()


class _SqliteReader(EventReader):
    def __init__(
        self,
        log: SqliteEventLog,
        stream: str,
        next_id: int,
        cursor: str | None,
        stored: int | None = None,
    ) -> None:
        self._log = log
        self.stream = stream
        self.cursor = cursor
        self._next = next_id
        self._key = log._ctx.scoped(stream)  # the stream's rows in this namespace
        self._buffer: deque[LogEvent] = deque()
        self._committed: int | None = stored  # the position the cursor holds
        self._closed = False

    async def __anext__(self) -> LogEvent:
        if self._closed:
            raise StopAsyncIteration
        await self.commit()
        interval = 0.002
        ctx = self._log._ctx
        while not self._buffer:
            try:
                rows = await ctx.store.read(
                    functools.partial(_fetch, stream=self._key, after=self._next)
                )
            except ClosedResourceError:
                if self._closed:  # closed (with its transport) while reading
                    raise StopAsyncIteration from None
                raise
            if self._closed:  # closed while reading: what was read comes again
                raise StopAsyncIteration
            for row in rows:
                self._buffer.append(_row_event(self.stream, row))
            if rows:
                self._next = rows[-1][0] + 1
                break
            await ctx.signals.wait(f"events:{self._key}", interval)
            interval = min(interval * 2, ctx.poll_interval)
            if self._closed:
                raise StopAsyncIteration
        event = self._buffer.popleft()
        self._holding = True
        return event

    async def seek(self, to: Start) -> None:
        if self._closed:
            raise ClosedResourceError(f"reader of {self.stream!r} is closed")
        # Resolved first: a start refused (or a failed read) leaves the
        # reader, its buffer and what it commits, as they were.
        start = await self._log._resolve(self._key, check_start(to))
        self._buffer.clear()
        self._next = start
        self._holding = False

    async def commit(self) -> None:
        if self.cursor is None or self._closed:
            return  # a closed reader committed at its close
        # The position after the last event returned, or where the reader
        # was placed (``latest``, a seek) if it returned none since.
        position = int(self._buffer[0].position) if self._buffer else self._next
        if position == self._committed:
            self._holding = False
            return
        stream, name = self._key, self.cursor
        await self._log._ctx.store.write(
            lambda conn: (
                conn.execute(
                    "INSERT INTO event_cursors(stream, name, position) VALUES (?, ?, ?)"
                    " ON CONFLICT(stream, name) DO UPDATE SET position = excluded.position",
                    (stream, name, position),
                )
                and None
            )
        )
        self._committed = position
        self._holding = False

    async def aclose(self) -> None:
        if not self._closed:
            try:
                if self._final_commit_due():
                    await self.commit()
            finally:
                self._closed = True
                self._log._readers.discard(self)


class SqliteEventLog(EventLog):
    def __init__(self, ctx: SqliteContext) -> None:
        self._ctx = ctx
        self._closed = False
        self._readers: set[_SqliteReader] = set()

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("event log is closed")

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
        now = utcnow()
        event = LogEvent(
            stream=stream,
            position="0",
            data=data,
            key=key,
            headers=check_headers(headers),
            appended_at=now,
        )
        body = encode(event, self._ctx.max_payload_bytes)
        stamp = now.timestamp()
        scoped = self._ctx.scoped(stream)

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO events(stream, key, body, appended_at) VALUES (?, ?, ?, ?)",
                (scoped, key, body, stamp),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

        row_id = await self._ctx.store.write(op)
        self._ctx.signals.notify(f"events:{scoped}")
        return str(row_id)

    async def _resolve(self, stream: str, start: Start) -> int:
        """The row id to read from; ``stream`` is the scoped (stored) name."""
        if isinstance(start, datetime):
            stamp = start.astimezone(UTC).timestamp()

            def at_time(conn: sqlite3.Connection) -> int:
                row = conn.execute(
                    "SELECT MIN(id) FROM events WHERE stream = ? AND appended_at >= ?",
                    (stream, stamp),
                ).fetchone()
                if row[0] is not None:
                    return int(row[0])
                return int(
                    conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM events").fetchone()[0]
                )

            return await self._ctx.store.read(at_time)
        if start == "earliest":
            return 0
        if start == "latest":
            return await self._ctx.store.read(
                lambda conn: int(
                    conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM events").fetchone()[0]
                )
            )
        return position_number(start)

    async def read(
        self, stream: str, start: Start = "earliest", *, cursor: str | None = None
    ) -> EventReader:
        self._check()
        validate_name(stream, "stream name")
        scoped = self._ctx.scoped(stream)
        if cursor is not None:
            validate_name(cursor, "cursor name")
            stored = await self._ctx.store.read(
                lambda conn: conn.execute(
                    "SELECT position FROM event_cursors WHERE stream = ? AND name = ?",
                    (scoped, cursor),
                ).fetchone()
            )
            if stored is not None:
                reader = _SqliteReader(self, stream, int(stored[0]), cursor, int(stored[0]))
                self._readers.add(reader)
                return reader
        start_id = await self._resolve(scoped, check_start(start))
        reader = _SqliteReader(self, stream, start_id, cursor)
        self._readers.add(reader)
        return reader

    async def aclose(self) -> None:
        """Close every reader (committing named cursors where the file can
        still be written), then the log."""
        self._closed = True
        for reader in list(self._readers):
            with contextlib.suppress(TransportError):
                await reader.aclose()
