"""Small helpers shared by the conformance scenarios."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest

from transport import DeadLetter, Delivery, RequestQueue, WorkRequest


def make_requests(n: int, task: str = "work", **fields: Any) -> list[WorkRequest]:
    return [
        WorkRequest(
            task=task,
            payload={
                "n": i,
                "text": f"request {i} ✓ «ünïcödé»",
                "nested": {"list": [i, None, True]},
            },
            headers={"traceparent": f"00-{i:032x}-{i + 1:016x}-01", "x-seq": str(i)},
            **fields,
        )
        for i in range(n)
    ]


async def enqueue_all(queue: RequestQueue, requests: list[WorkRequest]) -> list[WorkRequest]:
    """Enqueue sequentially (keeps enqueue order for FIFO checks)."""
    return [await queue.enqueue(r) for r in requests]


async def drain(
    queue: RequestQueue, count: int, timeout: float, *, ack: bool = True
) -> list[Delivery]:
    """Poll until ``count`` deliveries arrived or ``timeout`` passed."""
    out: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        delivery = await queue.poll(min(remaining, 1.0))
        if delivery is None:
            continue
        if ack:
            await delivery.ack()
        out.append(delivery)
    return out


async def drain_ids(queue: RequestQueue, wanted: set[str], timeout: float) -> list[Delivery]:
    """Poll (acking everything) until every id in ``wanted`` was delivered or
    ``timeout`` passed; returns all deliveries, the unwanted ones included."""
    out: list[Delivery] = []
    missing = set(wanted)
    deadline = time.monotonic() + timeout
    while missing and (remaining := deadline - time.monotonic()) > 0:
        delivery = await queue.poll(min(remaining, 1.0))
        if delivery is None:
            continue
        await delivery.ack()
        out.append(delivery)
        missing.discard(delivery.request.request_id)
    return out


async def poll_until(
    queue: RequestQueue, request_id: str, timeout: float, *, ack_others: bool = True
) -> Delivery | None:
    """Poll until the delivery of ``request_id`` arrives (acking others)."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        delivery = await queue.poll(min(remaining, 1.0))
        if delivery is None:
            continue
        if delivery.request.request_id == request_id:
            return delivery
        if ack_others:
            await delivery.ack()
    return None


async def poll_either(
    first: RequestQueue, second: RequestQueue, request_id: str, timeout: float
) -> Delivery | None:
    """Poll two queue handles at once until ``request_id`` arrives on
    either (acking others); returns as soon as it does (the other poll is
    cancelled, so the delivery's lease is fresh)."""
    deadline = time.monotonic() + timeout
    polls: dict[asyncio.Future[Delivery | None], RequestQueue] = {}
    found: Delivery | None = None
    try:
        while found is None and (remaining := deadline - time.monotonic()) > 0:
            for queue in (first, second):
                if queue not in polls.values():
                    polls[asyncio.ensure_future(queue.poll(min(remaining, 1.0)))] = queue
            done, _ = await asyncio.wait(polls, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                del polls[task]
                delivery = task.result()
                if delivery is None:
                    continue
                if found is None and delivery.request.request_id == request_id:
                    found = delivery
                else:
                    await delivery.ack()
    finally:
        for task in polls:
            task.cancel()
        for result in await asyncio.gather(*polls, return_exceptions=True):
            if isinstance(result, Delivery):
                await result.ack()  # completed before the cancel landed
    return found


async def await_dead_letters(queue: RequestQueue, n: int, timeout: float) -> list[DeadLetter]:
    """Re-read the dead letters until there are ``n`` or ``timeout`` passes.

    Dead-lettering an undecodable record may complete asynchronously on
    brokers, and no event exposes it. Polls go on meanwhile, as a worker's
    would: where the backend has no single order (several partitions) the
    undecodable records may lie behind requests already handed out, and only
    a poll reaches them. Nothing may be delivered meanwhile (fails the test).
    """
    deadline = time.monotonic() + timeout
    while True:
        dead = await queue.dead_letters()
        if len(dead) >= n or time.monotonic() > deadline:
            return dead
        extra = await queue.poll(0.05)
        assert extra is None, f"delivered although undecodable: {extra.request!r}"


async def expect_nothing(queue: RequestQueue, duration: float) -> Delivery | None:
    """Poll for ``duration``; return the first delivery seen (the test then fails)."""
    return await queue.poll(duration)


async def gather_limited(coros: list[Any], limit: int = 32) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def run(coro: Any) -> Any:
        async with sem:
            return await coro

    return await asyncio.gather(*(run(c) for c in coros))


#: Seconds kept back from a test's timeout for teardown (closing clients,
#: reaping processes), so a scenario's own deadline always fires first.
TEARDOWN_MARGIN = 10.0


def timeout_of_test(request: pytest.FixtureRequest) -> float:
    """The pytest-timeout limit of the running test (its ``timeout`` marker,
    else the ``timeout`` ini option), or infinity when none is set."""
    marker = request.node.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    try:
        value = request.config.getini("timeout")
    except ValueError:  # pytest-timeout not installed
        return math.inf
    return float(value) if value else math.inf


class Budget:
    """One deadline for a whole scenario, below the test's own timeout, so a
    scenario that runs out of time fails with a message saying what was
    missing instead of being killed by pytest-timeout without one."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, cap: float = math.inf) -> float:
        """Seconds left (never negative), at most ``cap``."""
        return max(0.0, min(cap, self.end - time.monotonic()))

    def expired(self) -> bool:
        return time.monotonic() >= self.end
