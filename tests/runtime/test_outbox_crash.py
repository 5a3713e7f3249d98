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
from transport import Outbox, RequestQueue, WorkRequest, connect
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


@pytest.mark.timeout(180)
async def test_an_outbox_killed_while_draining_loses_nothing_and_keeps_order(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    path = tmp_path / "outbox.db"
    total = 3000
    transport = await connect(url)
    try:
        unreachable = Outage(transport.request_queue("orders"))
        unreachable.failed_while_down = -(10**9)  # never comes back
        holding = Outbox(
            transport, path, retry_wait=wait_fixed(60), queue_factory=lambda n, lv: unreachable
        )
        async with holding:
            for i in range(total):
                await holding.enqueue("orders", WorkRequest(task="t", payload=i))
            assert await holding.depth() == total
        queue = transport.request_queue("orders")
        kills = 0
        for threshold in (300, 1200, 2100):
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _DRAINER,
                url,
                str(path),
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                assert child.stdout is not None
                line = await asyncio.wait_for(child.stdout.readline(), 60)
                assert line.strip() == b"DRAINING", line
                # Another process fills the queue: no event to wait on here.
                async with asyncio.timeout(60):
                    while await _depth(queue) < threshold:  # noqa: ASYNC110
                        await asyncio.sleep(0.005)
            finally:
                child.send_signal(signal.SIGKILL)
                await child.wait()
            kills += 1
        async with Outbox(transport, path) as last:
            await last.flush(timeout=120)
        received: list[int] = []
        while (delivery := await queue.poll(0.2)) is not None:
            received.append(delivery.request.payload)
            await delivery.ack()
    finally:
        await transport.aclose()
    assert set(received) == set(range(total)), "lost"
    duplicates = len(received) - total
    assert 0 <= duplicates <= kills * DRAIN_BATCH, duplicates
    first_seen: list[int] = []
    seen: set[int] = set()
    for i in received:
        if i not in seen:
            seen.add(i)
            first_seen.append(i)
    assert first_seen == list(range(total)), "out of order"
