"""The tables of ``sqlite://`` (queues, dead letters, keyed logs, the event
log) and the one-time migration of files written before namespaces."""

from __future__ import annotations

import sqlite3

from transport import TransportConfig

__all__ = ["EVENTS_SCHEMA", "SCHEMA", "adopt_unscoped"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    seq INTEGER NOT NULL,
    request_id TEXT,
    body BLOB NOT NULL,
    available_at REAL NOT NULL,
    token INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS messages_order ON messages(queue, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    request_id TEXT,
    body BLOB NOT NULL,
    decodable INTEGER NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    dead_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_queue ON dead_letters(queue, id);
CREATE TABLE IF NOT EXISTS kv (
    log TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (log, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    log TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS kv_changes_log ON kv_changes(log, seq);
"""

EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    key TEXT,
    body BLOB NOT NULL,
    appended_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_stream ON events(stream, id);
CREATE INDEX IF NOT EXISTS events_time ON events(stream, appended_at);
CREATE TABLE IF NOT EXISTS event_cursors (
    stream TEXT NOT NULL,
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (stream, name)
) WITHOUT ROWID;
"""


_SCOPED_COLUMNS = (
    ("messages", "queue"),
    ("dead_letters", "queue"),
    ("kv", "log"),
    ("kv_changes", "log"),
    ("events", "stream"),
    ("event_cursors", "stream"),
)


def adopt_unscoped(conn: sqlite3.Connection) -> None:
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
