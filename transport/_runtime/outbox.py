"""An SQLite disk queue in front of every publish for when the broker is down.

``Outbox.enqueue`` returns once the request is committed to a local file; a
background drainer sends requests to the transport strictly in FIFO order.
``Outbox.append`` does the same for event-log appends and (opt-in, by
calling it instead of the bus) ``Outbox.publish`` for event-bus publishes:
one line, in the order things were stored, so FIFO per queue, per stream
and per subject.
A request stored with ``register=True`` (a :class:`~transport.Network` that
could not reach the broker to register the caller's pending record) has its
delivery record registered by the drainer first, then is sent.
A transient failure (broker unreachable, timeout) is retried with backoff,
forever, holding the line — an outage alone never dead-letters anything.
Only definitive (permanent) failures count toward ``max_attempts`` (3), after
which the request moves to the outbox's dead-letter table and the line moves
on (events and publishes alike: :meth:`Outbox.dead_events`). A request whose
enqueue timed out may be sent twice (at-least-once). The drainer reads the
head of the line :data:`DRAIN_BATCH` rows at a time and sends them one after
the other, each once the one before it was accepted; the rows sent are
deleted from the file in one write when the batch ends, at its first failure,
or when the outbox is closed (a clean close sends nothing twice), so a
process killed meanwhile sends up to ``DRAIN_BATCH`` requests again on its
next start (at-least-once; one write per row before). Dead letters stay in the
file until they are requeued (:meth:`OutboxFile.requeue_dead`, or
``transport outbox FILE requeue``), which puts them at the end of the line.

One outbox drains a file at a time: the drainer holds an exclusive lock on
``<file>.drain-lock`` (``flock``; released by a close and by the system when
the process ends, ``kill -9`` included). Another :class:`Outbox` on the same
file, in this process or another (a second replica, a restart overlapping
the old process), stores requests in it as usual and stands by, trying the
lock every :data:`IDLE_CHECK_INTERVAL` seconds, and takes over draining when
the holder stops. Two drainers would send every row twice and out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from tenacity import RetryCallState, wait_exponential_jitter
from tenacity.wait import wait_base

from transport._runtime.sqlitestore import SqliteStore
from transport._spi.codec import decode, encode
from transport._spi.events import EventBus, EventLog, check_headers, validate_subject
from transport._spi.models import WorkRequest, _WireModel, replace_fields, utcnow
from transport._spi.naming import validate_name
from transport._spi.outage import OutageLog
from transport._spi.priority import PriorityRequestQueue
from transport._spi.queue import RequestQueue
from transport._spi.registries import DeliveryRegistry
from transport._spi.transport import Transport
from transport.errors import (
    ClosedResourceError,
    PermanentTransportError,
    TransientTransportError,
    UnsupportedFeatureError,
)

try:
    import fcntl
except ImportError:  # not POSIX: one outbox per file is then the deployment's to ensure
    fcntl = None  # type: ignore[assignment]

__all__ = ["Outbox", "OutboxDeadEvent", "OutboxDeadLetter", "OutboxFile"]

log = logging.getLogger("transport.outbox")

#: Seconds between two looks at the file while the line is empty, so that
#: rows requeued by another process (``transport outbox FILE requeue``) go out.
IDLE_CHECK_INTERVAL = 1.0
#: Rows the drainer reads from the head of the line at a time. They are sent
#: one after the other as before; those sent are deleted in one write (a
#: process killed meanwhile sends them again: at most this many duplicates).
DRAIN_BATCH = 64

Kind = Literal["request", "event", "publish"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL, levels INTEGER NOT NULL, body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, created_at REAL NOT NULL,
    register INTEGER NOT NULL DEFAULT 0, kind TEXT NOT NULL DEFAULT 'request'
);
CREATE TABLE IF NOT EXISTS outbox_dead (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL, body BLOB NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL,
    dead_at REAL NOT NULL, kind TEXT NOT NULL DEFAULT 'request', levels INTEGER NOT NULL DEFAULT 1
);
"""


class _Stored(_WireModel):
    """What the outbox keeps of an event-log append or a bus publish."""

    data: Any = None
    key: str | None = None
    headers: dict[str, str] = {}


