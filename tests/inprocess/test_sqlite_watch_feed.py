"""``sqlite://`` keyed-log watchers: changes written by this process (handed
to its watchers from the writing transaction) and by other connections to
the file (read back) reach every watcher once, in order.

Whether a local change avoids the read-back is not asserted: it depends on
the watcher keeping pace with the writer, and a count of change-log reads
(taken by wrapping the store's read) varied from run to run under load."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from transport import CAUGHT_UP, KeyedChange, connect
from transport_inprocess import SqliteTransport


async def _collect(
    log: Any, out: list[tuple[str, bytes | None]], warm: asyncio.Event | None = None
) -> None:
    async for item in log.watch():
        if item is CAUGHT_UP:
            continue
        assert isinstance(item, KeyedChange)
        out.append((item.key, item.value))
        if item.key == "warm" and warm is not None:
            warm.set()
        if item.key == "end":
            return


async def test_local_and_foreign_writes_reach_every_watcher_once_in_order(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    here = await connect(url)
    there = await connect(url)  # another connection to the file: its writes are foreign here
    try:
        assert isinstance(here, SqliteTransport)
        writer = here._open_keyed_log("delivery", "r")
        other_log = here._open_keyed_log("delivery", "other")  # interleaves seq numbers
        foreign = there._open_keyed_log("delivery", "r")
        expected: list[tuple[str, bytes | None]] = []
        seen: list[list[tuple[str, bytes | None]]] = [[], []]
        n = 60
        warm = [asyncio.Event(), asyncio.Event()]
        watchers = [
            asyncio.create_task(_collect(here._open_keyed_log("delivery", "r"), out, event))
            for out, event in zip(seen, warm, strict=True)
        ]
        # A first change that both watchers have received: past their
        # snapshot and first read, they now wait for the next change.
        await writer.put("warm", b"")
        expected.append(("warm", b""))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in warm)), 10)
        state: dict[str, bytes] = {}
        for i in range(n):
            key = f"k{i % 7}"
            if i % 10 == 9:
                await foreign.put(key, b"f%d" % i)
                expected.append((key, b"f%d" % i))
                state[key] = b"f%d" % i
            elif i % 10 == 5:
                await writer.delete(key)
                if state.pop(key, None) is not None:  # deleting a missing key is no change
                    expected.append((key, None))
            else:
                await writer.put(key, b"%d" % i)
                expected.append((key, b"%d" % i))
                state[key] = b"%d" % i
            await other_log.put("x", b"%d" % i)
            if i % 3 == 0:
                await asyncio.sleep(0)  # let the watchers run at varying points
        await writer.put("end", b"")
        expected.append(("end", b""))
        await asyncio.wait_for(asyncio.gather(*watchers), 30)
        assert seen[0] == expected
        assert seen[1] == expected
    finally:
        await there.aclose()
        await here.aclose()
