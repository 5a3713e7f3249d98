from __future__ import annotations

import pytest

from transport import CAUGHT_UP, KeyedChange, WorkRequest
from transport_pulsar import PulsarTransport

from .conftest import PulsarHarness

pytestmark = pytest.mark.asyncio


async def test_round_trip_ack_nack(transport_harness: PulsarHarness) -> None:
    t = await transport_harness.connect()
    try:
        q = t.request_queue("smoke", lease_seconds=1.0, max_attempts=2)
        r = await q.enqueue(WorkRequest(task="x", payload={"a": 1}))
        d = await q.poll(5)
        assert d is not None and d.request.request_id == r.request_id and d.attempt == 1
        assert await d.nack(error="e1")
        d2 = await q.poll(5)
        assert d2 is not None and d2.attempt == 2
        assert await d2.nack()
        dead = await q.dead_letters()
        assert len(dead) == 1 and dead[0].error == "e1"
        assert await q.requeue_dead_letters() == 1
        d3 = await q.poll(5)
        assert d3 is not None and d3.attempt == 1
        assert await d3.ack()
        assert await q.poll(0.3) is None
    finally:
        await t.aclose()


async def test_keyed_log(transport_harness: PulsarHarness) -> None:
    t = await transport_harness.connect()
    assert isinstance(t, PulsarTransport)
    try:
        log = t._open_keyed_log("delivery", "kv")
        assert await log.get("a") is None
        await log.put("a", b"1")
        await log.put("b", b"2")
        await log.delete("a")
        assert await log.get("a") is None
        assert await log.get("b") == b"2"
        watch = log.watch()
        items = []
        async for item in watch:
            items.append(item)
            if item is CAUGHT_UP:
                break
        assert items == [KeyedChange("b", b"2"), CAUGHT_UP]
        await log.put("c", b"3")
        assert await anext(watch) == KeyedChange("c", b"3")
        await watch.aclose()
        await log.aclose()
    finally:
        await t.aclose()
