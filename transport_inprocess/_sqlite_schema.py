"""The tables of ``sqlite://`` queues, dead letters and keyed logs (the
event log's tables are in :mod:`transport_inprocess._sqlite_events`)."""

from __future__ import annotations

__all__ = ["SCHEMA"]

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
