"""How long the head of a queue has waited (``QueueStats.head_enqueued_at``),
checked the same way on every backend that reports it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from transport import Transport, WorkRequest


async def check_head_is_the_next_in_line(transport: Transport, name: str) -> None:
    queue = transport.request_queue(name)
    try:
        assert (await queue.stats()).head_enqueued_at is None, "an empty queue has no head"
        # Stamped by the caller, so the expected ages do not depend on timing.
        first = datetime.now(UTC) - timedelta(minutes=10)
        await queue.enqueue(WorkRequest(request_id="head-1", task="t", enqueued_at=first))
        await queue.enqueue(
            WorkRequest(request_id="head-2", task="t", enqueued_at=first + timedelta(minutes=5))
        )
        assert (await queue.stats()).head_enqueued_at == first
        delivery = await queue.poll(10)
        assert delivery is not None and delivery.request.request_id == "head-1"
        # Leased: the next in line is the second request.
        assert (await queue.stats()).head_enqueued_at == first + timedelta(minutes=5)
        await delivery.ack()
        second = await queue.poll(10)
        assert second is not None
        await second.ack()
        assert (await queue.stats()).head_enqueued_at is None, "nothing waits any more"
    finally:
        await queue.aclose()
