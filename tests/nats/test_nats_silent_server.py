"""A server that goes silent with its connection open (SIGSTOP: hung, or
cut off by a network partition) is an outage, not an empty queue."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._silent import seconds_until_polls_raise
from transport import TransientTransportError, WorkRequest, connect
from transport.testing.brokers import NatsServer

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own, to pause."""
    if os.environ.get("NATS_URL"):
        pytest.skip("pauses a server of its own")
    started = NatsServer(tmp_path / "nats")
    started.start()
    try:
        yield started
    finally:
        started.close()


async def test_polls_raise_once_a_silent_server_misses_its_pings(server: NatsServer) -> None:
    # With nats-py's defaults (a PING every 120 s, 2 unanswered allowed),
    # poll(5) answered "empty" 71 times over 6 minutes before raising.
    transport = await connect(server.url, options={"ping_interval": 1, "max_outstanding_pings": 2})
    try:
        queue = transport.request_queue("silent")
        took, empty = await seconds_until_polls_raise(queue, server, poll=1, within=30)
        # Three missed PINGs a second apart, then the next poll.
        assert took < 10, f"{empty} empty polls over {took:.1f} s"
        after: WorkRequest | None = None
        async with asyncio.timeout(30):
            while True:  # reconnecting: calls raise until it is back
                try:
                    if after is None:
                        after = await queue.enqueue(WorkRequest(task="after"))
                    got = await queue.poll(5)
                except TransientTransportError:
                    await asyncio.sleep(0.2)  # retry pacing
                    continue
                if got is not None:
                    break
        assert got.request.request_id == after.request_id
        assert await got.ack()
    finally:
        await transport.aclose()


async def test_an_enqueue_to_a_silent_server_gives_up_within_its_retry_window(
    server: NatsServer,
) -> None:
    # Each attempt waits request_timeout for its PubAck. The last one got
    # its whole request_timeout beyond enqueue_retry_seconds: 15.5 s with
    # the defaults (10 and 5), where the README promises 11.
    transport = await connect(
        server.url, options={"enqueue_retry_seconds": 2, "request_timeout": 1.5}
    )
    try:
        queue = transport.request_queue("silent-enqueue")
        await queue.enqueue(WorkRequest(task="before"))  # streams made
        loop = asyncio.get_running_loop()
        server.pause()
        try:
            started = loop.time()
            with pytest.raises(TransientTransportError):
                await queue.enqueue(WorkRequest(task="during"))
            took = loop.time() - started
        finally:
            server.resume()
        assert took < 2 + 0.5, f"enqueue raised after {took:.1f} s"
    finally:
        await transport.aclose()
