"""The outbox holds the line through an outage and keeps FIFO."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
from tenacity import wait_fixed

from transport import (
    DeadLetter,
    Delivery,
    Outbox,
    PermanentTransportError,
    QueueStats,
    RequestQueue,
    TransientTransportError,
    Transport,
    WorkRequest,
)


class Outage(RequestQueue):
    """A queue in front of a real one that fails while ``down`` is true,
    and refuses requests whose payload says ``poison``."""

    def __init__(self, inner: RequestQueue) -> None:
        self.inner = inner
        self.name = inner.name
        self.lease_seconds = inner.lease_seconds
        self.max_attempts = inner.max_attempts
        self.down = True
        self.refused = 0
        self.failed_while_down = 0

    async def enqueue(self, request: WorkRequest) -> WorkRequest:
        if self.down:
            self.failed_while_down += 1
            if self.failed_while_down >= 25:
                self.down = False  # the broker comes back
            raise TransientTransportError("broker unreachable (simulated)")
        if request.payload == "poison":
            self.refused += 1
            raise PermanentTransportError("refused by broker policy (simulated)")
        return await self.inner.enqueue(request)

    async def poll(self, timeout: float | None = None) -> Delivery | None:
        return await self.inner.poll(timeout)

    async def stats(self) -> QueueStats:
        return await self.inner.stats()

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self.inner.dead_letters(limit)

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        return await self.inner.requeue_dead_letters(request_ids)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _outbox(transport: Transport, tmp_path: Path, outage: Outage, wait: float) -> Outbox:
    """An outbox whose every request goes through ``outage``, retried every ``wait`` s."""
    return Outbox(
        transport,
        tmp_path / "outbox.db",
        retry_wait=wait_fixed(wait),
        queue_factory=lambda name, levels: outage,
    )


async def test_outage_loses_nothing_keeps_fifo_and_dead_letters_nothing(
    transport: Transport, tmp_path: Path
) -> None:
    outage = Outage(transport.request_queue("orders"))
    outbox = _outbox(transport, tmp_path, outage, 0.01)
    async with outbox:
        sent = [await outbox.enqueue("orders", WorkRequest(task="t", payload=i)) for i in range(50)]
        assert await outbox.depth() > 0  # held while the broker is down
        await outbox.flush(timeout=30)
        assert await outbox.dead_letters() == []
    assert outage.failed_while_down >= 25
    received = []
    queue = transport.request_queue("orders")
    while (delivery := await queue.poll(0.5)) is not None:
        received.append(delivery.request.request_id)
        await delivery.ack()
    assert received == [r.request_id for r in sent], "lost or reordered"


async def test_an_outage_is_logged_once_and_its_end_once(
    transport: Transport, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outage = Outage(transport.request_queue("orders3"))
    outbox = _outbox(transport, tmp_path, outage, 0.001)
    with caplog.at_level(logging.DEBUG, logger="transport.outbox"):
        async with outbox:
            await outbox.enqueue("orders3", WorkRequest(task="t", payload=1))
            await outbox.flush(timeout=30)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    retries = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert outage.failed_while_down == 25
    assert len(warnings) == 2, warnings
    assert "transport unavailable" in warnings[0] and "reachable again" in warnings[1]
    assert len(retries) == 24  # every further retry, at DEBUG only


async def test_only_definitive_failures_count_toward_dead_lettering(
    transport: Transport, tmp_path: Path
) -> None:
    outage = Outage(transport.request_queue("orders2"))
    outbox = _outbox(transport, tmp_path, outage, 0.01)
    async with outbox:
        poison = await outbox.enqueue("orders2", WorkRequest(task="t", payload="poison"))
        fine = await outbox.enqueue("orders2", WorkRequest(task="t", payload="fine"))
        await outbox.flush(timeout=30)
        [dead] = await outbox.dead_letters()
    assert dead.request.request_id == poison.request_id
    assert dead.attempts == 3 and "refused" in dead.error
    assert outage.refused == 3
    delivery = await transport.request_queue("orders2").poll(5)
    assert delivery is not None and delivery.request.request_id == fine.request_id


async def test_stored_requests_survive_a_restart_of_the_outbox(
    transport: Transport, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    stuck = Outage(transport.request_queue("orders3"))
    stuck.failed_while_down = -(10**9)  # never comes back in this run
    first = Outbox(transport, path, retry_wait=wait_fixed(0.01), queue_factory=lambda n, lv: stuck)
    async with first:
        request = await first.enqueue("orders3", WorkRequest(task="t", payload="kept"))
    second = Outbox(transport, path)
    async with second:
        await second.flush(timeout=30)
    delivery = await transport.request_queue("orders3").poll(5)
    assert delivery is not None and delivery.request.request_id == request.request_id


@pytest.mark.parametrize("levels", [3])
async def test_outbox_feeds_priority_queues(
    transport: Transport, tmp_path: Path, levels: int
) -> None:
    async with Outbox(transport, tmp_path / "outbox.db") as outbox:
        for level in (2, 0, 1):
            await outbox.enqueue(
                "prio", WorkRequest(task="t", payload=level, priority=level), levels=levels
            )
        await outbox.flush(timeout=30)
    pq = transport.priority_queue("prio", levels=levels)
    order = []
    while (delivery := await pq.poll(0.5)) is not None:
        order.append(delivery.request.payload)
        await delivery.ack()
    assert order == [0, 1, 2]


# Network.send through a broker outage is tested against a real one (a
# nats-server killed and restarted): tests/nats/test_outbox_outage.py.


async def test_outbox_starts_on_first_enqueue(transport: Transport, tmp_path: Path) -> None:
    outbox = Outbox(transport, tmp_path / "lazy.db", retry_wait=wait_fixed(0.01))
    await outbox.enqueue("lazy", WorkRequest(task="t", payload=1))
    await outbox.flush(timeout=10)
    delivery = await transport.request_queue("lazy").poll(5)
    assert delivery is not None and delivery.request.payload == 1
    await outbox.aclose()
