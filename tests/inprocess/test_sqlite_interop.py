"""Python's ``sqlite3`` module on the database file of ``sqlite://``, as
docs/wire.md describes it: a request row INSERTed into ``messages``
(``queue`` = ``NS/Q``, the next ``seq`` of that queue, ``request_id``,
``body``, ``available_at``), after its registration (a ``pending``
``DeliveryRecord`` INSERTed into ``kv`` and ``kv_changes``, ``log`` =
``NS/delivery:R``, ``key`` = ``p.<request id>``), is answered by an
``Ensemble``; the completed ``DeliveryRecord`` is SELECTed from ``kv``
(``key`` = ``c.<request id>``) and the ensemble's ``Capability`` from ``kv`` (``log`` =
``NS/capability:capabilities``, ``key`` = ``<ensemble>.<name>``).

(tests/test_wire_schemas.py reads what the library writes to the file, and
the conformance suite's foreign-message scenarios insert bodies with
``sqlite3``; neither has an ensemble answer a request another program wrote.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path

from tests._interop import (
    ENSEMBLE,
    REPLY_TO,
    TASK,
    check_capability,
    check_completed,
    foreign_payload,
    foreign_registration,
    foreign_request,
    foreign_request_id,
    kitchen,
    registration_key,
    response_key,
)
from transport import TransportConfig, connect

WAIT_S = 30.0
#: How often the foreign reader looks at the file: SQLite tells another
#: connection nothing when a row changes, so a plain reader can only look again.
LOOK_EVERY_S = 0.02


def _connect(path: Path) -> contextlib.closing[sqlite3.Connection]:
    # A generous busy timeout: the library's process writes to the file too.
    return contextlib.closing(sqlite3.connect(path, timeout=WAIT_S))


def _insert_request(path: Path, queue: str, request_id: str, body: bytes) -> int:
    """The row another program writes: the queue's next ``seq``, due now."""
    with _connect(path) as conn, conn:
        cursor = conn.execute(
            "INSERT INTO messages(queue, seq, request_id, body, available_at) VALUES"
            " (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE queue = ?), ?, ?, ?)",
            (queue, queue, request_id, body, time.time()),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid


def _register(path: Path, log: str, key: str, value: bytes) -> None:
    """A registration as another program writes it: the row in ``kv`` and,
    for the registry's watchers, the change in ``kv_changes``."""
    with _connect(path) as conn, conn:
        conn.execute("INSERT INTO kv(log, key, value) VALUES (?, ?, ?)", (log, key, value))
        conn.execute(
            "INSERT INTO kv_changes(log, key, value, at) VALUES (?, ?, ?, ?)",
            (log, key, value, time.time()),
        )


def _value(path: Path, log: str, key: str) -> bytes | None:
    with _connect(path) as conn:
        row = conn.execute("SELECT value FROM kv WHERE log = ? AND key = ?", (log, key)).fetchone()
    return None if row is None else bytes(row[0])


def _wait_completed(path: Path, log: str, key: str) -> bytes:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = _value(path, log, key)
        if value is not None and json.loads(value)["state"] == "completed":
            return value
        time.sleep(LOOK_EVERY_S)
    raise AssertionError(f"no completed record of {key!r} in {log!r} within {WAIT_S:g} s")


async def test_sqlite3_request_is_answered_by_an_ensemble(tmp_path: Path) -> None:
    path = tmp_path / "interop.db"
    ns = "eu_ops"
    config = TransportConfig(url=f"sqlite:///{path}", namespace=ns, options={"poll_interval": 0.02})
    request_id = foreign_request_id()
    payload = foreign_payload("sqlite3")
    async with await connect(config) as transport, kitchen(transport).serving():
        await asyncio.to_thread(
            _register,
            path,
            f"{ns}/delivery:{REPLY_TO}",
            registration_key(request_id),
            foreign_registration(request_id),
        )
        row_id = await asyncio.to_thread(
            _insert_request,
            path,
            f"{ns}/{ENSEMBLE}",
            request_id,
            foreign_request(request_id, payload),
        )
        value = await asyncio.to_thread(
            _wait_completed, path, f"{ns}/delivery:{REPLY_TO}", response_key(request_id)
        )
        check_completed(value, request_id, payload)

        advertised = await asyncio.to_thread(
            _value, path, f"{ns}/capability:capabilities", f"{ENSEMBLE}.{TASK}"
        )
        assert advertised is not None, "no capability row for kitchen.cook"
        check_capability(advertised)

    # Answered, then acked: the row is gone, and nothing was dead-lettered.
    with _connect(path) as conn:
        assert conn.execute("SELECT id FROM messages WHERE id = ?", (row_id,)).fetchall() == []
        assert conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone() == (0,)
