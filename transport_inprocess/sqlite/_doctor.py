"""``doctor`` for ``sqlite://``: the journal mode and ``synchronous`` level
of the store's connections, and the free disk under the database file.
(Provisioning has nothing to do per object: the schema is shared by every
queue, registry and stream and created when the store opens.)"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

from transport.kit import DoctorFinding, SqliteStore

__all__ = ["sqlite_doctor"]

_POWER_LOSS = "an accepted request, response or event survives power loss or an OS crash"
_CRASH = "an accepted request, response or event survives a crash of the process"
_LEVELS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
#: Below this free space, writes may soon fail (warning, no guarantee void).
LOW_DISK_BYTES = 100 * 1024 * 1024


async def sqlite_doctor(store: SqliteStore, path: str) -> list[DoctorFinding]:
    def pragmas(conn: sqlite3.Connection) -> tuple[str, int]:
        mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        level = int(conn.execute("PRAGMA synchronous").fetchone()[0])
        return mode, level

    mode, level = await store.write(pragmas)
    findings: list[DoctorFinding] = []
    if path == ":memory:":
        findings.append(
            DoctorFinding(
                severity="error",
                subject=path,
                finding="the database lives in this process's memory: nothing survives it",
                fix="sqlite:///path/to/file.db",
                guarantee=_CRASH,
            )
        )
    elif mode in {"off", "memory"}:
        findings.append(
            DoctorFinding(
                severity="error",
                subject=path,
                finding=f"journal_mode={mode}: a crash during a write can corrupt the database",
                fix="let the library set journal_mode=WAL (a file system that supports it; "
                "not a network share)",
                guarantee=_CRASH,
            )
        )
    elif mode != "wal":
        findings.append(
            DoctorFinding(
                severity="warning",
                subject=path,
                finding=f"journal_mode={mode}, not WAL: readers and the writer block each other",
                fix="a local file system where WAL works (not a network share)",
            )
        )
    name = _LEVELS.get(level, str(level))
    if level < 2:
        findings.append(
            DoctorFinding(
                severity="error",
                subject=path,
                finding=f"synchronous={name}: commits acknowledged before they reach the disk"
                # SQLite: with OFF a crash of the process is survived, but an
                # OS crash or power loss can corrupt the file, not only lose
                # the last commits.
                + (" (an OS crash or power loss can also corrupt the file)" if level == 0 else ""),
                fix="synchronous=FULL (the default; remove ?synchronous= from the URL)",
                guarantee=_POWER_LOSS,
            )
        )
    if not findings:
        findings.append(
            DoctorFinding(
                severity="ok",
                subject=path,
                finding=f"journal_mode={mode}, synchronous={name}",
            )
        )
    if path != ":memory:":
        free = await asyncio.to_thread(_free_bytes, path)
        findings.append(
            DoctorFinding(
                severity="warning" if free < LOW_DISK_BYTES else "ok",
                subject=path,
                finding=f"{free / 2**20:.0f} MiB free on its file system",
                fix="free disk space (enqueues fail when the disk is full)"
                if free < LOW_DISK_BYTES
                else "",
            )
        )
    return findings


def _free_bytes(path: str) -> int:
    return shutil.disk_usage(Path(path).expanduser().resolve().parent).free
