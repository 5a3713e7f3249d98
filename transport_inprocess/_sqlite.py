"""``sqlite:///relative.db`` / ``sqlite:////abs/path.db`` — the embedded
default: durable single-node production, no server.

Feature matrix: persistent ✓ (an ``enqueue`` that returned survives
``kill -9`` and power loss with the default ``synchronous=FULL``), ordered ✓
(FIFO by enqueue; a nacked request goes to the back), consumer_groups ✓
(several processes on one machine share the file), native_delay ✓,
lease_extension ✓.

Options (URL query or ``TransportConfig.options``): ``synchronous``
(``FULL`` default, ``NORMAL``, ``OFF``: fsync policy of commits),
``poll_interval`` (seconds, default 0.05: how often an idle poller checks for
work written by *other* processes; this process's own writes wake it at once),
``busy_timeout_ms`` (30000).

Every stored name is ``<namespace>/<name>`` (``TransportConfig.namespace``):
clients of one file with different namespaces share nothing.

Leases are rows: a leased request carries a random token and an expiry in
``available_at``; once that passes, the row is simply eligible again, so a
crashed worker's requests come back without any cleanup process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from transport import (
    CAUGHT_UP,
    DeadLetter,
    Delivery,
    HealthStatus,
    KeyedChange,
    KeyedLog,
    QueueStats,
    RequestQueue,
    Transport,
    TransportCapabilities,
    TransportConfig,
    WorkRequest,
    decode,
)
from transport.errors import (
    ClosedResourceError,
    ConfigurationError,
    TransientTransportError,
    TransportError,
    UndecodableMessageError,
)
from transport.kit import (
    DoctorFinding,
    ProvisionPlan,
    SqliteStore,
    decode_request,
    derived_request_id,
    replace_fields,
)
from transport.kit import seconds as _seconds
from transport_inprocess._sqlite_events import EVENTS_SCHEMA, SqliteEventLog
from transport_inprocess._sqlite_schema import SCHEMA

__all__ = ["SqliteRequestQueue", "SqliteTransport", "open_sqlite", "sqlite_path"]

_CHANGE_RETENTION_S = 3600.0
_FEED_MAX_BEHIND = 256
_TOKEN_MASK = (1 << 62) - 1


class _Signals:
    """In-process wake-ups: a write by this transport wakes its own waiters
    at once; other processes' writes are noticed by polling."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[bool]]] = {}

    async def wait(self, name: str, timeout: float) -> bool:
        """Wait for a notification of ``name``: True if one came, False on timeout.

        The future is awaited directly, not through ``asyncio.wait_for``: on
        Python 3.11 ``wait_for`` returns the result instead of raising when a
        cancellation and a notification arrive in the same loop iteration, so
        a watch loop would lose the cancellation of ``asyncio.run``'s shutdown
        and keep the interpreter from exiting.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        waiters = self._waiters.setdefault(name, set())
        waiters.add(future)
        timer = loop.call_later(timeout, _settle, future, False)
        try:
            return await future
        finally:
            timer.cancel()
            waiters.discard(future)

    def notify(self, name: str) -> None:
        waiters = self._waiters.get(name)
        if waiters:
            for future in waiters:
                _settle(future, True)


def _settle(future: asyncio.Future[bool], notified: bool) -> None:
    if not future.done():
        future.set_result(notified)


def _dead(
    conn: sqlite3.Connection,
    queue: str,
    request_id: str | None,
    body: bytes,
    decodable: bool,
    error: str,
    attempts: int,
) -> None:
    conn.execute(
        "INSERT INTO dead_letters(queue, request_id, body, decodable, error, attempts, dead_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (queue, request_id, body, int(decodable), error, attempts, time.time()),
    )


def _next_seq(conn: sqlite3.Connection, queue: str) -> int:
    row = conn.execute("SELECT MAX(seq) FROM messages WHERE queue = ?", (queue,)).fetchone()
    return int(row[0] or 0) + 1


# Multi-row INSERTs: one statement step for many rows (executemany steps once
# per row). A few fixed sizes keep the statement cache small.
_INSERT_CHUNKS = (64, 16, 4, 1)
_INSERT_SQL = {
    size: "INSERT INTO messages(queue, seq, request_id, body, available_at) VALUES "
    + ", ".join(["(?, ?, ?, ?, 0.0)"] * size)
    for size in _INSERT_CHUNKS
}


def _insert_many(conn: sqlite3.Connection, items: list[tuple[str, str, bytes]]) -> list[None]:
    """Append requests (all to one queue) in this order."""
    name = items[0][0]
    seq = _next_seq(conn, name)
    start = 0
    while start < len(items):
        size = next(c for c in _INSERT_CHUNKS if c <= len(items) - start)
        params: list[Any] = []
        for i in range(start, start + size):
            _, rid, body = items[i]
            params += (name, seq + i, rid, body)
        conn.execute(_INSERT_SQL[size], params)
        start += size
    return [None] * len(items)


def _delete_many(conn: sqlite3.Connection, items: list[tuple[int, int]]) -> list[bool]:
    """Acknowledge leased rows: True for each that was still leased by that token."""
    return [
        conn.execute("DELETE FROM messages WHERE id = ? AND token = ?", item).rowcount == 1
        for item in items
    ]


def _decoded(body: bytes) -> WorkRequest | None:
    try:
        return decode(WorkRequest, body)
    except UndecodableMessageError:
        return None


def _decodable(body: bytes) -> bool:
    try:
        decode(WorkRequest, body)
    except UndecodableMessageError:
        return False
    return True


class SqliteDelivery(Delivery):
    __slots__ = ("_queue", "_row", "_token")

    def __init__(
        self, request: WorkRequest, queue: SqliteRequestQueue, row: int, token: int
    ) -> None:
        super().__init__(request)
        self._queue = queue
        self._row = row
        self._token = token

    async def ack(self) -> bool:
        return await self._queue._ack(self._row, self._token)

    async def nack(
        self, delay: float | timedelta | None = None, *, error: str | None = None
    ) -> bool:
        return await self._queue._nack(self._row, self._token, _seconds(delay) or 0.0, error, False)

    async def extend(self, seconds: float | timedelta | None = None) -> bool:
        return await self._queue._extend(self._row, self._token, _seconds(seconds))

    async def dead_letter(self, error: str) -> bool:
        return await self._queue._nack(self._row, self._token, 0.0, error, True)

    async def _release_uncounted(self) -> bool:
        return await self._queue._release_uncounted(self._row, self._token)


class SqliteRequestQueue(RequestQueue):
    def __init__(
        self, transport: SqliteTransport, name: str, *, lease_seconds: float, max_attempts: int
    ):
        self.name = name
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_payload_bytes = transport.config.max_payload_bytes
        self._t = transport
        self._key = transport._scoped(name)  # the queue's rows in this namespace
        self._store = transport._store
        self._held: dict[int, int] = {}
        self._lease_waiters: list[asyncio.Future[SqliteDelivery | None]] = []
        self._leaser: asyncio.Task[None] | None = None
        self._had_work = False
        self._closed = False
        self._enqueue_key = ("enqueue", self._key)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"queue {self.name!r} is closed")
        self._t._check_open()

    async def _store_request(self, request: WorkRequest, body: bytes) -> None:
        # Concurrent enqueues to this queue become one INSERT of many rows.
        await self._store.submit_many(
            self._enqueue_key, _insert_many, (self._key, request.request_id, body)
        )
        self._t._signals.notify(self._key)

    def _lease_op(self, conn: sqlite3.Connection, limit: int) -> list[tuple[int, int, WorkRequest]]:
        now = time.time()
        out: list[tuple[int, int, WorkRequest]] = []
        leased: list[int] = []
        until = now + self.lease_seconds
        # One random draw per round: a row's token is (base + id) mod 2**62,
        # so two leases of one row get unrelated tokens.
        base = secrets.randbits(62)
        while len(out) < limit:
            rows = conn.execute(
                "SELECT id, request_id, body, attempts, last_error FROM messages"
                " WHERE queue = ? AND available_at <= ? ORDER BY seq LIMIT ?",
                (self._key, now, limit - len(out)),
            ).fetchall()
            if not rows:
                break
            for row_id, request_id, body, attempts, last_error in rows:
                if attempts >= self.max_attempts:
                    error = (
                        last_error
                        or f"not acknowledged after {attempts} deliveries (lease expired)"
                    )
                    if request_id is None:  # a foreign body: the id its deliveries showed
                        request_id = derived_request_id("sqlite", self._key, row_id)
                    _dead(conn, self._key, request_id, body, _decodable(body), error, attempts)
                    conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                    continue
                try:
                    # The row's request_id column, if set, is the id of a body
                    # without one that was dead-lettered and requeued.
                    request = decode_request(
                        body, "sqlite", self._key, row_id, carried_id=request_id
                    )
                except UndecodableMessageError as exc:
                    _dead(conn, self._key, request_id, body, False, str(exc), attempts + 1)
                    conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                    continue
                token = (base + row_id) & _TOKEN_MASK
                leased.append(row_id)
                if request.attempt != attempts + 1:  # the row's count, never the body's
                    request = replace_fields(request, attempt=attempts + 1)
                out.append((row_id, token, request))
            # One statement per 500 rows (executemany steps once per row).
            for i in range(0, len(leased), 500):
                chunk = leased[i : i + 500]
                conn.execute(
                    "UPDATE messages SET available_at = ?, token = (? + id) & ?,"
                    f" attempts = attempts + 1 WHERE id IN ({', '.join('?' * len(chunk))})",
                    (until, base, _TOKEN_MASK, *chunk),
                )
            leased.clear()
        return out

    def _has_work_op(self, conn: sqlite3.Connection) -> bool:
        return (
            conn.execute(
                "SELECT 1 FROM messages WHERE queue = ? AND available_at <= ? LIMIT 1",
                (self._key, time.time()),
            ).fetchone()
            is not None
        )

    async def _try_lease(self) -> SqliteDelivery | None:
        # Concurrent polls of this handle are served by one leasing round:
        # one transaction leases a row for each waiting poller (and shares
        # its commit), instead of one transaction per poll.
        waiter: asyncio.Future[SqliteDelivery | None] = asyncio.get_running_loop().create_future()
        self._lease_waiters.append(waiter)
        if self._leaser is None:
            self._leaser = asyncio.create_task(self._lease_rounds())
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                orphan = waiter.result()
                if orphan is not None:  # leased for us after all: give it back
                    self._give_back([(orphan._row, orphan._token)])
            raise

    async def _lease_rounds(self) -> None:
        try:
            while self._lease_waiters:
                waiters = [w for w in self._lease_waiters if not w.done()]
                self._lease_waiters.clear()
                if not waiters:
                    continue
                try:
                    leased: list[tuple[int, int, WorkRequest]] = []
                    # While the queue had work last round, lease straight away
                    # (the write shares its transaction with acks queued before
                    # it); otherwise check with a read first, so idle pollers
                    # do not take the file's write lock.
                    if self._had_work or await self._store.read(self._has_work_op):
                        leased = await self._store.write(
                            functools.partial(self._lease_op, limit=len(waiters))
                        )
                    self._had_work = bool(leased)
                except Exception as exc:
                    for w in waiters:
                        if not w.done():
                            w.set_exception(exc)
                    continue
                for w in waiters:
                    if w.done():
                        continue
                    if leased:
                        row_id, token, request = leased.pop(0)
                        self._held[row_id] = token
                        w.set_result(SqliteDelivery(request, self, row_id, token))
                    else:
                        w.set_result(None)
                if leased:  # every poller gave up meanwhile
                    self._give_back([(row_id, token) for row_id, token, _ in leased])
        finally:
            self._leaser = None

    def _give_back(self, held: list[tuple[int, int]]) -> None:
        # Leased for polls that gave up: never handed out, so not counted.
        for row_id, _ in held:
            self._held.pop(row_id, None)
        with contextlib.suppress(TransportError, RuntimeError):
            self._store.submit(
                functools.partial(self._release_op, held=held, uncounted=True), write=True
            )

    async def poll(self, timeout: float | None = None) -> SqliteDelivery | None:
        self._check_open()
        timeout = _seconds(timeout)  # a negative timeout is refused, as for nack/extend
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        interval = 0.002
        while True:
            delivery = await self._try_lease()
            if delivery is not None:
                return delivery
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            wait = interval if remaining is None else min(interval, remaining)
            if await self._t._signals.wait(self._key, wait):
                # This process just wrote work to the queue: lease without
                # the has-work read first.
                self._had_work = True
            interval = min(interval * 2, self._t.poll_interval)
            self._check_open()

    async def _ack(self, row_id: int, token: int) -> bool:
        self._held.pop(row_id, None)
        result: bool = await self._store.submit_many("ack", _delete_many, (row_id, token))
        return result

    async def _nack(
        self, row_id: int, token: int, delay: float, error: str | None, dead: bool
    ) -> bool:
        self._held.pop(row_id, None)
        name, max_attempts = self._key, self.max_attempts

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT request_id, body, attempts, last_error FROM messages WHERE id = ? AND token = ?",
                (row_id, token),
            ).fetchone()
            if row is None:
                return False
            request_id, body, attempts, last_error = row
            reason = error or last_error
            if dead or attempts >= max_attempts:
                if request_id is None:  # a foreign body: the id its deliveries showed
                    request_id = derived_request_id("sqlite", name, row_id)
                _dead(
                    conn,
                    name,
                    request_id,
                    body,
                    True,
                    reason or f"nacked after {attempts} deliveries",
                    attempts,
                )
                conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                return True
            conn.execute(
                "UPDATE messages SET token = NULL, available_at = ?, last_error = ?, seq = ?"
                " WHERE id = ?",
                (time.time() + delay, reason, _next_seq(conn, name), row_id),
            )
            return True

        done = await self._store.write(op)
        if done and not delay:
            self._t._signals.notify(self._key)
        return done

    async def _extend(self, row_id: int, token: int, seconds: float | None) -> bool:
        until = time.time() + (seconds or self.lease_seconds)

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE messages SET available_at = ? WHERE id = ? AND token = ?",
                (until, row_id, token),
            )
            return cur.rowcount == 1

        return await self._store.write(op)

    async def _release_uncounted(self, row_id: int, token: int) -> bool:
        self._held.pop(row_id, None)

        def op(conn: sqlite3.Connection) -> bool:
            return self._release_op(conn, [(row_id, token)], uncounted=True) == 1

        done = await self._store.write(op)
        if done:
            self._t._signals.notify(self._key)
        return done

    @staticmethod
    def _release_op(
        conn: sqlite3.Connection, held: list[tuple[int, int]], *, uncounted: bool = False
    ) -> int:
        """Released requests keep their place (seq) and their attempt count,
        less this lease's if it was never handed out (``uncounted``).
        Returns how many were still held by these leases."""
        count = ", attempts = MAX(attempts - 1, 0)" if uncounted else ""
        cur = conn.executemany(
            f"UPDATE messages SET token = NULL, available_at = 0{count} WHERE id = ? AND token = ?",
            held,
        )
        return cur.rowcount

    async def stats(self) -> QueueStats:
        self._check_open()
        name, key = self.name, self._key

        def op(conn: sqlite3.Connection) -> QueueStats:
            now = time.time()
            total, in_flight, delayed = conn.execute(
                "SELECT COUNT(*),"
                " COALESCE(SUM(token IS NOT NULL AND available_at > ?), 0),"
                " COALESCE(SUM(token IS NULL AND available_at > ?), 0)"
                " FROM messages WHERE queue = ?",
                (now, now, key),
            ).fetchone()
            dead = conn.execute(
                "SELECT COUNT(*) FROM dead_letters WHERE queue = ?", (key,)
            ).fetchone()[0]
            # The next in line (the order leases take), read through the
            # (queue, seq) index: one row decoded, whatever the backlog.
            head = conn.execute(
                "SELECT body FROM messages WHERE queue = ? AND available_at <= ?"
                " ORDER BY seq LIMIT 1",
                (key, now),
            ).fetchone()
            request = None if head is None else _decoded(head[0])
            return QueueStats(
                queue=name,
                depth=total - in_flight,
                in_flight=in_flight,
                delayed=delayed,
                dead_lettered=dead,
                head_enqueued_at=None if request is None else request.enqueued_at,
            )

        return await self._store.read(op)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        self._check_open()
        name, key = self.name, self._key

        def op(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows = conn.execute(
                "SELECT id, request_id, body, decodable, error, attempts, dead_at FROM dead_letters"
                " WHERE queue = ? ORDER BY id LIMIT ?",
                (key, limit),
            ).fetchall()
            out = []
            for dead_id, request_id, body, decodable, error, attempts, dead_at in rows:
                request = None
                if decodable:
                    with contextlib.suppress(UndecodableMessageError):
                        request = decode_request(
                            body, "sqlite-dead", key, dead_id, carried_id=request_id
                        )
                out.append(
                    DeadLetter(
                        queue=name,
                        request_id=request_id,
                        request=request,
                        raw=None if request else bytes(body).decode("utf-8", "replace"),
                        error=error,
                        attempts=attempts,
                        dead_lettered_at=datetime.fromtimestamp(dead_at, UTC),
                    )
                )
            return out

        return await self._store.read(op)

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        self._check_open()
        name = self._key
        wanted = None if request_ids is None else set(request_ids)

        def op(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT id, request_id, body FROM dead_letters WHERE queue = ? AND decodable = 1 ORDER BY id",
                (name,),
            ).fetchall()
            moved = 0
            for dead_id, request_id, body in rows:
                if wanted is not None and request_id not in wanted:
                    continue
                conn.execute(
                    "INSERT INTO messages(queue, seq, request_id, body, available_at) VALUES (?, ?, ?, ?, 0)",
                    (name, _next_seq(conn, name), request_id, body),
                )
                conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_id,))
                moved += 1
            return moved

        moved = await self._store.write(op)
        if moved:
            self._t._signals.notify(self._key)
        return moved

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._leaser is not None:  # let a leasing round finish so its rows are released below
            await asyncio.gather(self._leaser, return_exceptions=True)
        held, self._held = list(self._held.items()), {}
        if held and not self._t._store_closed:
            with contextlib.suppress(TransportError):
                await self._store.write(lambda conn: self._release_op(conn, held))
            self._t._signals.notify(self._key)


class _Feed:
    """Changes of one keyed log read inside the transaction of this
    process's latest write to it, for this process's watchers: every change
    of the log with ``after < seq <= upto`` (complete, because the writing
    transaction held the file's write lock), so a watcher positioned at or
    after ``after`` needs no read of its own."""

    __slots__ = ("after", "rows", "upto", "writes")

    def __init__(self, after: int, upto: int, rows: list[tuple[int, str, bytes | None]]) -> None:
        self.after = after
        self.upto = upto
        self.rows = rows
        self.writes = 0  # the log's write count when published


class _LogWatchers:
    """This transport's watchers of one keyed log: their positions, and the
    latest feed."""

    __slots__ = ("feed", "positions", "writes")

    def __init__(self) -> None:
        self.positions: dict[object, int] = {}
        self.feed: _Feed | None = None
        self.writes = 0  # committed writes to the log by this transport


class SqliteKeyedLog(KeyedLog):
    """A table (current state) plus a change log that watchers tail."""

    def __init__(self, transport: SqliteTransport, name: str) -> None:
        self._t = transport
        self._store = transport._store
        self._name = name
        self._watchers = transport._log_watchers.setdefault(name, _LogWatchers())

    async def put(self, key: str, value: bytes) -> None:
        self._publish(await self._store.write(lambda conn: self._put_op(conn, key, value)))

    def _publish(self, feed: _Feed | None) -> None:
        # After the commit: a feed built by a transaction that did not commit
        # is never shown.
        watchers = self._watchers
        watchers.writes += 1
        if feed is not None:
            feed.writes = watchers.writes
            watchers.feed = feed
        self._t._signals.notify(f"kv:{self._name}")

    def _put_op(self, conn: sqlite3.Connection, key: str, value: bytes | None) -> _Feed | None:
        now = time.time()
        if value is None:
            cur = conn.execute("DELETE FROM kv WHERE log = ? AND key = ?", (self._name, key))
            if cur.rowcount == 0:
                return None
        else:
            conn.execute(
                "INSERT OR REPLACE INTO kv(log, key, value) VALUES (?, ?, ?)",
                (self._name, key, value),
            )
        seq = conn.execute(
            "INSERT INTO kv_changes(log, key, value, at) VALUES (?, ?, ?, ?)",
            (self._name, key, value, now),
        ).lastrowid
        if seq is not None and seq % 512 == 0:
            conn.execute("DELETE FROM kv_changes WHERE at < ?", (now - _CHANGE_RETENTION_S,))
        positions = self._watchers.positions
        if seq is None or not positions:
            return None
        # Hand this process's watchers the changes they have not seen, so they
        # need not read them back after the commit (only when they are close
        # behind: a lagging watcher reads its changes itself).
        try:
            after = min(positions.values())
        except (RuntimeError, ValueError):  # a watcher came or went meanwhile
            return None
        if seq - after > _FEED_MAX_BEHIND:
            return None
        try:
            rows = self._changes_op(conn, after)
        except TransientTransportError:  # pruned: the watchers re-snapshot
            return None
        if not rows or rows[-1][0] != seq:  # not complete up to this change
            return None
        return _Feed(after, seq, rows)

    async def delete(self, key: str) -> None:
        self._publish(await self._store.write(lambda conn: self._put_op(conn, key, None)))

    async def get(self, key: str) -> bytes | None:
        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT value FROM kv WHERE log = ? AND key = ?", (self._name, key)
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._store.read(op)

    def _snapshot_op(self, conn: sqlite3.Connection) -> tuple[list[tuple[str, bytes]], int]:
        conn.execute("BEGIN")
        try:
            rows = conn.execute("SELECT key, value FROM kv WHERE log = ?", (self._name,)).fetchall()
            last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM kv_changes").fetchone()[0]
        finally:
            conn.execute("COMMIT")
        return [(k, bytes(v)) for k, v in rows], int(last)

    def _changes_op(
        self, conn: sqlite3.Connection, after: int
    ) -> list[tuple[int, str, bytes | None]]:
        lowest = conn.execute("SELECT MIN(seq) FROM kv_changes").fetchone()[0]
        if lowest is not None and lowest > after + 1 and after > 0:
            # Rows after our position were pruned: we may have missed changes.
            first_ours = conn.execute(
                "SELECT 1 FROM kv_changes WHERE seq <= ? LIMIT 1", (after,)
            ).fetchone()
            if first_ours is None:
                raise TransientTransportError("change log pruned past this watcher; re-snapshot")
        rows = conn.execute(
            "SELECT seq, key, value FROM kv_changes WHERE log = ? AND seq > ? ORDER BY seq LIMIT 1000",
            (self._name, after),
        ).fetchall()
        return [(s, k, None if v is None else bytes(v)) for s, k, v in rows]

    async def watch(self) -> AsyncIterator[KeyedChange | object]:
        rows, last = await self._store.read(self._snapshot_op)
        for key, value in rows:
            yield KeyedChange(key, value)
        yield CAUGHT_UP
        interval = 0.002
        signal = f"kv:{self._name}"
        me = object()
        positions = self._watchers.positions
        positions[me] = last
        fed = -1  # up to date as of this process's write number ``fed`` to the log
        try:
            while True:
                feed = self._watchers.feed
                if feed is not None and feed.after <= last < feed.upto:
                    # This process wrote the latest change: its transaction
                    # already read what this watcher has not seen.
                    changes = [row for row in feed.rows if row[0] > last]
                    upto, fed = feed.upto, feed.writes
                elif fed == self._watchers.writes:  # no local write since: wait
                    changes, upto, fed = [], last, -1
                else:
                    changes = await self._store.read(
                        functools.partial(self._changes_op, after=last)
                    )
                    upto = changes[-1][0] if changes else last
                for _seq, key, change in changes:
                    yield KeyedChange(key, change)
                if upto > last:
                    last = positions[me] = upto
                    interval = 0.002
                    continue
                await self._t._signals.wait(signal, interval)
                interval = min(interval * 2, self._t.poll_interval)
        finally:
            positions.pop(me, None)

    async def aclose(self) -> None:
        return None


def sqlite_path(url: str) -> tuple[str, dict[str, str]]:
    """Split ``sqlite:///rel.db?synchronous=NORMAL`` into path and options
    (SQLAlchemy's convention: three slashes relative, four absolute).

    Raises: ConfigurationError.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not an sqlite URL: {url!r}")
    if parts.netloc:
        raise ConfigurationError(
            f"sqlite URL {url!r} has a host part; use sqlite:///relative.db or sqlite:////abs/path.db"
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path:
        raise ConfigurationError("sqlite URL needs a file path, e.g. sqlite:///transport.db")
    return path, dict(parse_qsl(parts.query))


_SCOPED_COLUMNS = (
    ("messages", "queue"),
    ("dead_letters", "queue"),
    ("kv", "log"),
    ("kv_changes", "log"),
    ("events", "stream"),
    ("event_cursors", "stream"),
)


def _adopt_unscoped(conn: sqlite3.Connection) -> None:
    """Once per file: rows written before names were stored per namespace
    (``user_version`` 0) move to the default namespace."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= 1:
        return
    prefix = f"{TransportConfig.model_fields['namespace'].default}/"
    for table, column in _SCOPED_COLUMNS:
        conn.execute(
            f"UPDATE {table} SET {column} = ? || {column} WHERE instr({column}, '/') = 0",
            (prefix,),
        )
    conn.execute("PRAGMA user_version = 1")


class SqliteTransport(Transport):
    backend = "sqlite"
    capabilities = TransportCapabilities(
        persistent=True,
        ordered=True,
        consumer_groups=True,
        native_delay=True,
        lease_extension=True,
        restart_broker=True,
        event_log=True,
    )

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        path, query = sqlite_path(config.url)
        options: dict[str, Any] = {**config.options, **query}
        unknown = set(options) - {"synchronous", "poll_interval", "busy_timeout_ms"}
        if unknown:
            raise ConfigurationError(f"unknown sqlite option(s): {', '.join(sorted(unknown))}")
        try:
            self.poll_interval = float(options.get("poll_interval", 0.05))
            busy = int(options.get("busy_timeout_ms", 30_000))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"bad sqlite option: {exc}") from exc
        if self.poll_interval <= 0:
            raise ConfigurationError("poll_interval must be positive")
        self.path = path
        self._store = SqliteStore(
            path,
            synchronous=str(options.get("synchronous", "FULL")),
            busy_timeout_ms=busy,
            schema=SCHEMA + EVENTS_SCHEMA,
        )
        self._signals = _Signals()
        self._log_watchers: dict[str, _LogWatchers] = {}
        self._store_closed = False
        # Every queue, dead letter, keyed log and event stream is stored under
        # ``<namespace>/<name>`` (``/`` cannot occur in a name), so clients of
        # one file with different namespaces share nothing.
        self._prefix = f"{config.namespace}/"

    def _scoped(self, name: str) -> str:
        """The stored name of queue, log or stream ``name`` in this namespace."""
        return self._prefix + name

    async def _start(self) -> None:
        await self._store.open()
        await self._store.write(_adopt_unscoped)

    def _open_queue(
        self, name: str, *, lease_seconds: float, max_attempts: int
    ) -> SqliteRequestQueue:
        return SqliteRequestQueue(
            self, name, lease_seconds=lease_seconds, max_attempts=max_attempts
        )

    def _open_keyed_log(self, kind: str, name: str) -> SqliteKeyedLog:
        return SqliteKeyedLog(self, self._scoped(f"{kind}:{name}"))

    def _open_event_log(self) -> SqliteEventLog:
        return SqliteEventLog(self)

    async def _doctor(self, plan: ProvisionPlan | None) -> list[DoctorFinding]:
        from transport_inprocess._doctor import sqlite_doctor

        return await sqlite_doctor(self._store, self.path)

    async def health(self) -> HealthStatus:
        start = time.perf_counter()
        try:
            await self._store.read(lambda conn: conn.execute("SELECT 1").fetchone())
        except (TransportError, RuntimeError) as exc:
            return HealthStatus(ok=False, backend="sqlite", detail=f"{self.path}: {exc}")
        return HealthStatus(
            ok=True,
            backend="sqlite",
            detail=f"{self.path} (synchronous={self._store.synchronous})",
            latency_ms=(time.perf_counter() - start) * 1000,
        )

    async def _close_backend(self) -> None:
        self._store_closed = True
        await self._store.aclose()


async def open_sqlite(config: TransportConfig) -> SqliteTransport:
    """Entry point for ``sqlite://``."""
    transport = SqliteTransport(config)
    await transport._start()
    return transport
