"""Conformance scenario for a broker restart mid-run (TESTING.md 19)."""

from __future__ import annotations

import time

import pytest

from transport import TransientTransportError, Transport, WorkRequest
from transport.testing._util import drain, enqueue_all, make_requests
from transport.testing.harness import BackendHarness

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]


class BrokerRestartConformance:
    """Runs where the backend keeps data across a broker restart (capability
    ``restart_broker``); the harness restarts the broker hard (SIGKILL)."""

    async def test_broker_restart_mid_run_loses_no_acknowledged_enqueue(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        if not harness.capabilities.restart_broker:
            pytest.skip("the broker keeps no data across a restart (capability 'restart_broker')")
        queue = transport.request_queue(queue_name)
        before = await enqueue_all(queue, make_requests(60))
        consumed = await drain(queue, 20, harness.scaled(30))  # acked
        assert len(consumed) == 20
        acked = {d.request.request_id for d in consumed}

        await harness.restart_broker()

        # The same client carries on by itself: enqueues fail transiently
        # until it has reconnected; only acknowledged ones must be delivered.
        after: list[WorkRequest] = []
        deadline = time.monotonic() + harness.scaled(60)
        for request in make_requests(40):
            while True:
                try:
                    after.append(await queue.enqueue(request))
                    break
                except TransientTransportError:
                    assert time.monotonic() < deadline, "enqueue did not recover after the restart"
        owed = {r.request_id for r in before} - acked | {r.request_id for r in after}
        seen: set[str] = set()
        deadline = time.monotonic() + harness.scaled(60)
        while not owed <= seen and time.monotonic() < deadline:
            for delivery in await drain(queue, len(owed - seen), deadline - time.monotonic()):
                seen.add(delivery.request.request_id)
        missing = owed - seen
        assert not missing, f"{len(missing)} acknowledged enqueues lost across the restart"
