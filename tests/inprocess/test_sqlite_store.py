"""The group-commit store behind ``sqlite://``: combined writes keep each
caller's own outcome, and the fast model copy matches ``model_copy``."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from transport import WorkRequest
from transport._spi.models import replace_fields
from transport.errors import PermanentTransportError
from transport.kit import SqliteStore

_SCHEMA = "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT NOT NULL);"


def _insert_many(conn: sqlite3.Connection, items: list[tuple[int, str | None]]) -> list[int]:
    conn.executemany("INSERT INTO t(k, v) VALUES (?, ?)", items)
    return [k for k, _ in items]


calls: list[int] = []


def _counting_insert(conn: sqlite3.Connection, items: list[tuple[int, str | None]]) -> list[int]:
    calls.append(len(items))
    return _insert_many(conn, items)


async def _rows(store: SqliteStore) -> list[tuple[Any, ...]]:
    return await store.read(lambda c: c.execute("SELECT k, v FROM t ORDER BY k").fetchall())


async def test_combined_writes_share_one_call_and_all_commit(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), schema=_SCHEMA)
    await store.open()
    try:
        calls.clear()
        loop = asyncio.get_running_loop()
        block = loop.create_future()
        # Hold the store thread so the next submissions queue up together.
        gate = store.submit(
            lambda c: asyncio.run_coroutine_threadsafe(_wait(block), loop).result(), write=False
        )
        futures = [store.submit_many("ins", _counting_insert, (i, f"v{i}")) for i in range(10)]
        block.set_result(None)
        await gate
        assert await asyncio.gather(*futures) == list(range(10))
        assert calls == [10]
        assert await _rows(store) == [(i, f"v{i}") for i in range(10)]
    finally:
        await store.aclose()


async def _wait(future: asyncio.Future[None]) -> None:
    await future


async def test_one_failing_combined_write_fails_alone(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), schema=_SCHEMA)
    await store.open()
    try:
        loop = asyncio.get_running_loop()
        block = loop.create_future()
        gate = store.submit(
            lambda c: asyncio.run_coroutine_threadsafe(_wait(block), loop).result(), write=False
        )
        # v NOT NULL: the third write violates it, the others must still commit.
        futures = [
            store.submit_many("ins", _insert_many, (i, None if i == 2 else f"v{i}"))
            for i in range(5)
        ]
        block.set_result(None)
        await gate
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert isinstance(results[2], PermanentTransportError)
        assert [r for i, r in enumerate(results) if i != 2] == [0, 1, 3, 4]
        assert await _rows(store) == [(i, f"v{i}") for i in (0, 1, 3, 4)]
    finally:
        await store.aclose()


def test_replace_fields_matches_model_copy() -> None:
    request = WorkRequest(task="work", payload={"a": [1, 2]}, headers={"h": "1"})
    now = datetime(2026, 1, 2, tzinfo=UTC)
    fast = replace_fields(request, enqueued_at=now, attempt=3)
    slow = request.model_copy(update={"enqueued_at": now, "attempt": 3})
    assert fast == slow
    assert fast.model_fields_set == slow.model_fields_set
    assert fast.model_dump_json() == slow.model_dump_json()
    assert request.enqueued_at is None and request.attempt == 1  # the original is untouched
    with pytest.raises(ValidationError):  # still frozen
        fast.attempt = 4  # type: ignore[misc]


async def test_a_read_does_not_wait_for_the_write_transaction_after_it(tmp_path: Path) -> None:
    import threading

    store = SqliteStore(str(tmp_path / "r.db"), schema=_SCHEMA)
    await store.open()
    try:
        hold_first, hold_second = threading.Event(), threading.Event()

        def blocking_write(event: threading.Event) -> Any:
            return lambda conn: (event.wait(30), conn.execute("INSERT INTO t(v) VALUES ('x')"))[0]

        first = store.submit(blocking_write(hold_first), write=True)  # occupies the thread
        read = store.submit(
            lambda conn: conn.execute("SELECT COUNT(*) FROM t").fetchone()[0], write=False
        )
        second = store.submit(blocking_write(hold_second), write=True)  # same batch as the read
        hold_first.set()
        assert await first is True
        # The read resolves while the write after it is still running.
        assert await asyncio.wait_for(read, 30) == 1
        assert not second.done()
        hold_second.set()
        assert await second is True
        assert await _rows(store) == [(1, "x"), (2, "x")]
    finally:
        hold_first.set()
        hold_second.set()
        await store.aclose()


async def test_writes_submitted_in_one_loop_iteration_reach_the_thread_together(
    tmp_path: Path,
) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), schema=_SCHEMA)
    await store.open()
    try:
        calls.clear()
        futures = []
        for i in range(10):
            futures.append(store.submit_many("ins", _counting_insert, (i, f"v{i}")))
            # The idle thread gets the GIL here: handed over one by one, the
            # first write would start a transaction of its own.
            time.sleep(0.002)  # noqa: ASYNC251 - holding the loop is the point
        assert await asyncio.gather(*futures) == list(range(10))
        assert calls == [10]  # handed over together at the end of the iteration
    finally:
        await store.aclose()


async def test_a_write_submitted_just_before_close_still_commits(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, schema=_SCHEMA)
    await store.open()
    pending = store.submit_many("ins", _insert_many, (1, "kept"))
    await store.aclose()  # in the same iteration as the submission
    assert await pending == 1
    reopened = SqliteStore(path, schema=_SCHEMA)
    await reopened.open()
    try:
        assert await _rows(reopened) == [(1, "kept")]
    finally:
        await reopened.aclose()


def _level(conn: sqlite3.Connection) -> int:
    # Read inside the write transaction: the level its commit uses
    # (1 = NORMAL, 2 = FULL).
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


async def test_only_a_transaction_of_unsynced_writes_alone_skips_the_fsync(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), schema=_SCHEMA)  # synchronous=FULL
    await store.open()
    try:
        assert await store.write(_level, sync=False) == 1
        assert await store.write(_level) == 2
        # Submitted together, they share one transaction: fsynced, since
        # one of them asks for it.
        both = [store.submit(_level, write=True, sync=False), store.submit(_level, write=True)]
        assert await asyncio.gather(*both) == [2, 2]
        assert await store.write(_level, sync=False) == 1
    finally:
        await store.aclose()
    relaxed = SqliteStore(str(tmp_path / "r.db"), schema=_SCHEMA, synchronous="OFF")
    await relaxed.open()
    try:  # a level below NORMAL is never raised
        assert await relaxed.write(_level, sync=False) == 0
        assert await relaxed.write(_level) == 0
    finally:
        await relaxed.aclose()


def test_switching_to_wal_is_retried_while_the_file_is_locked() -> None:
    # A worker process opening a fresh file while another one set it up
    # failed at start: "PRAGMA journal_mode=WAL" -> "database is locked"
    # (SQLite does not wait for the switch with the busy timeout). Seen in a
    # run of test_sigterm_finishes_in_flight_work_and_exits_cleanly on a
    # loaded machine; simulated here.
    import sqlite3

    from transport._runtime.sqlitestore import _use_wal

    class Locked:
        def __init__(self, failures: int) -> None:
            self.failures = failures
            self.statements: list[str] = []

        def execute(self, sql: str) -> Any:
            self.statements.append(sql)
            if self.failures:
                self.failures -= 1
                raise sqlite3.OperationalError("database is locked")
            return self

        def fetchone(self) -> tuple[str]:
            return ("delete",)

    conn = Locked(failures=3)
    _use_wal(conn, within=5.0)  # type: ignore[arg-type]
    assert conn.statements[-1] == "PRAGMA journal_mode=WAL" and conn.failures == 0
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _use_wal(Locked(failures=10_000), within=0.2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("poll_interval=abc", "invalid sqlite option poll_interval='abc': must be a number"),
        ("busy_timeout_ms=1.5", "invalid sqlite option busy_timeout_ms='1.5': must be an integer"),
        ("poll_interval=nan", "invalid sqlite option poll_interval=nan: must be a positive"),
        ("poll_interval=0", "invalid sqlite option poll_interval=0.0: must be a positive"),
        ("busy_timeout_ms=-1", "invalid sqlite option busy_timeout_ms=-1: must be 0 or more"),
    ],
)
async def test_a_bad_sqlite_option_is_named(tmp_path: Path, query: str, error: str) -> None:
    # The error said "bad sqlite option: could not convert string to float:
    # 'abc'" without naming the option (the README: errors name the setting).
    from transport import ConfigurationError, connect

    with pytest.raises(ConfigurationError, match=re.escape(error)):
        await connect(f"sqlite:///{tmp_path / 'x.db'}?{query}")
