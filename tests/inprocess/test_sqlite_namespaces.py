"""``sqlite://`` specifics of namespaces and shutdown: files written before
names were stored per namespace, and the wake-up wait that watch loops use."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from transport import TransportConfig, WorkRequest, connect, encode
from transport_inprocess.sqlite._client import _Signals
from transport_inprocess.sqlite._schema import EVENTS_SCHEMA, SCHEMA

pytestmark = pytest.mark.asyncio


def _old_file(path: Path, request: WorkRequest) -> None:
    """A file as the library wrote it before namespaces: unscoped names,
    ``user_version`` 0."""
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA + EVENTS_SCHEMA)
        conn.execute(
            "INSERT INTO messages(queue, seq, request_id, body, available_at)"
            " VALUES ('orders', 1, ?, ?, 0)",
            (request.request_id, encode(request)),
        )
        conn.execute(
            "INSERT INTO kv(log, key, value) VALUES ('capability:capabilities', 'k', x'00')"
        )
        conn.execute(
            "INSERT INTO events(stream, key, body, appended_at) VALUES ('audit', NULL, '{}', 0)"
        )


async def test_rows_of_a_file_written_before_namespaces_join_the_default_namespace(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    old = WorkRequest(task="legacy", payload={"n": 1})
    _old_file(path, old)
    other = await connect(TransportConfig(url=f"sqlite:///{path}", namespace="other"))
    default = await connect(TransportConfig(url=f"sqlite:///{path}"))
    try:
        assert await other.request_queue("orders").poll(0.2) is None
        delivery = await default.request_queue("orders").poll(5)
        assert delivery is not None and delivery.request.request_id == old.request_id
        assert await delivery.ack()
    finally:
        await other.aclose()
        await default.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert conn.execute("SELECT log FROM kv").fetchall() == [
            ("agentensemble/capability:capabilities",)
        ]
        assert conn.execute("SELECT stream FROM events").fetchall() == [("agentensemble/audit",)]


async def test_wakeup_wait_keeps_a_cancellation_that_races_a_notification() -> None:
    # asyncio.run's shutdown cancels a watch loop while this process's own
    # write notifies it: the cancellation must win, or the loop runs on and
    # the interpreter never exits.
    signals = _Signals()
    waiter = asyncio.create_task(signals.wait("kv:x", 30))
    await asyncio.sleep(0)  # the task is waiting now
    signals.notify("kv:x")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
