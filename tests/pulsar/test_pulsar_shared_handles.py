"""The handles ``request_queue`` returns share one consumer per queue.

A program that opened a handle per poll got the first of three waiting
requests and then nothing for a whole lease: each handle was a consumer of
its own, holding what it had prefetched."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from transport import WorkRequest
from transport.errors import ClosedResourceError

from .conftest import PulsarHarness

pytestmark = pytest.mark.broker


def _name() -> str:
    return f"h{uuid.uuid4().hex[:8]}"


async def test_a_handle_per_poll_gets_every_waiting_request_at_once(
    transport_harness: PulsarHarness,
) -> None:
    producer = await transport_harness.connect()
    worker = await transport_harness.connect()
    try:
        name = _name()
        queue = producer.request_queue(name)
        sent = [await queue.enqueue(WorkRequest(task="cook", payload=i)) for i in range(3)]
        got: list[str] = []
        started = time.monotonic()
        for _ in range(3):
            delivery = await worker.request_queue(name).poll(10)
            assert delivery is not None, f"got {len(got)} of 3, then nothing for 10 s"
            got.append(delivery.request.request_id)
            assert await delivery.ack()
        assert sorted(got) == sorted(r.request_id for r in sent)
        # Nothing waited for a lease to run out (30 s by default).
        assert time.monotonic() - started < 10
    finally:
        await worker.aclose()
        await producer.aclose()


async def test_handles_of_one_queue_share_one_consumer_until_the_last_closes(
    transport_harness: PulsarHarness,
) -> None:
    t = await transport_harness.connect()
    try:
        name = _name()
        # Any: the handles' internals (_consumer) are looked at.
        first: Any = t.request_queue(name)
        second: Any = t.request_queue(name)
        other: Any = t.request_queue(name, max_attempts=2)  # other settings: its own
        await first.enqueue(WorkRequest(task="cook"))
        delivery = await second.poll(10)
        assert delivery is not None
        assert first._consumer is second._consumer is not None
        assert other._consumer is None
        assert await first.ack_many([delivery]) == [True]  # any handle settles it
        consumer = second._consumer
        await first.aclose()
        assert second._consumer is consumer  # still open: second uses it
        with pytest.raises(ClosedResourceError):
            await first.poll(0)
        await second.aclose()
        assert second._closed and consumer is not None
        # A handle opened after the last one closed gets a queue of its own.
        third: Any = t.request_queue(name)
        await third.enqueue(WorkRequest(task="cook", payload="again"))
        again = await third.poll(10)
        assert again is not None and again.request.payload == "again"
        assert third._consumer is not consumer
        assert await again.ack()
    finally:
        await t.aclose()


async def test_closing_one_handle_gives_back_what_it_held_while_another_stays_open(
    transport_harness: PulsarHarness,
) -> None:
    t = await transport_harness.connect()
    try:
        name = _name()
        closing, staying = t.request_queue(name), t.request_queue(name)
        sent = await closing.enqueue(WorkRequest(task="cook"))
        held = await closing.poll(10)
        assert held is not None and held.attempt == 1
        await closing.aclose()
        assert not await held.ack()  # given back: no longer this handle's to settle
        again = await staying.poll(10)
        assert again is not None and again.request.request_id == sent.request_id
        assert again.attempt == 2  # handed to a caller once: that delivery counts
        assert await again.ack()
    finally:
        await t.aclose()


async def test_a_poll_waiting_on_a_closed_handle_ends_while_others_stay_open(
    transport_harness: PulsarHarness,
) -> None:
    t = await transport_harness.connect()
    try:
        name = _name()
        closing, staying = t.request_queue(name), t.request_queue(name)
        assert await staying.poll(0) is None  # joined: the consumer exists
        waiting = asyncio.create_task(closing.poll(None))
        await asyncio.sleep(0.2)  # let the poll start waiting on the consumer
        started = time.monotonic()
        await closing.aclose()
        with pytest.raises(ClosedResourceError):
            await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - started < 3
        # What arrives now goes to the open handle, not to the closed one's poll.
        sent = await staying.enqueue(WorkRequest(task="cook"))
        got = await staying.poll(10)
        assert got is not None and got.request.request_id == sent.request_id
        assert got.attempt == 1
        assert await got.ack()
    finally:
        await t.aclose()


async def test_a_request_whose_attempts_ran_out_is_reported_once_to_the_polling_handle(
    transport_harness: PulsarHarness,
) -> None:
    # As from a queue of its own: once, to the handle that polls (an
    # Ensemble's), not to every handle of the queue (a sender's too).
    t = await transport_harness.connect()
    try:
        name = _name()
        sender = t.request_queue(name, lease_seconds=1.0, max_attempts=1)
        worker = t.request_queue(name, lease_seconds=1.0, max_attempts=1)
        heard: list[str] = []
        reported = asyncio.Event()

        def hook(who: str) -> Callable[[WorkRequest, str], None]:
            def report(request: WorkRequest, reason: str) -> None:
                heard.append(who)
                reported.set()

            return report

        sender.set_exhausted_hook(hook("sender"))
        worker.set_exhausted_hook(hook("worker"))
        await sender.enqueue(WorkRequest(task="cook"))
        delivery = await worker.poll(10)
        assert delivery is not None  # and its lease runs out: attempts used up
        await asyncio.wait_for(reported.wait(), 15)
        assert len(await sender.dead_letters()) == 1
        assert heard == ["worker"]
    finally:
        await t.aclose()


async def test_closing_a_handle_on_a_last_attempt_dead_letters_and_reports_it(
    transport_harness: PulsarHarness,
) -> None:
    # The nack that gives it back dead-letters it (its attempts are used
    # up): the queue's polling handle hears of it, so an Ensemble answers
    # its caller, as when a queue of its own found it at the next hand-out.
    t = await transport_harness.connect()
    try:
        name = _name()
        closing = t.request_queue(name, max_attempts=1)
        staying = t.request_queue(name, max_attempts=1)
        assert await staying.poll(0) is None  # polls too: closing is not the last
        reasons: list[str] = []
        staying.set_exhausted_hook(lambda request, reason: reasons.append(reason))
        sent = await closing.enqueue(WorkRequest(task="cook"))
        held = await closing.poll(10)
        assert held is not None and held.attempt == 1
        await closing.aclose()
        assert len(reasons) == 1 and "its handle was closed" in reasons[0]
        [dead] = await staying.dead_letters()
        assert dead.request_id == sent.request_id and "its handle was closed" in dead.error
    finally:
        await t.aclose()
