"""``memory://`` wake-ups: same-loop wakes skip the thread-safe path, waiters
never pile up, and a poller on another thread's loop is still woken."""

from __future__ import annotations

import asyncio
import threading
import uuid

from transport import WorkRequest, connect
from transport_inprocess import MemoryRequestQueue, reset_memory


async def _until_waiting(queue: MemoryRequestQueue, count: int = 1, timeout: float = 5.0) -> None:
    """Wait until ``count`` pollers are parked on the queue (its waiter list)."""
    # The waiter list has no event of its own: yield until it has grown.
    async with asyncio.timeout(timeout):
        while len(queue._state.waiters) < count:  # noqa: ASYNC110
            await asyncio.sleep(0)


async def test_waiters_are_removed_after_timeout_and_after_wake() -> None:
    name = f"wake-{uuid.uuid4().hex[:8]}"
    transport = await connect(f"memory://{name}")
    try:
        queue = transport.request_queue("q")
        assert isinstance(queue, MemoryRequestQueue)
        for _ in range(3):
            assert await queue.poll(0.01) is None
        assert not queue._state.waiters
        poller = asyncio.create_task(queue.poll(5))
        await _until_waiting(queue)
        assert len(queue._state.waiters) == 1
        await queue.enqueue(WorkRequest(task="t"))
        delivery = await asyncio.wait_for(poller, 5)
        assert delivery is not None
        assert await delivery.ack()
        assert not queue._state.waiters
    finally:
        await transport.aclose()
        reset_memory(name)


async def test_a_poller_on_another_threads_loop_is_woken() -> None:
    name = f"wake-{uuid.uuid4().hex[:8]}"
    transport = await connect(f"memory://{name}")
    queue = transport.request_queue("q")
    polling = threading.Event()
    got: list[str | None] = []

    async def other() -> None:
        remote = await connect(f"memory://{name}")
        try:
            remote_queue = remote.request_queue("q")
            assert isinstance(remote_queue, MemoryRequestQueue)
            task = asyncio.create_task(remote_queue.poll(10))
            await _until_waiting(remote_queue)  # parked: the enqueue must wake it
            polling.set()
            delivery = await task
            got.append(None if delivery is None else delivery.request.request_id)
            if delivery is not None:
                await delivery.ack()
        finally:
            await remote.aclose()

    thread = threading.Thread(target=asyncio.run, args=(other(),))
    thread.start()
    try:
        await asyncio.to_thread(polling.wait, 10)
        request = await queue.enqueue(WorkRequest(task="t"))
        await asyncio.to_thread(thread.join, 15)
        assert got == [request.request_id]
    finally:
        await transport.aclose()
        reset_memory(name)