class OutboxDeadEvent(tuple[str, str, _Stored, str, int]):
    """(kind, target, event, error, attempts) of an event-log append
    (kind ``"event"``, target: the stream) or a bus publish (``"publish"``,
    target: the subject) the outbox gave up on."""

    @property
    def kind(self) -> str:
        """``"event"`` or ``"publish"``."""
        return self[0]

    @property
    def target(self) -> str:
        """The stream or subject it was stored for."""
        return self[1]

    @property
    def data(self) -> Any:
        """The event's data."""
        return self[2].data

    @property
    def key(self) -> str | None:
        """The event's key (event-log appends)."""
        return self[2].key

    @property
    def headers(self) -> dict[str, str]:
        """The event's headers."""
        return self[2].headers

    @property
    def error(self) -> str:
        """The last definitive (permanent) failure."""
        return self[3]

    @property
    def attempts(self) -> int:
        """Definitive failures counted before the outbox gave up."""
        return self[4]


class OutboxDeadLetter(tuple[str, WorkRequest, str, int]):
    """(queue, request, error, attempts) of a request the outbox gave up on."""

    @property
    def queue(self) -> str:
        """The destination queue the request was stored for."""
        return self[0]

    @property
    def request(self) -> WorkRequest:
        """The request as it was stored (``enqueued_at`` stamped)."""
        return self[1]

    @property
    def error(self) -> str:
        """The last definitive (permanent) failure."""
        return self[2]

    @property
    def attempts(self) -> int:
        """Definitive failures counted before the outbox gave up."""
        return self[3]


def _migrate(conn: sqlite3.Connection) -> None:
    """Files written by earlier releases get the columns added since
    (``register``; ``kind``, and ``levels`` of dead letters)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    if "register" not in columns:
        conn.execute("ALTER TABLE outbox ADD COLUMN register INTEGER NOT NULL DEFAULT 0")
    if "kind" not in columns:
        conn.execute("ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'request'")
    dead_columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox_dead)")}
    if "kind" not in dead_columns:
        conn.execute("ALTER TABLE outbox_dead ADD COLUMN kind TEXT NOT NULL DEFAULT 'request'")
    if "levels" not in dead_columns:
        conn.execute("ALTER TABLE outbox_dead ADD COLUMN levels INTEGER NOT NULL DEFAULT 1")


class OutboxFile:
    """An outbox's file without a transport: what waits, what was given up
    on, and requeueing it (``transport outbox FILE``). Safe beside a running
    :class:`Outbox` on the same file (SQLite transactions); a running outbox
    sends requeued rows within ``IDLE_CHECK_INTERVAL`` seconds of an idle line.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self.path = str(path)
        self._store = SqliteStore(self.path, synchronous=synchronous, schema=_SCHEMA)
        self._opened = False

    async def open(self) -> None:
        """Open (creating it if needed: an empty outbox) and migrate the file.

        Raises: ConfigurationError if its directory does not exist;
        TransientTransportError / PermanentTransportError from SQLite.
        """
        if not self._opened:
            await self._store.open()
            await self._store.write(_migrate)
            self._opened = True

    async def __aenter__(self) -> OutboxFile:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def depth(self) -> dict[str, int]:
        """Rows waiting to be sent, by kind (``request``, ``event``, ``publish``)."""
        rows = await self._store.read(
            lambda c: c.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall()
        )
        return {kind: int(n) for kind, n in rows}

    async def dead(self) -> list[dict[str, Any]]:
        """Every row given up on, oldest first: ``id``, ``kind``, ``target``
        (queue, stream or subject), ``error``, ``attempts``, ``dead_at`` (epoch
        seconds) and ``body`` (the stored JSON, as text)."""
        rows = await self._store.read(
            lambda c: c.execute(
                "SELECT id, kind, queue, error, attempts, dead_at, body FROM outbox_dead ORDER BY id"
            ).fetchall()
        )
        return [
            {
                "id": row_id,
                "kind": kind,
                "target": target,
                "error": error,
                "attempts": attempts,
                "dead_at": dead_at,
                "body": bytes(body).decode("utf-8", "replace"),
            }
            for row_id, kind, target, error, attempts, dead_at, body in rows
        ]

    async def requeue_dead(self, ids: Iterable[int] | None = None) -> int:
        """Move dead rows (all, or those with these ids) back to the end of
        the line with their attempts reset; returns how many moved.

        Guarantees: each row moves in one transaction (never lost, never
        doubled).
        """
        wanted = None if ids is None else set(ids)

        def op(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT id, kind, queue, levels, body FROM outbox_dead ORDER BY id"
            ).fetchall()
            moved = 0
            for row_id, kind, target, levels, body in rows:
                if wanted is not None and row_id not in wanted:
                    continue
                conn.execute(
                    "INSERT INTO outbox(queue, levels, body, created_at, kind) VALUES (?, ?, ?, ?, ?)",
                    (target, levels, body, time.time(), kind),
                )
                conn.execute("DELETE FROM outbox_dead WHERE id = ?", (row_id,))
                moved += 1
            return moved

        return int(await self._store.write(op))

    async def aclose(self) -> None:
        """Close the file. Idempotent."""
        await self._store.aclose()


