"""For tests that pause a broker (SIGSTOP): its connections stay open and go
silent, as in a network partition or a hung server."""

from __future__ import annotations

import asyncio

import pytest

from transport import RequestQueue, TransientTransportError, WorkRequest
from transport.testing.brokers import BrokerProcess


async def seconds_until_polls_raise(
    queue: RequestQueue, broker: BrokerProcess, *, poll: float, within: float
) -> tuple[float, int]:
    """Serve one request, pause ``broker``, then ``poll(poll)`` (each must
    answer "empty") until one raises ``TransientTransportError``, for at most
    ``within`` seconds (else the test fails); resumes the broker. Returns the
    seconds from the pause to the raise and the empty answers before it."""
    sent = await queue.enqueue(WorkRequest(task="before"))
    got = await queue.poll(10)
    assert got is not None and got.request.request_id == sent.request_id
    assert await got.ack()
    loop = asyncio.get_running_loop()
    broker.pause()
    try:
        paused = loop.time()
        empty = 0
        with pytest.raises(TransientTransportError):
            async with asyncio.timeout(within):
                while True:
                    assert await queue.poll(poll) is None
                    empty += 1
        return loop.time() - paused, empty
    finally:
        broker.resume()
