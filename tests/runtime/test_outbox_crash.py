"""An outbox process killed (SIGKILL) while it drains: nothing stored is
lost, the line stays in order, and each kill sends at most one batch of
requests again (the rows sent but not yet deleted)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from tenacity import wait_fixed

from tests.runtime.test_outbox import Outage
from transport import Outbox, OutboxFile, RequestQueue, Transport, WorkRequest, connect
from transport._runtime.outbox import DRAIN_BATCH

pytestmark = [pytest.mark.asyncio, pytest.mark.crash]

#: The draining process: an outbox on the file, sending to the queue.
_DRAINER = textwrap.dedent(
    """
    import asyncio, sys
    from transport import Outbox, connect

    async def main(url, path):
        transport = await connect(url)
        async with Outbox(transport, path):
            print("DRAINING", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def _depth(queue: RequestQueue) -> int:
    return (await queue.stats()).depth or 0


async def _hold(transport: Transport, path: Path, total: int) -> None:
    """``total`` requests for queue ``orders`` stored in the outbox file at
    ``path`` by an outbox whose broker never answered."""
    unreachable = Outage(transport.request_queue("orders"))
    unreachable.failed_while_down = -(10**9)  # never comes back
    holding = Outbox(
        transport, path, retry_wait=wait_fixed(60), queue_factory=lambda n, lv: unreachable
    )
    async with holding:
        for i in range(total):
            await holding.enqueue("orders", WorkRequest(task="t", payload=i))
        assert await holding.depth() == total


async def _drainer_process(url: str, path: Path) -> asyncio.subprocess.Process:
    """A process draining the outbox at ``path`` into ``url`` (once it said so)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DRAINER,
        url,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), 60)
    assert line.strip() == b"DRAINING", line
    return child


async def _until_depth(queue: RequestQueue, depth: int) -> None:
    # Another process fills the queue: no event to wait on here.
    async with asyncio.timeout(60):
        while await _depth(queue) < depth:  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def _received(queue: RequestQueue) -> list[int]:
    received: list[int] = []
    while (delivery := await queue.poll(0.2)) is not None:
        received.append(delivery.request.payload)
        await delivery.ack()
    return received


def _check(received: list[int], total: int, max_duplicates: int) -> None:
    """Nothing lost, at most ``max_duplicates`` again, first-seen order kept."""
    assert set(received) == set(range(total)), "lost"
    duplicates = len(received) - total
    assert 0 <= duplicates <= max_duplicates, duplicates
    first_seen: list[int] = []
    seen: set[int] = set()
    for i in received:
        if i not in seen:
            seen.add(i)
            first_seen.append(i)
    assert first_seen == list(range(total)), "out of order"


@pytest.mark.timeout(180)
async def test_an_outbox_killed_while_draining_loses_nothing_and_keeps_order(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    path = tmp_path / "outbox.db"
    total = 3000
    transport = await connect(url)
    try:
        await _hold(transport, path, total)
        queue = transport.request_queue("orders")
        kills = 0
        for threshold in (300, 1200, 2100):
            child = await _drainer_process(url, path)
            try:
                await _until_depth(queue, threshold)
            finally:
                child.send_signal(signal.SIGKILL)
                await child.wait()
            kills += 1
        async with Outbox(transport, path) as last:
            await last.flush(timeout=120)
        received = await _received(queue)
    finally:
        await transport.aclose()
    _check(received, total, kills * DRAIN_BATCH)


@pytest.mark.timeout(180)
async def test_a_second_process_on_the_file_stands_by_and_takes_over_from_a_killed_one(
    tmp_path: Path,
) -> None:
    # Two replicas with one outbox file: while one drains, the other must
    # not (both draining sent every row twice, out of order); when the one
    # draining is killed, the other takes the line over.
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    path = tmp_path / "outbox.db"
    total = 6000
    transport = await connect(url)
    children: list[asyncio.subprocess.Process] = []
    try:
        await _hold(transport, path, total)
        queue = transport.request_queue("orders")
        active = await _drainer_process(url, path)
        children.append(active)
        await _until_depth(queue, 300)
        children.append(await _drainer_process(url, path))  # the second replica
        # Both run for a while (~900 requests) before the one draining is killed.
        kill_at = await _depth(queue) + 900
        assert kill_at < total - 500, "the first drainer finished before the second started"
        await _until_depth(queue, kill_at)
        active.send_signal(signal.SIGKILL)
        await active.wait()
        async with OutboxFile(path) as box, asyncio.timeout(90):
            while sum((await box.depth()).values()):  # noqa: ASYNC110 - drained elsewhere
                await asyncio.sleep(0.05)
        received = await _received(queue)
    finally:
        for child in children:
            if child.returncode is None:
                child.send_signal(signal.SIGKILL)
                await child.wait()
        await transport.aclose()
    _check(received, total, DRAIN_BATCH)  # only the killed one's last batch again