QueueFactory = Callable[[str, int], RequestQueue]


class _DrainLock:
    """The right to drain one outbox file: an exclusive ``flock`` on
    ``<file>.drain-lock`` (per open file, so two outboxes of one process
    exclude each other too), dropped by :meth:`release` or by the system
    when the process ends. Always granted where ``flock`` does not exist."""

    def __init__(self, path: str) -> None:
        self.path = None if path == ":memory:" else os.path.realpath(path) + ".drain-lock"
        self._fd: int | None = None
        self._held = False

    def try_acquire(self) -> bool:
        """Take the lock if it is free (never waits); whether it is held now."""
        if self._held:
            return True
        if fcntl is not None and self.path is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        self._held = True
        return True

    def release(self) -> None:
        self._held = False
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the file drops the lock


class Outbox:
    """Durable, FIFO store-and-forward in front of a transport.

    Use as ``async with Outbox(transport, "outbox.db") as outbox:`` or call
    :meth:`start` / :meth:`aclose`; the first :meth:`enqueue` starts it too.
    ``queue_factory`` builds the destination queue for (name, levels); by
    default the transport's. ``event_log`` / ``event_bus`` are where appends
    and publishes go; by default the transport's (opened when first needed).
    """

    def __init__(
        self,
        transport: Transport,
        path: str | Path,
        *,
        max_attempts: int = 3,
        retry_wait: wait_base | None = None,
        queue_factory: QueueFactory | None = None,
        synchronous: str = "FULL",
        event_log: EventLog | None = None,
        event_bus: EventBus | None = None,
    ) -> None:
        self.transport = transport
        self.path = str(path)
        self.max_attempts = max_attempts
        self._wait = retry_wait or wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.1)
        self._factory = queue_factory or self._default_queue
        self._queues: dict[tuple[str, int], RequestQueue] = {}
        self._registries: dict[str, DeliveryRegistry] = {}
        self._event_log = event_log
        self._event_bus = event_bus
        self._starting: asyncio.Lock | None = None
        self._store = SqliteStore(self.path, synchronous=synchronous, schema=_SCHEMA)
        self._lock = _DrainLock(self.path)
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._empty = asyncio.Event()
        self._closed = False
        self._outage = OutageLog(log, "outbox: sending")

    def _handle(self, name: str, levels: int) -> RequestQueue:
        """The queue handle requests for ``name`` are sent through (made by
        the queue factory once; opening one does not reach the broker)."""
        queue = self._queues.get((name, levels))
        if queue is None:
            queue = self._queues[(name, levels)] = self._factory(name, levels)
        return queue

    def _default_queue(self, name: str, levels: int) -> RequestQueue:
        if levels > 1:
            return self.transport.priority_queue(name, levels=levels)
        return self.transport.request_queue(name)

    async def start(self) -> None:
        """Open the file (creating it) and start draining in the background;
        returns at once. Idempotent; :meth:`enqueue` calls it if needed.

        Guarantees: requests left in the file by an earlier run are sent
        first, in the order they were stored.
        Raises: ClosedResourceError after :meth:`aclose`; ConfigurationError
        if the file's directory does not exist; TransientTransportError /
        PermanentTransportError if SQLite cannot open the file.
        """
        if self._closed:
            raise ClosedResourceError("outbox is closed")
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._drainer is not None:
                return
            await self._store.open()
            await self._store.write(self._migrate)
            self._drainer = asyncio.create_task(self._drain(), name="outbox-drainer")

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        _migrate(conn)

    async def __aenter__(self) -> Outbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def enqueue(
        self, queue: str, request: WorkRequest, *, levels: int = 1, register: bool = False
    ) -> WorkRequest:
        """Store ``request`` for ``queue``; returns once committed locally.

        With ``register=True`` the drainer first registers the request in the
        delivery registry named by its ``reply_to`` (idempotent), then sends
        it: for a caller that could not reach the broker to register.

        Guarantees: durable on return (committed to the local file, with the
        configured ``synchronous`` level); sent to ``queue`` in FIFO order
        with every other stored request, at least once.
        Raises: PayloadTooLargeError / PermanentTransportError for a request
        the transport would refuse anyway; ValueError for ``register`` without
        ``reply_to``; ClosedResourceError; TransientTransportError /
        PermanentTransportError if the local file cannot be written.
        """
        if self._closed:
            raise ClosedResourceError("outbox is closed")
        if register and request.reply_to is None:
            raise ValueError("register=True needs a request with reply_to")
        if self._drainer is None:
            await self.start()
        # Refused now what the transport would refuse at send time (it was
        # stored, tried three times, then dead-lettered): a bad queue name,
        # a request over the queue's own limit (NATS: the server's
        # max_payload less its header allowance, below max_payload_bytes).
        validate_name(queue, "queue name")
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        if request.enqueued_at is None:
            request = replace_fields(request, enqueued_at=utcnow())
        limit = self.transport.config.max_payload_bytes
        own = self._handle(queue, levels).max_payload_bytes
        body = encode(request, limit if own is None else min(own, limit))

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO outbox(queue, levels, body, created_at, register)"
                " VALUES (?, ?, ?, ?, ?)",
                (queue, levels, body, time.time(), int(register)),
            )

        await self._store.write(op)
        self._empty.clear()
        self._wake.set()
        return request

    async def append(
        self,
        stream: str,
        data: Any = None,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Store an event-log append for ``stream``; returns once committed
        locally (its position is known only once it is sent: use the event
        log directly when you need it).

        Guarantees: durable on return; appended in the order stored, after
        everything stored before it, at least once.
        Raises: UnsupportedFeatureError if the backend has no event log;
        InvalidNameError for a bad stream name; ValueError for bad headers;
        PayloadTooLargeError / PermanentTransportError for data the log would
        refuse; ClosedResourceError; errors of the local file as
        :meth:`enqueue`.
        """
        if not self.transport.capabilities.event_log:
            raise UnsupportedFeatureError(f"{self.transport.backend} has no event log")
        validate_name(stream, "stream name")
        event = _Stored(data=data, key=key, headers=check_headers(headers))
        await self._store_row(
            "event", stream, encode(event, self.transport.config.max_payload_bytes)
        )

    async def publish(
        self, subject: str, data: Any = None, *, headers: dict[str, str] | None = None
    ) -> None:
        """Store an event-bus publish on ``subject`` (opt-in: a bus publish
        is otherwise fire-and-forget and fails in an outage); returns once
        committed locally. It is published when the broker is back, to the
        subscribers present then.

        Guarantees: durable on return; published in the order stored, at
        least once.
        Raises: UnsupportedFeatureError if the backend has no event bus;
        InvalidNameError for a bad subject (wildcards included); otherwise as
        :meth:`append`.
        """
        if not self.transport.capabilities.event_bus:
            raise UnsupportedFeatureError(f"{self.transport.backend} has no event bus")
        validate_subject(subject)
        event = _Stored(data=data, headers=check_headers(headers))
        await self._store_row(
            "publish", subject, encode(event, self.transport.config.max_payload_bytes)
        )

    async def _store_row(self, kind: Kind, target: str, body: bytes) -> None:
        if self._closed:
            raise ClosedResourceError("outbox is closed")
        if self._drainer is None:
            await self.start()

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO outbox(queue, levels, body, created_at, kind) VALUES (?, 1, ?, ?, ?)",
                (target, body, time.time(), kind),
            )

        await self._store.write(op)
        self._empty.clear()
        self._wake.set()

    async def dead_events(self) -> list[OutboxDeadEvent]:
        """Every event-log append and bus publish the outbox gave up on,
        oldest first (requests: :meth:`dead_letters`).

        Raises: as :meth:`dead_letters`.
        """
        rows = await self._store.read(
            lambda c: c.execute(
                "SELECT kind, queue, body, error, attempts FROM outbox_dead"
                " WHERE kind != 'request' ORDER BY id"
            ).fetchall()
        )
        return [OutboxDeadEvent((k, t, decode(_Stored, b), e, a)) for k, t, b, e, a in rows]

    async def depth(self) -> int:
        """Requests, appends and publishes stored and not yet accepted by the
        transport (a consistent read of the local file; dead letters not
        included).

        Raises: ClosedResourceError after :meth:`aclose`;
        TransientTransportError / PermanentTransportError if the local file
        cannot be read.
        """
        return int(
            await self._store.read(lambda c: c.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        )

    async def dead_letters(self) -> list[OutboxDeadLetter]:
        """Every request the outbox gave up on (after ``max_attempts``
        definitive failures), oldest first. They stay in the file and are not
        retried.

        Raises: ClosedResourceError after :meth:`aclose`;
        TransientTransportError / PermanentTransportError if the local file
        cannot be read; UndecodableMessageError for a corrupted row.
        """
        rows = await self._store.read(
            lambda c: c.execute(
                "SELECT queue, body, error, attempts FROM outbox_dead"
                " WHERE kind = 'request' ORDER BY id"
            ).fetchall()
        )
        return [OutboxDeadLetter((q, decode(WorkRequest, b), e, a)) for q, b, e, a in rows]

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything stored so far was handed to the transport
        (accepted by it, or dead-lettered in the outbox).

        Raises: TimeoutError (nothing is lost: the rest stays stored); as
        :meth:`depth`.
        """
        async with asyncio.timeout(timeout):
            while await self.depth():
                self._empty.clear()
                self._wake.set()
                await self._empty.wait()

    def _pause(self, failures: int) -> float:
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = failures
        return float(self._wait(state))

    async def _drain(self) -> None:
        try:
            await self._take_the_line()
            await self._drain_locked()
        finally:
            self._lock.release()

    async def _take_the_line(self) -> None:
        """Wait until this outbox holds the file's drain lock. Meanwhile
        another outbox drains the file: the rows stored here go out through
        it, and :meth:`flush` returns once the file is empty."""
        standing_by = False
        while not self._lock.try_acquire():
            if not standing_by:
                standing_by = True
                log.info(
                    "outbox %s: another outbox (in this process or another) is draining this"
                    " file; this one stores requests in it and takes over when that one stops",
                    self.path,
                )
            if not await self.depth():
                self._empty.set()
            await asyncio.sleep(IDLE_CHECK_INTERVAL)
        if standing_by:
            log.info("outbox %s: took over draining the file", self.path)

    async def _drain_locked(self) -> None:
        while True:
            rows = await self._store.read(
                lambda c: c.execute(
                    "SELECT id, queue, levels, body, attempts, register, kind FROM outbox"
                    " ORDER BY id LIMIT ?",
                    (DRAIN_BATCH,),
                ).fetchall()
            )
            if not rows:
                self._empty.set()
                self._wake.clear()
                # Woken by a store of this process, or a look at the file
                # now and then (rows requeued by another process).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_CHECK_INTERVAL):
                        await self._wake.wait()
                continue
            if not await self._send_rows(rows):
                return

    async def _send_rows(self, rows: list[tuple[Any, ...]]) -> bool:
        """Send ``rows`` (the head of the line) one after the other, each
        once the one before it was accepted, and delete those sent in one
        write (also when cancelled: a clean close sends nothing twice). At
        the first failure the rest wait: a transient one pauses, a
        definitive one is counted against its row, and the line is read
        again from its head. ``False``: the transport was closed."""
        sent: list[int] = []
        try:
            for row in rows:
                row_id, queue_name, levels, body, _attempts, register, kind = row
                try:
                    await self._send_row(queue_name, levels, body, register, kind)
                except TransientTransportError as exc:
                    # Hold the line (FIFO) and retry; an outage never counts.
                    pause = self._pause(self.outage_failures + 1)
                    self._outage.failed(exc, "holding requests, retrying")
                    await self._delete_sent(sent)
                    await asyncio.sleep(pause)
                    return True
                except ClosedResourceError:
                    log.warning(
                        "outbox: the transport was closed; draining stops (requests stay stored)"
                    )
                    return False
                except (PermanentTransportError, ValueError) as exc:
                    error = str(exc)
                except Exception as exc:  # not an outage: counts like a definitive failure
                    log.exception("outbox: sending a request to %s failed", queue_name)
                    error = f"{type(exc).__name__}: {exc}"
                else:
                    self._outage.recovered()
                    sent.append(row_id)
                    continue
                self._outage.recovered()
                await self._delete_sent(sent)
                await self._store.write(
                    functools.partial(self._definitive_failure, row_id=row_id, error=error)
                )
                return True
        finally:
            # Sent rows are deleted even by a cancelled drainer (the write is
            # shielded; a close waits for the drainer).
            await self._delete_sent(sent)
        return True

    async def _delete_sent(self, sent: list[int]) -> None:
        """Delete the rows in ``sent`` (emptied), shielded from a close."""
        if sent:
            ids = sent[:]
            sent.clear()
            await asyncio.shield(self._store.write(functools.partial(self._delete, ids=ids)))

    async def _send_row(
        self, queue_name: str, levels: int, body: bytes, register: int, kind: str
    ) -> None:
        """Send one stored row to its destination; raises as that does."""
        if kind != "request":
            await self._send_event(kind, queue_name, decode(_Stored, body))
            return
        request = decode(WorkRequest, body)
        if register and request.reply_to is not None:
            registry = self._registries.get(request.reply_to)
            if registry is None:
                registry = self.transport.delivery_registry(request.reply_to)
                self._registries[request.reply_to] = registry
            await registry.register(request.request_id)
        queue = self._handle(queue_name, levels)
        if isinstance(queue, PriorityRequestQueue):
            await queue.enqueue(request, priority=min(request.priority, queue.levels - 1))
        else:
            await queue.enqueue(request)

    async def _send_event(self, kind: str, target: str, event: _Stored) -> None:
        if kind == "event":
            if self._event_log is None:
                self._event_log = self.transport.event_log()
            await self._event_log.append(target, event.data, key=event.key, headers=event.headers)
        elif kind == "publish":
            if self._event_bus is None:
                self._event_bus = self.transport.event_bus()
            await self._event_bus.publish(target, event.data, headers=event.headers)
        else:
            raise PermanentTransportError(f"unknown outbox row kind {kind!r}")

    @property
    def outage_failures(self) -> int:
        """Consecutive transient failures of the head of the line (0 when flowing)."""
        return self._outage.failures

    @staticmethod
    def _delete(conn: sqlite3.Connection, ids: list[int]) -> None:
        conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def _definitive_failure(self, conn: sqlite3.Connection, row_id: int, error: str) -> None:
        row = conn.execute(
            "SELECT queue, body, attempts, kind, levels FROM outbox WHERE id = ?", (row_id,)
        ).fetchone()
        if row is None:
            return
        queue, body, attempts, kind, levels = row
        attempts += 1
        if attempts >= self.max_attempts:
            conn.execute(
                "INSERT INTO outbox_dead(queue, body, error, attempts, dead_at, kind, levels)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (queue, body, error, attempts, time.time(), kind, levels),
            )
            conn.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
            what = {"request": "a request for", "event": "an append to", "publish": "a publish on"}
            log.error(
                "outbox: gave up on %s %s after %d attempts: %s",
                what.get(kind, "a row for"),
                queue,
                attempts,
                error,
            )
        else:
            conn.execute(
                "UPDATE outbox SET attempts = ?, last_error = ? WHERE id = ?",
                (attempts, error, row_id),
            )

    async def aclose(self) -> None:
        """Stop draining; what is stored stays in the file for the next run.
        Idempotent.

        Raises: the error that stopped the drainer, if the local file failed
        under it (TransientTransportError / PermanentTransportError).
        """
        if self._closed:
            return
        self._closed = True
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        for handle in [*self._registries.values(), self._event_log, self._event_bus]:
            if handle is not None:
                with contextlib.suppress(Exception):
                    await handle.aclose()
        await self._store.aclose()
