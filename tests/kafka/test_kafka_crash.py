"""``kill -9`` of worker processes on Kafka: several kills, nothing lost,
duplicates only among requests in flight at a kill."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from transport import WorkRequest
from transport.testing._crash_suite import WorkerProcess

pytestmark = [pytest.mark.broker, pytest.mark.asyncio, pytest.mark.crash]


async def test_several_sigkills_lose_nothing(transport: Any, queue_name: str, harness: Any) -> None:
    total, per_worker = 90, 25
    queue = transport.request_queue(queue_name, lease_seconds=harness.lease_seconds)
    sent = await asyncio.gather(
        *(queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(total))
    )
    wanted = {r.request_id for r in sent}
    acked: set[str] = set()
    duplicates: list[str] = []
    in_flight_at_kill: set[str] = set()
    kills = 0
    deadline = time.monotonic() + 150
    while not wanted <= acked and time.monotonic() < deadline:
        worker = await WorkerProcess.start(
            harness,
            "--queue",
            queue_name,
            "--mode",
            "process",
            "--lease",
            str(harness.lease_seconds),
        )
        try:
            await worker.wait_for("STARTED", 30)
            target = min(len(acked) + per_worker, total)
            try:
                while len(acked) < target:
                    line = await worker.wait_for("ACKED", 30)
                    rid = line.split()[1]
                    if rid in acked:
                        duplicates.append(rid)
                    acked.add(rid)
            except TimeoutError:
                pass
        finally:
            await worker.reap()  # SIGKILL, mid-stream
        kills += 1
        in_flight_at_kill |= set(worker.ids("LEASED")) - set(worker.ids("ACKED"))
    assert kills >= 3
    assert wanted - acked == set(), f"lost {len(wanted - acked)}"
    # Acks are individually durable (settled markers), so even records acked
    # beyond the committed offset are not redelivered.
    assert set(duplicates) <= in_flight_at_kill
    stats = await queue.stats()
    assert stats.dead_lettered == 0
