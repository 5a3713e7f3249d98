"""``sqlite://`` keyed-log watchers: a change written by this process reaches
its watchers from the writing transaction (no read back after the commit),
while changes written by other connections to the file are still read; every
watcher sees every change once, in order."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

from transport import CAUGHT_UP, KeyedChange, connect
from transport_inprocess import SqliteTransport


async def _collect(log: Any, out: list[tuple[str, bytes | None]]) -> None:
    async for item in log.watch():
        if item is CAUGHT_UP:
            continue
        assert isinstance(item, KeyedChange)
        out.append((item.key, item.value))
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
        changes_reads = 0
        read = here._store.read

        async def counting_read(fn: Any) -> Any:
            nonlocal changes_reads
            if isinstance(fn, functools.partial) and fn.func.__name__ == "_changes_op":
                changes_reads += 1
            return await read(fn)

        here._store.read = counting_read  # type: ignore[method-assign]
        expected: list[tuple[str, bytes | None]] = []
        seen: list[list[tuple[str, bytes | None]]] = [[], []]
        n = 60
        watchers = [
            asyncio.create_task(_collect(here._open_keyed_log("delivery", "r"), out))
            for out in seen
        ]
        await asyncio.sleep(0.05)  # both caught up
        reads_before = changes_reads
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
        # Most local changes arrived without reading them back.
        assert changes_reads - reads_before < n // 2
    finally:
        await there.aclose()
        await here.aclose()
