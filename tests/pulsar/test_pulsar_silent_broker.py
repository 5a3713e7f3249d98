"""A broker that goes silent with its connection open (SIGSTOP: hung, or cut
off by a network partition) is an outage to a poll, not an empty queue."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._silent import seconds_until_polls_raise
from transport import TransientTransportError, connect
from transport.testing.brokers import PulsarLiteBroker

from .conftest import ON_PULSAR_LITE

pytestmark = [pytest.mark.broker, pytest.mark.timeout(150)]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PulsarLiteBroker]:
    """A broker of the test's own, to pause."""
    if not ON_PULSAR_LITE:
        pytest.skip("pauses a pulsar-lite broker of its own")
    started = PulsarLiteBroker(tmp_path / "pulsar-lite")
    started.start()
    try:
        yield started
    finally:
        started.close()


async def test_polls_raise_once_a_silent_broker_misses_a_lookup(broker: PulsarLiteBroker) -> None:
    # The consumer says "connected" until the client's keepalive gives up:
    # poll(2) answered "empty" 29 times in a row (60 s), and poll(None)
    # never raised.
    transport = await connect(broker.url)
    try:
        queue = transport.request_queue("silent")
        took, empty = await seconds_until_polls_raise(queue, broker, poll=2, within=40)
        # A lookup every 5 s, unanswered after 5 s, then the poll's end.
        assert took < 15, f"{empty} empty polls over {took:.1f} s"
        async with asyncio.timeout(60):
            while True:  # the client reconnects: polls may raise meanwhile
                try:
                    got = await queue.poll(5)
                except TransientTransportError:
                    await asyncio.sleep(0.2)  # retry pacing
                    continue
                break
        assert got is None  # nothing was enqueued meanwhile: empty, and says so
    finally:
        await transport.aclose()
