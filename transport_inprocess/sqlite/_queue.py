"""``SqliteRequestQueue``: a queue is the rows of ``messages`` with its
stored name, in ``seq`` order.

Leases are rows: a leased request carries a random token and an expiry in
``available_at``; once that passes, the row is simply eligible again, so a
crashed worker's requests come back without any cleanup process. An enqueue
is one INSERT (concurrent enqueues to one queue share a multi-row INSERT),
committed with the transport's ``synchronous`` level before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import sqlite3
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from transport import (
    DeadLetter,
    Delivery,
    QueueStats,
    RequestQueue,
    WorkRequest,
    decode,
    encode,
)
from transport.errors import (
    ClosedResourceError,
    TransportError,
    UndecodableMessageError,
)
from transport.kit import (
    ack_each,
    acked_or_raise,
    decode_request,
    derived_request_id,
    replace_fields,
    requeued,
    utcnow,
)
from transport.kit import seconds as _seconds
from transport_inprocess.sqlite._client import SqliteContext

__all__ = ["SqliteDelivery", "SqliteRequestQueue"]

_TOKEN_MASK = (1 << 62) - 1


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


# DELETE ... RETURNING needs SQLite 3.35 (2021); older libraries read the
# rows still held first (inside the same write transaction: no race).
_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)


def _delete_many(conn: sqlite3.Connection, items: list[tuple[int, int]]) -> list[bool]:
    """Acknowledge leased rows: True for each that was still leased by that
    token, once (a row acked twice in one call, or by a stale and a current
    delivery, takes effect for the one holding its token, the first such).
    A leasing round gives row ``id`` the token ``(base + id) mod 2**62``, so
    the rows of one round are deleted by one statement per 500 (``token =
    (base + id) & mask``), not one DELETE per row."""
    rounds: dict[int, list[int]] = {}
    for row_id, token in items:
        rounds.setdefault((token - row_id) & _TOKEN_MASK, []).append(row_id)
    deleted: set[tuple[int, int]] = set()
    for base, rows in rounds.items():
        for i in range(0, len(rows), 500):
            chunk = rows[i : i + 500]
            held = f"id IN ({', '.join('?' * len(chunk))}) AND token = (? + id) & ?"
            args = (*chunk, base, _TOKEN_MASK)
            if _RETURNING:
                cursor = conn.execute(
                    f"DELETE FROM messages WHERE {held} RETURNING id, token", args
                )
                deleted.update(cursor)
                continue
            found = conn.execute(f"SELECT id, token FROM messages WHERE {held}", args).fetchall()
            if found:
                ids = [row_id for row_id, _ in found]
                conn.execute(f"DELETE FROM messages WHERE id IN ({', '.join('?' * len(ids))})", ids)
                deleted.update(found)
    out: list[bool] = []
    for item in items:
        out.append(item in deleted)
        deleted.discard(item)
    return out


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


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
    def __init__(self, ctx: SqliteContext, name: str, *, lease_seconds: float, max_attempts: int):
        self.name = name
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_payload_bytes = ctx.max_payload_bytes
        self._ctx = ctx
        self._key = ctx.scoped(name)  # the queue's rows in this namespace
        self._store = ctx.store
        self._held: dict[int, int] = {}
        self._lease_waiters: list[tuple[int, asyncio.Future[list[SqliteDelivery]]]] = []
        self._leaser: asyncio.Task[None] | None = None
        self._had_work = False
        self._closed = False
        self._enqueue_key = ("enqueue", self._key)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"queue {self.name!r} is closed")
        self._ctx.check_open()

    async def _store_request(self, request: WorkRequest, body: bytes) -> None:
        # Concurrent enqueues to this queue become one INSERT of many rows.
        await self._store.submit_many(
            self._enqueue_key, _insert_many, (self._key, request.request_id, body)
        )
        self._ctx.signals.notify(self._key)

    async def _store_requests(self, requests: list[WorkRequest], bodies: list[bytes]) -> None:
        # enqueue_many: one INSERT of many rows, in one transaction (all or
        # nothing, in order).
        key = self._key
        items = [(key, r.request_id, b) for r, b in zip(requests, bodies, strict=True)]
        await self._store.write(functools.partial(_insert_many, items=items))
        self._ctx.signals.notify(key)

    def _lease_op(
        self,
        conn: sqlite3.Connection,
        limit: int,
        exhausted: list[tuple[WorkRequest, str]] | None = None,
    ) -> tuple[list[tuple[int, int, WorkRequest]], bool]:
        """Lease up to ``limit`` rows; with whether more were ready (one row
        more is read to tell: the next poll then leases straight away, or
        first asks with a read, which takes no write lock). The requests it
        dead-letters with their attempts used up go to ``exhausted``, with
        the reason (reported once the transaction committed)."""
        now = time.time()
        out: list[tuple[int, int, WorkRequest]] = []
        leased: list[int] = []
        until = now + self.lease_seconds
        more = False
        # One random draw per round: a row's token is (base + id) mod 2**62,
        # so two leases of one row get unrelated tokens.
        base = secrets.randbits(62)
        while len(out) < limit:
            wanted = limit - len(out)
            rows = conn.execute(
                "SELECT id, request_id, body, attempts, last_error FROM messages"
                " WHERE queue = ? AND available_at <= ? ORDER BY seq LIMIT ?",
                (self._key, now, wanted + 1),
            ).fetchall()
            if not rows:
                break
            more = len(rows) > wanted
            if more:
                del rows[wanted:]
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
                    if exhausted is not None:
                        with contextlib.suppress(UndecodableMessageError):
                            exhausted.append(
                                (
                                    decode_request(
                                        body, "sqlite", self._key, row_id, carried_id=request_id
                                    ),
                                    error,
                                )
                            )
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
        return out, more

    def _has_work_op(self, conn: sqlite3.Connection) -> bool:
        return (
            conn.execute(
                "SELECT 1 FROM messages WHERE queue = ? AND available_at <= ? LIMIT 1",
                (self._key, time.time()),
            ).fetchone()
            is not None
        )

    async def _try_lease(self, n: int = 1) -> list[SqliteDelivery]:
        # Concurrent polls of this handle are served by one leasing round:
        # one transaction leases up to ``n`` rows for each waiting poll (1
        # for a poll, ``n`` for a poll_many) and shares its commit, instead
        # of one transaction each. Each poll waits on one future.
        waiter: asyncio.Future[list[SqliteDelivery]] = asyncio.get_running_loop().create_future()
        self._lease_waiters.append((n, waiter))
        if self._leaser is None:
            self._leaser = asyncio.create_task(self._lease_rounds())
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Leased for us after all: give it back, never handed out.
                self._give_back([(d._row, d._token) for d in waiter.result()])
            else:
                waiter.cancel()
            raise

    async def _lease_rounds(self) -> None:
        try:
            while self._lease_waiters:
                waiters = [(n, w) for n, w in self._lease_waiters if not w.done()]
                self._lease_waiters.clear()
                if not waiters:
                    continue
                try:
                    leased: list[tuple[int, int, WorkRequest]] = []
                    more = False
                    # While the queue had work last round, lease straight away
                    # (the write shares its transaction with acks queued before
                    # it); otherwise check with a read first, so idle pollers
                    # do not take the file's write lock.
                    if self._had_work or await self._store.read(self._has_work_op):
                        # Not fsynced on its own (sync=False): a lease is
                        # bookkeeping, made durable by the next fsynced
                        # commit. A process crash keeps it (the write-ahead
                        # log is in the OS's cache); a power loss may forget
                        # the leases since the last fsync: those requests
                        # are delivered again, that delivery not counted.
                        exhausted: list[tuple[WorkRequest, str]] = []
                        leased, more = await self._store.write(
                            functools.partial(
                                self._lease_op,
                                limit=sum(n for n, _ in waiters),
                                exhausted=exhausted,
                            ),
                            sync=False,
                        )
                        for request, reason in exhausted:
                            self._report_exhausted(request, reason)
                    # Nothing more ready: the next poll asks with a read
                    # first instead of taking the write lock for nothing.
                    self._had_work = more
                except Exception as exc:
                    for _, w in waiters:
                        if not w.done():
                            w.set_exception(exc)
                    continue
                taken = 0
                for n, w in waiters:
                    if w.done():  # cancelled meanwhile: its share goes to the next
                        continue
                    share = leased[taken : taken + n]
                    taken += len(share)
                    deliveries = []
                    for row_id, token, request in share:
                        self._held[row_id] = token
                        deliveries.append(SqliteDelivery(request, self, row_id, token))
                    w.set_result(deliveries)
                if taken < len(leased):  # every poller gave up meanwhile
                    self._give_back([(row_id, token) for row_id, token, _ in leased[taken:]])
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
        got = await self._poll(1, timeout)
        return got[0] if got else None

    async def poll_many(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        """As :meth:`RequestQueue.poll_many`: up to ``max_count`` leased in
        one transaction (shared with the concurrent polls of this handle),
        waiting as :meth:`poll` while none is there."""
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        return list(await self._poll(max_count, timeout))

    async def _poll(self, n: int, timeout: float | None) -> list[SqliteDelivery]:
        self._check_open()
        timeout = _seconds(timeout)  # a negative timeout is refused, as for nack/extend
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        interval = 0.002
        while True:
            got = await self._try_lease(n)
            if got:
                return got
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return []
            wait = interval if remaining is None else min(interval, remaining)
            if await self._ctx.signals.wait(self._key, wait):
                # This process just wrote work to the queue: lease without
                # the has-work read first.
                self._had_work = True
            interval = min(interval * 2, self._ctx.poll_interval)
            self._check_open()

    async def ack_many(self, deliveries: Iterable[Delivery]) -> list[bool]:
        """As :meth:`RequestQueue.ack_many`: this handle's deliveries are
        deleted in one statement pair of one group-committed transaction (no
        task per delivery); others are acked by their own ``ack``."""
        items = list(deliveries)
        results: list[bool | BaseException] = [False] * len(items)
        mine: list[int] = []
        others: list[int] = []
        for i, delivery in enumerate(items):
            if isinstance(delivery, SqliteDelivery) and delivery._queue is self:
                mine.append(i)
            else:
                others.append(i)
        own: asyncio.Future[list[bool]] | None = None
        if mine:
            rows = [(items[i]._row, items[i]._token) for i in mine]  # type: ignore[attr-defined]
            for row_id, _ in rows:
                self._held.pop(row_id, None)
            try:
                own = self._store.submit(functools.partial(_delete_many, items=rows), write=True)
            except Exception as exc:  # closed: each of them fails as its ack() would
                for i in mine:
                    results[i] = exc
        if others:
            if own is not None:  # a cancelled call leaves it unawaited: retrieve its outcome
                own.add_done_callback(_retrieve)
            for i, result in zip(others, await ack_each(items[i] for i in others), strict=True):
                results[i] = result
        if own is not None:
            try:
                for i, result in zip(mine, await own, strict=True):
                    results[i] = result
            except Exception as exc:
                for i in mine:
                    results[i] = exc
        return acked_or_raise(results)

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
            self._ctx.signals.notify(self._key)
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
            self._ctx.signals.notify(self._key)
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
                        raw=None if request else bytes(body),
                        error=error,
                        attempts=attempts,
                        dead_lettered_at=datetime.fromtimestamp(dead_at, UTC),
                        dead_letter_id=str(dead_id),
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
                with contextlib.suppress(UndecodableMessageError):  # else moved as it is
                    request = decode_request(
                        body, "sqlite-dead", name, dead_id, carried_id=request_id
                    )
                    body = encode(requeued(request))
                conn.execute(
                    "INSERT INTO messages(queue, seq, request_id, body, available_at) VALUES (?, ?, ?, ?, 0)",
                    (name, _next_seq(conn, name), request_id, body),
                )
                conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_id,))
                moved += 1
            return moved

        moved = await self._store.write(op)
        if moved:
            self._ctx.signals.notify(self._key)
        return moved

    async def replace_dead_letter(self, dead_letter_id: str, request: WorkRequest) -> bool:
        self._check_open()
        if not dead_letter_id.isdigit():
            return False
        row_id, key = int(dead_letter_id), self._key
        stamped = request.enqueued_at or utcnow()
        fresh = requeued(replace_fields(request, enqueued_at=stamped))
        body = encode(fresh, self.max_payload_bytes)

        def op(conn: sqlite3.Connection) -> bool:
            # One transaction: the request is enqueued and the dead letter
            # removed together (stronger than enqueue-before-remove).
            found = conn.execute(
                "SELECT 1 FROM dead_letters WHERE id = ? AND queue = ?", (row_id, key)
            ).fetchone()
            if found is None:
                return False
            _insert_many(conn, [(key, fresh.request_id, body)])
            conn.execute("DELETE FROM dead_letters WHERE id = ?", (row_id,))
            return True

        moved = bool(await self._store.write(op))
        if moved:
            self._ctx.signals.notify(self._key)
        return moved

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._leaser is not None:  # let a leasing round finish so its rows are released below
            await asyncio.gather(self._leaser, return_exceptions=True)
        held, self._held = list(self._held.items()), {}
        if held and not self._ctx.store_closed:
            with contextlib.suppress(TransportError):
                await self._store.write(lambda conn: self._release_op(conn, held))
            self._ctx.signals.notify(self._key)
