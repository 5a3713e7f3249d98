"""How a priority queue asks its levels for their heads."""

from __future__ import annotations

import asyncio
from typing import Any

from transport import WorkRequest, connect


async def test_empty_levels_are_asked_for_their_head_at_once_not_one_after_the_other() -> None:
    """A level's "nothing now" costs a broker round trip or more (a NATS
    pull held 20 ms): asked level by level, a queue with work only at its
    lowest level paid it once per empty level on every poll (43 ms a poll
    on NATS with three levels). Here each empty level's ``poll(0)`` waits
    until the other one has been asked too: asked one after the other,
    the first would wait for ever."""
    async with await connect("memory://levels") as transport:
        queue = transport.priority_queue("orders", levels=3)
        sent = await queue.enqueue(WorkRequest(task="t"), 2)
        both_asked = asyncio.Event()
        asked: list[int] = []
        for level in (0, 1):
            level_queue: Any = queue._queues[level]  # type: ignore[attr-defined]
            poll = level_queue.poll

            async def asking(timeout: float | None = None, *, _lv: int = level, _poll: Any = poll):
                asked.append(_lv)
                if len(asked) == 2:
                    both_asked.set()
                async with asyncio.timeout(5):
                    await both_asked.wait()
                return await _poll(timeout)

            level_queue.poll = asking
        delivery = await queue.poll(1)
        assert sorted(asked) == [0, 1]
        assert delivery is not None and delivery.request.request_id == sent.request_id
        assert await delivery.ack()
        await queue.aclose()
