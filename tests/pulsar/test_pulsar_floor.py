"""The Pulsar enqueue floor of ``python -m benchmarks.floors --pulsar`` on
the session's broker, at a tiny size: every request it sends is stored, as
this library's record with ``enqueued_at`` stamped, and it runs to the end
beside the raw loop and this library. Not a timed assertion."""

from __future__ import annotations

import asyncio
import uuid

import pulsar
import pytest

from benchmarks import floors
from benchmarks import pulsar as bench
from transport import WorkRequest

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

N = 200


def _read(url: str, topic: str, subscription: str, expected: int) -> list[WorkRequest]:
    client = bench._raw_client(url)
    try:
        consumer = client.subscribe(
            topic, subscription, initial_position=pulsar.InitialPosition.Earliest
        )
        out = []
        while len(out) < expected:
            message = consumer.receive(10_000)
            out.append(WorkRequest.model_validate_json(message.data()))
            consumer.acknowledge(message)
        return out
    finally:
        client.close()


async def test_the_floor_stores_every_request_stamped(pulsar_url: str) -> None:
    topic = bench._topic("floortest")
    subscription = f"s{uuid.uuid4().hex[:8]}"
    # Subscribed first: the broker keeps messages only for a subscription.
    client = await asyncio.to_thread(bench._raw_client, pulsar_url)
    await asyncio.to_thread(
        client.subscribe,
        topic,
        subscription,
        initial_position=pulsar.InitialPosition.Earliest,
    )
    await asyncio.to_thread(client.close)
    assert await floors.pulsar_enqueue_floor(pulsar_url, N, 16, topic=topic) > 0
    stored = await asyncio.to_thread(_read, pulsar_url, topic, subscription, N + 1)
    assert len({r.request_id for r in stored}) == N + 1  # the warm-up and N, each once
    assert all(r.enqueued_at is not None for r in stored)


async def test_the_floor_row_runs_beside_raw_and_ours(pulsar_url: str) -> None:
    name, target, base, floor, ours = floors._pulsar_case(pulsar_url, N)
    assert name == "pulsar enqueue, 64 in flight" and target == 0.8
    for measure in (base, floor, ours):
        assert await measure() > 0
