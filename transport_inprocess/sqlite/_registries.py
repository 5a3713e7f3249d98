"""``SqliteKeyedLog``: the keyed log behind both registries -- a table of
current values (``kv``) plus a change log (``kv_changes``) that watchers
tail. A write by this process hands its watchers the changes its own
transaction read (no read-back); other processes' writes are noticed within
``poll_interval``.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence

from transport import CAUGHT_UP, KeyedChange, KeyedLog
from transport.errors import TransientTransportError
from transport_inprocess.sqlite._client import SqliteContext, _Feed, _LogWatchers

__all__ = ["SqliteKeyedLog"]

_CHANGE_RETENTION_S = 3600.0
_FEED_MAX_BEHIND = 256
_SNAPSHOT_PAGE = 2000  # keys read per step of a watcher's first snapshot


class SqliteKeyedLog(KeyedLog):
    """A table (current state) plus a change log that watchers tail."""

    def __init__(self, ctx: SqliteContext, name: str) -> None:
        self._ctx = ctx
        self._store = ctx.store
        self._name = name
        self._watchers = ctx.log_watchers.setdefault(name, _LogWatchers())

    async def put(self, key: str, value: bytes) -> None:
        self._publish(await self._store.write(lambda conn: self._put_op(conn, key, value)))

    def _publish(self, feed: _Feed | None) -> None:
        # After the commit: a feed built by a transaction that did not commit
        # is never shown.
        watchers = self._watchers
        watchers.writes += 1
        if feed is not None:
            feed.writes = watchers.writes
            watchers.feed = feed
        self._ctx.signals.notify(f"kv:{self._name}")

    def _put_op(self, conn: sqlite3.Connection, key: str, value: bytes | None) -> _Feed | None:
        now = time.time()
        if value is None:
            cur = conn.execute("DELETE FROM kv WHERE log = ? AND key = ?", (self._name, key))
            if cur.rowcount == 0:
                return None
        else:
            conn.execute(
                "INSERT OR REPLACE INTO kv(log, key, value) VALUES (?, ?, ?)",
                (self._name, key, value),
            )
        seq = conn.execute(
            "INSERT INTO kv_changes(log, key, value, at) VALUES (?, ?, ?, ?)",
            (self._name, key, value, now),
        ).lastrowid
        if seq is not None and seq % 512 == 0:
            conn.execute("DELETE FROM kv_changes WHERE at < ?", (now - _CHANGE_RETENTION_S,))
        positions = self._watchers.positions
        if seq is None or not positions:
            return None
        # Hand this process's watchers the changes they have not seen, so they
        # need not read them back after the commit (only when they are close
        # behind: a lagging watcher reads its changes itself).
        try:
            after = min(positions.values())
        except (RuntimeError, ValueError):  # a watcher came or went meanwhile
            return None
        if seq - after > _FEED_MAX_BEHIND:
            return None
        try:
            rows = self._changes_op(conn, after)
        except TransientTransportError:  # pruned: the watchers re-snapshot
            return None
        if not rows or rows[-1][0] != seq:  # not complete up to this change
            return None
        return _Feed(after, seq, rows)

    async def delete(self, key: str) -> None:
        await self.delete_many((key,))

    async def delete_many(self, keys: Sequence[str]) -> None:
        """One transaction for all of them."""
        feeds = await self._store.write(lambda conn: [self._put_op(conn, k, None) for k in keys])
        for feed in feeds:
            self._publish(feed)

    atomic_claims = True

    async def claim(
        self, key: str, also: Sequence[str] = (), *, position: bytes | None = None
    ) -> bool:
        """In one write transaction (the file's lock): one claimant wins."""

        def op(conn: sqlite3.Connection) -> list[_Feed | None] | None:
            held = conn.execute(
                "SELECT 1 FROM kv WHERE log = ? AND key = ?", (self._name, key)
            ).fetchone()
            if held is None:
                return None
            return [self._put_op(conn, k, None) for k in (key, *also)]

        feeds = await self._store.write(op)
        if feeds is None:
            return False
        for feed in feeds:
            self._publish(feed)
        return True

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One read for all of them."""

        def op(conn: sqlite3.Connection) -> list[bytes | None]:
            out: list[bytes | None] = []
            for key in keys:
                row = conn.execute(
                    "SELECT value FROM kv WHERE log = ? AND key = ?", (self._name, key)
                ).fetchone()
                out.append(None if row is None else bytes(row[0]))
            return out

        return await self._store.read(op)

    async def get(self, key: str) -> bytes | None:
        return (await self.get_many((key,)))[0]

    def _page_op(self, conn: sqlite3.Connection, after: str | None) -> list[tuple[str, bytes]]:
        """The next ``_SNAPSHOT_PAGE`` keys of the log after key ``after``."""
        rows = conn.execute(
            "SELECT key, value FROM kv WHERE log = ? AND key > ? ORDER BY key LIMIT ?",
            (self._name, "" if after is None else after, _SNAPSHOT_PAGE),
        ).fetchall()
        return [(k, bytes(v)) for k, v in rows]

    def _changes_op(
        self, conn: sqlite3.Connection, after: int
    ) -> list[tuple[int, str, bytes | None]]:
        lowest = conn.execute("SELECT MIN(seq) FROM kv_changes").fetchone()[0]
        if lowest is not None and lowest > after + 1 and after > 0:
            # Rows after our position were pruned: we may have missed changes.
            first_ours = conn.execute(
                "SELECT 1 FROM kv_changes WHERE seq <= ? LIMIT 1", (after,)
            ).fetchone()
            if first_ours is None:
                raise TransientTransportError("change log pruned past this watcher; re-snapshot")
        rows = conn.execute(
            "SELECT seq, key, value FROM kv_changes WHERE log = ? AND seq > ? ORDER BY seq LIMIT 1000",
            (self._name, after),
        ).fetchall()
        return [(s, k, None if v is None else bytes(v)) for s, k, v in rows]

    async def watch(self) -> AsyncIterator[KeyedChange | object]:
        # The snapshot is read a page at a time (a registry may hold hundreds
        # of thousands of keys): what changes meanwhile is in the change log
        # after ``last``, read next, and applying a change twice is harmless.
        last = await self._store.read(
            lambda conn: int(
                conn.execute("SELECT COALESCE(MAX(seq), 0) FROM kv_changes").fetchone()[0]
            )
        )
        after: str | None = None
        while True:
            page = await self._store.read(functools.partial(self._page_op, after=after))
            for key, value in page:
                yield KeyedChange(key, value)
            if len(page) < _SNAPSHOT_PAGE:
                break
            after = page[-1][0]
        caught = await self._store.read(functools.partial(self._changes_op, after=last))
        while caught:
            for seq, key, change in caught:
                yield KeyedChange(key, change)
                last = seq
            caught = await self._store.read(functools.partial(self._changes_op, after=last))
        yield CAUGHT_UP
        interval = 0.002
        signal = f"kv:{self._name}"
        me = object()
        positions = self._watchers.positions
        positions[me] = last
        fed = -1  # up to date as of this process's write number ``fed`` to the log
        try:
            while True:
                feed = self._watchers.feed
                if feed is not None and feed.after <= last < feed.upto:
                    # This process wrote the latest change: its transaction
                    # already read what this watcher has not seen.
                    changes = [row for row in feed.rows if row[0] > last]
                    upto, fed = feed.upto, feed.writes
                elif fed == self._watchers.writes:  # no local write since: wait
                    changes, upto, fed = [], last, -1
                else:
                    changes = await self._store.read(
                        functools.partial(self._changes_op, after=last)
                    )
                    upto = changes[-1][0] if changes else last
                for _seq, key, change in changes:
                    yield KeyedChange(key, change)
                if upto > last:
                    last = positions[me] = upto
                    interval = 0.002
                    continue
                await self._ctx.signals.wait(signal, interval)
                interval = min(interval * 2, self._ctx.poll_interval)
        finally:
            positions.pop(me, None)

    async def aclose(self) -> None:
        return None
