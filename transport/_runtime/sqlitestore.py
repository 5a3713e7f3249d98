"""A SQLite file on its own thread, with group commit: the store behind
``sqlite://`` and the outbox (each passes its own schema).

Every operation is a function of the connection run on the store's thread.
Consecutive writes submitted while a transaction is being committed are run
together in the next transaction (each inside its own SAVEPOINT, so one
failing operation does not undo the others) and share its fsync; each caller
still resumes only after *its* commit. Operations submitted during one
iteration of a caller's event loop reach the thread together, at the end of
that iteration (one wake-up of the thread, one transaction for them all,
rather than a transaction started by the first while the others are still
being submitted). Several processes may share the file:
WAL mode, ``BEGIN IMMEDIATE`` and a busy timeout serialise writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from transport.errors import (
    ClosedResourceError,
    ConfigurationError,
    PermanentTransportError,
    TransientTransportError,
)

__all__ = ["SqliteStore", "map_sqlite_errors"]

log = logging.getLogger("transport.sqlite")

T = TypeVar("T")

_SYNCHRONOUS = {"OFF", "NORMAL", "FULL", "EXTRA"}
_MAX_BATCH = 512


@contextlib.contextmanager
def map_sqlite_errors(path: str) -> Iterator[None]:
    """The one place SQLite exceptions become transport errors."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "locked" in text or "busy" in text or "disk i/o" in text or "unable to open" in text:
            raise TransientTransportError(f"sqlite {path}: {exc}") from exc
        raise PermanentTransportError(f"sqlite {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise PermanentTransportError(f"sqlite {path}: {exc}") from exc


Many = Callable[[sqlite3.Connection, list[Any]], list[Any]]


class _Op:
    __slots__ = ("arg", "fn", "future", "key", "loop", "many", "sync", "write")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any] | None,
        write: bool,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        key: Hashable = None,
        many: Many | None = None,
        arg: Any = None,
        sync: bool = True,
    ) -> None:
        self.fn = fn
        self.write = write
        self.sync = sync
        self.loop = loop
        self.future = future
        self.key = key
        self.many = many
        self.arg = arg

    def run(self, conn: sqlite3.Connection) -> Any:
        if self.many is not None:
            return self.many(conn, [self.arg])[0]
        assert self.fn is not None
        return self.fn(conn)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _resolve_all(items: list[tuple[_Op, Any, BaseException | None]]) -> None:
    for op, result, error in items:
        future = op.future
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _use_wal(conn: sqlite3.Connection, within: float) -> None:
    """Put the file in WAL mode. Switching the mode needs the file to itself
    and SQLite does not wait for that with the busy timeout: a process that
    opened the file while another was writing failed at start with
    "database is locked". A file already in WAL mode (any but the first
    opening) is left as it is; otherwise the switch is retried."""
    deadline = time.monotonic() + within
    while True:
        try:
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


