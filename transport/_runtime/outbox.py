"""An SQLite disk queue in front of ``enqueue`` for when the broker is down.

``Outbox.enqueue`` returns once the request is committed to a local file; a
background drainer sends requests to the transport strictly in FIFO order.
A request stored with ``register=True`` (a :class:`~transport.Network` that
could not reach the broker to register the caller's pending record) has its
delivery record registered by the drainer first, then is sent.
A transient failure (broker unreachable, timeout) is retried with backoff,
forever, holding the line — an outage alone never dead-letters anything.
Only definitive (permanent) failures count toward ``max_attempts`` (3), after
which the request moves to the outbox's dead-letter table and the line moves
on. A request whose enqueue timed out may be sent twice (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from tenacity import RetryCallState, wait_exponential_jitter
from tenacity.wait import wait_base

from transport._runtime.sqlitestore import SqliteStore
from transport._spi.codec import decode, encode
from transport._spi.models import WorkRequest, utcnow
from transport._spi.priority import PriorityRequestQueue
from transport._spi.queue import RequestQueue
from transport._spi.registries import DeliveryRegistry
from transport._spi.transport import Transport
from transport.errors import ClosedResourceError, PermanentTransportError, TransientTransportError

__all__ = ["Outbox", "OutboxDeadLetter"]

log = logging.getLogger("transport.outbox")

#: Seconds between two "still unavailable" warnings during one outage.
OUTAGE_LOG_INTERVAL = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL, levels INTEGER NOT NULL, body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, created_at REAL NOT NULL,
    register INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox_dead (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL, body BLOB NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL,
    dead_at REAL NOT NULL
);
"""


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


QueueFactory = Callable[[str, int], RequestQueue]


class Outbox:
    """Durable, FIFO store-and-forward in front of a transport.

    Use as ``async with Outbox(transport, "outbox.db") as outbox:`` or call
    :meth:`start` / :meth:`aclose`; the first :meth:`enqueue` starts it too.
    ``queue_factory`` builds the destination queue for (name, levels); by
    default the transport's.
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
    ) -> None:
        self.transport = transport
        self.path = str(path)
        self.max_attempts = max_attempts
        self._wait = retry_wait or wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.1)
        self._factory = queue_factory or self._default_queue
        self._queues: dict[tuple[str, int], RequestQueue] = {}
        self._registries: dict[str, DeliveryRegistry] = {}
        self._starting: asyncio.Lock | None = None
        self._store = SqliteStore(self.path, synchronous=synchronous, schema=_SCHEMA)
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._empty = asyncio.Event()
        self._closed = False
        #: Consecutive transient failures of the head of the line (0 when flowing).
        self.outage_failures = 0
        self._outage_since: float | None = None
        self._outage_logged = 0.0

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
        """Files written before the ``register`` column existed get it."""
        columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
        if "register" not in columns:
            conn.execute("ALTER TABLE outbox ADD COLUMN register INTEGER NOT NULL DEFAULT 0")

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
        if request.enqueued_at is None:
            request = request.model_copy(update={"enqueued_at": utcnow()})
        body = encode(request, self.transport.config.max_payload_bytes)

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

    async def depth(self) -> int:
        """Requests stored and not yet accepted by the transport (a
        consistent read of the local file; dead letters not included).

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
                "SELECT queue, body, error, attempts FROM outbox_dead ORDER BY id"
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
        while True:
            head = await self._store.read(
                lambda c: c.execute(
                    "SELECT id, queue, levels, body, attempts, register FROM outbox"
                    " ORDER BY id LIMIT 1"
                ).fetchone()
            )
            if head is None:
                self._empty.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            row_id, queue_name, levels, body, _attempts, register = head
            request = decode(WorkRequest, body)
            try:
                if register and request.reply_to is not None:
                    registry = self._registries.get(request.reply_to)
                    if registry is None:
                        registry = self.transport.delivery_registry(request.reply_to)
                        self._registries[request.reply_to] = registry
                    await registry.register(request.request_id)
                queue = self._queues.get((queue_name, levels))
                if queue is None:
                    queue = self._queues[(queue_name, levels)] = self._factory(queue_name, levels)
                if isinstance(queue, PriorityRequestQueue):
                    await queue.enqueue(request, priority=min(request.priority, queue.levels - 1))
                else:
                    await queue.enqueue(request)
            except TransientTransportError as exc:
                # Hold the line (FIFO) and retry; an outage never counts.
                self.outage_failures += 1
                pause = self._pause(self.outage_failures)
                self._log_outage(exc, pause)
                await asyncio.sleep(pause)
                continue
            except ClosedResourceError:
                log.warning(
                    "outbox: the transport was closed; draining stops (requests stay stored)"
                )
                return
            except (PermanentTransportError, ValueError) as exc:
                self._outage_over()
                await self._store.write(
                    functools.partial(self._definitive_failure, row_id=row_id, error=str(exc))
                )
                continue
            except Exception as exc:  # not an outage: counts like a definitive failure
                log.exception("outbox: sending a request to %s failed", queue_name)
                self._outage_over()
                await self._store.write(
                    functools.partial(
                        self._definitive_failure,
                        row_id=row_id,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                )
                continue
            self._outage_over()
            await self._store.write(functools.partial(self._delete, row_id=row_id))

    def _log_outage(self, exc: Exception, pause: float) -> None:
        """One warning when an outage starts, then one every
        ``OUTAGE_LOG_INTERVAL`` seconds (each retry is logged at DEBUG)."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = self._outage_logged = now
            log.warning("outbox: transport unavailable (%s); holding requests, retrying", exc)
        elif now - self._outage_logged >= OUTAGE_LOG_INTERVAL:
            self._outage_logged = now
            log.warning(
                "outbox: transport still unavailable after %.0fs and %d tries (%s)",
                now - self._outage_since,
                self.outage_failures,
                exc,
            )
        else:
            log.debug("outbox: transport unavailable (%s); retrying in %.2fs", exc, pause)

    def _outage_over(self) -> None:
        if self._outage_since is not None:
            log.warning(
                "outbox: transport reachable again after %.1fs; draining",
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
        self.outage_failures = 0

    @staticmethod
    def _delete(conn: sqlite3.Connection, row_id: int) -> None:
        conn.execute("DELETE FROM outbox WHERE id = ?", (row_id,))

    def _definitive_failure(self, conn: sqlite3.Connection, row_id: int, error: str) -> None:
        row = conn.execute(
            "SELECT queue, body, attempts FROM outbox WHERE id = ?", (row_id,)
        ).fetchone()
        if row is None:
            return
        queue, body, attempts = row
        attempts += 1
        if attempts >= self.max_attempts:
            conn.execute(
                "INSERT INTO outbox_dead(queue, body, error, attempts, dead_at) VALUES (?, ?, ?, ?, ?)",
                (queue, body, error, attempts, time.time()),
            )
            conn.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
            log.error(
                "outbox: gave up on a request for %s after %d attempts: %s", queue, attempts, error
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
        for registry in self._registries.values():
            with contextlib.suppress(Exception):
                await registry.aclose()
        await self._store.aclose()
