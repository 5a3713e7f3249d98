"""A subscription's inbox is bounded: a reader that does not keep up loses
the oldest events (the bus is at most once), not the process's memory."""

from __future__ import annotations

import asyncio
import logging

import pytest

from transport import connect
from transport._spi import events
from transport.kit import EventInbox


async def test_past_its_limit_the_inbox_drops_the_oldest_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inbox = EventInbox("subscription 'a.*'", limit=3)
    with caplog.at_level(logging.WARNING, logger="transport.events"):
        for i in range(10):
            inbox.put_nowait(i)
    assert inbox.qsize() == 3 and inbox.dropped == 7
    assert [await inbox.get() for _ in range(3)] == [7, 8, 9]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "subscription 'a.*' is 3 events behind" in warnings[0]


async def test_a_memory_subscriber_that_does_not_read_keeps_the_newest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Unbounded before: 150,000 unread 1 KB events took 180 MB (390 MB on NATS).
    monkeypatch.setattr(events, "SUBSCRIPTION_BUFFER", 50)
    transport = await connect("memory://inbox-bound")
    try:
        bus = transport.event_bus()
        sub = await bus.subscribe("orders.*")
        for i in range(200):
            await bus.publish("orders.new", i)
        for _ in range(3):
            await asyncio.sleep(0)  # the hand-offs into the subscriber's loop
        got = [await sub.next(1) for _ in range(50)]
        assert [e.data for e in got if e is not None] == list(range(150, 200))
        assert await sub.next(0.05) is None
        await sub.aclose()
    finally:
        await transport.aclose()
