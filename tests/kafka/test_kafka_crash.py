"""``kill -9`` of worker processes on Kafka: several kills, nothing lost,
duplicates only among requests in flight at a kill."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from transport import WorkRequest
from transport.testing._crash_suite import WorkerProcess
from transport.testing._util import Budget

pytestmark = [pytest.mark.broker, pytest.mark.asyncio, pytest.mark.crash]


# Each kill moves the partition after the group's session timeout: several
# kills take a minute or more on a loaded machine.
@pytest.mark.timeout(240)
async def test_several_sigkills_lose_nothing(
    transport: Any, queue_name: str, harness: Any, budget: Budget
) -> None:
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
    started = time.monotonic()
    while not wanted <= acked and not budget.expired():
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
            await worker.wait_for("STARTED", budget.left(30))
            target = min(len(acked) + per_worker, total)
            try:
                while len(acked) < target:
                    line = await worker.wait_for("ACKED", budget.left(30))
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
    lost = wanted - acked
    assert not lost, (
        f"{len(lost)} of {total} never acked after {kills} SIGKILLs in "
        f"{time.monotonic() - started:.0f} s: {sorted(lost)[:5]}"
    )
    assert kills >= 3, f"only {kills} worker(s) killed: the scenario did not kill mid-run"
    # Acks are individually durable (settled markers), so even records acked
    # beyond the committed offset are not redelivered.
    outside = set(duplicates) - in_flight_at_kill
    assert not outside, f"{len(outside)} duplicates were not in flight at a kill"
    stats = await queue.stats()
    assert stats.dead_lettered == 0