class SqliteStore:
    """Owns the connection and its thread. Create with :meth:`open`."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 30_000,
        schema: str,
    ) -> None:
        synchronous = synchronous.upper()
        if synchronous not in _SYNCHRONOUS:
            raise ConfigurationError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}")
        self.path = path
        # The file opened: "~" expanded (the path as given stays for messages).
        self._file = path if path == ":memory:" else str(Path(path).expanduser())
        self.synchronous = synchronous
        # A transaction of writes that all passed sync=False commits at this
        # level: without an fsync of its own under FULL/EXTRA (durable with
        # the next fsynced commit, which syncs the whole WAL before it).
        self._unsynced_level = "NORMAL" if synchronous in ("FULL", "EXTRA") else synchronous
        self._level = synchronous  # the connection's level now
        self._schema = schema
        self._completed: list[tuple[_Op, Any, BaseException | None]] = []
        self._busy_timeout_ms = busy_timeout_ms
        self._ops: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()
        # Per caller loop: operations submitted in its current iteration,
        # handed to the thread together by one call_soon at its end.
        self._pending: dict[asyncio.AbstractEventLoop, list[_Op]] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._closed = False

    async def open(self) -> None:
        """Open the file (creating it and its schema) on the store thread."""
        if self.path != ":memory:":
            file = Path(self._file)
            parent = file.resolve().parent  # noqa: ASYNC240 - once, at open
            if not parent.is_dir():
                hint = ""
                if not file.is_absolute():
                    hint = (
                        f" ({self.path!r} is relative to the working directory; an absolute "
                        f"path takes four slashes: sqlite:////{self.path})"
                    )
                raise ConfigurationError(f"sqlite: directory {parent} does not exist{hint}")
            if file.is_dir():  # noqa: ASYNC240 - once, at open
                raise ConfigurationError(
                    f"sqlite: {self.path} is a directory; the URL names the database file"
                    " (sqlite:////path/to/file.db)"
                )
        self._thread = threading.Thread(target=self._run, name=f"sqlite:{self.path}", daemon=True)
        self._thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        if self._startup_error is not None:
            with map_sqlite_errors(self.path):
                raise self._startup_error

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._file,
            isolation_level=None,
            check_same_thread=False,
            timeout=self._busy_timeout_ms / 1000,
        )
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        _use_wal(conn, self._busy_timeout_ms / 1000)
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.executescript(self._schema)  # idempotent; serialised by the busy timeout
        return conn

    def _run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                first = self._ops.get()
                if first is None:
                    return
                batch = first
                while len(batch) < _MAX_BATCH:
                    try:
                        nxt = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._ops.put(None)  # finish this batch, then stop
                        break
                    batch += nxt
                self._execute(conn, batch)
                self._flush_done()
        finally:
            conn.close()

    def _execute(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        i = 0
        while i < len(batch):
            if not batch[i].write:
                op = batch[i]
                try:
                    with map_sqlite_errors(self.path):
                        result = op.run(conn)
                    self._done(op, result, None)
                except BaseException as exc:
                    self._done(op, None, exc)
                i += 1
                continue
            j = i
            while j < len(batch) and batch[j].write:
                j += 1
            if self._completed:
                # Reads done so far need not wait for the write transaction
                # (and its fsync) that follows them.
                self._flush_done()
            self._write_group(conn, batch[i:j])
            i = j

    def _write_group(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        results: list[tuple[Any, BaseException | None]] = []
        try:
            with map_sqlite_errors(self.path):
                level = self.synchronous
                if not any(op.sync for op in ops):
                    level = self._unsynced_level
                if level != self._level:  # (not allowed inside a transaction)
                    conn.execute(f"PRAGMA synchronous={level}")
                    self._level = level
                conn.execute("BEGIN IMMEDIATE")
                try:
                    i = 0
                    while i < len(ops):
                        j = i + 1
                        key = ops[i].key
                        if key is not None:
                            while j < len(ops) and ops[j].key == key:
                                j += 1
                        if j - i > 1 and self._run_many(conn, ops[i:j], results):
                            i = j
                            continue
                        for op in ops[i:j]:
                            self._run_one(conn, op, results)
                        i = j
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
        except BaseException as exc:
            for op in ops:
                self._done(op, None, exc)
            return
        for op, (result, error) in zip(ops, results, strict=True):
            self._done(op, result, error)

    def _run_one(
        self, conn: sqlite3.Connection, op: _Op, results: list[tuple[Any, BaseException | None]]
    ) -> None:
        # Its own SAVEPOINT: a failing operation does not undo the others.
        conn.execute("SAVEPOINT op")
        try:
            result = op.run(conn)
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            try:
                with map_sqlite_errors(self.path):
                    raise exc
            except Exception as mapped:
                results.append((None, mapped))
            return
        conn.execute("RELEASE op")
        results.append((result, None))

    @staticmethod
    def _run_many(
        conn: sqlite3.Connection, ops: list[_Op], results: list[tuple[Any, BaseException | None]]
    ) -> bool:
        """Run consecutive operations sharing a key with one call of their
        ``many`` function, inside one SAVEPOINT. If that fails, undo it and
        return False: the caller then runs them one by one, so each gets its
        own outcome exactly as if they had not been combined."""
        many = ops[0].many
        assert many is not None
        conn.execute("SAVEPOINT many")
        try:
            out = many(conn, [op.arg for op in ops])
            if len(out) != len(ops):
                raise RuntimeError("batched operation returned the wrong number of results")
        except Exception:
            conn.execute("ROLLBACK TO many")
            conn.execute("RELEASE many")
            return False
        conn.execute("RELEASE many")
        results.extend((result, None) for result in out)
        return True

    def _done(self, op: _Op, result: Any, error: BaseException | None) -> None:
        self._completed.append((op, result, error))

    def _flush_done(self) -> None:
        # One wake-up of each caller loop per batch, not one per operation:
        # call_soon_threadsafe writes to the loop's self-pipe every time.
        completed, self._completed = self._completed, []
        if not completed:
            return
        first = completed[0][0].loop
        if all(item[0].loop is first for item in completed):  # the usual case: one loop
            by_loop = {first: completed}
        else:
            by_loop = {}
            for item in completed:
                by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                loop.call_soon_threadsafe(_resolve_all, items)

    def submit(
        self, fn: Callable[[sqlite3.Connection], T], *, write: bool, sync: bool = True
    ) -> asyncio.Future[T]:
        """Schedule ``fn``; the future resolves after its transaction commits.

        ``sync=False`` (writes only): the write needs no fsync of its own. A
        transaction of such writes alone commits at ``synchronous=NORMAL``
        when the store's level is FULL or EXTRA: it survives a crash of the
        process at once, and a power loss once any later fsynced commit (of
        this or another process) synced the write-ahead log, which holds it.
        A transaction with any other write is fsynced as usual.

        Raises: ClosedResourceError.
        """
        if self._closed:
            raise ClosedResourceError(f"sqlite store {self.path} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._hand_over(_Op(fn, write, loop, future, sync=sync))
        return future

    def submit_many(self, key: Hashable, many: Many, arg: Any) -> asyncio.Future[Any]:
        """Schedule a write that may be combined with others: consecutive
        writes with the same (non-None) ``key`` run as one call
        ``many(conn, [arg, ...])`` returning one result per argument, in the
        same transaction as usual. Writes sharing a key must pass equivalent
        ``many`` functions. If the combined call raises, each write is run
        alone (``many(conn, [arg])``) in its own SAVEPOINT, so one failing
        write does not fail the others. Resolves after the commit.

        Raises: ClosedResourceError.
        """
        if self._closed:
            raise ClosedResourceError(f"sqlite store {self.path} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._hand_over(_Op(None, True, loop, future, key, many, arg))
        return future

    def _hand_over(self, op: _Op) -> None:
        pending = self._pending.get(op.loop)
        if pending is None:
            self._pending[op.loop] = [op]
            op.loop.call_soon(self._flush_pending, op.loop)
        else:
            pending.append(op)

    def _flush_pending(self, loop: asyncio.AbstractEventLoop) -> None:
        ops = self._pending.pop(loop, None)
        if ops:
            self._ops.put(ops)

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, sync: bool = True) -> T:
        """Run ``fn`` in a (group-committed) write transaction; ``sync`` as
        for :meth:`submit`."""
        return await self.submit(fn, write=True, sync=sync)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` outside a write transaction (a consistent read)."""
        return await self.submit(fn, write=False)

    async def aclose(self) -> None:
        """Finish queued operations, then close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for loop in list(self._pending):  # submitted in this iteration: still run
            self._flush_pending(loop)
        self._ops.put(None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
