"""Conformance scenario for a broker restart mid-run (TESTING.md 19)."""

from __future__ import annotations

import asyncio

import pytest

from transport import TransientTransportError, Transport, WorkRequest
from transport.testing._util import Budget, drain, enqueue_all, make_requests
from transport.testing.harness import BackendHarness

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]


class BrokerRestartConformance:
    """Runs where the backend keeps accepted requests across a broker restart
    (capability ``restart_broker``) and the harness can restart the test
    broker with its data (``harness.can_restart_broker``). The broker is
    killed (SIGKILL); the scenario checks that it really was unreachable
    before it is started again, so a restart that does nothing fails."""

    @pytest.mark.timeout(180)
    async def test_broker_restart_mid_run_loses_no_acknowledged_enqueue(
        self, transport: Transport, queue_name: str, harness: BackendHarness, budget: Budget
    ) -> None:
        if not harness.capabilities.restart_broker:
            pytest.skip("the backend keeps no data across a broker restart")
        if not harness.can_restart_broker:
            pytest.skip("this test broker cannot be restarted with its data")
        queue = transport.request_queue(queue_name)
        before = await enqueue_all(queue, make_requests(60))
        consumed = await drain(queue, 20, budget.left(harness.scaled(30)))  # acked
        assert len(consumed) == 20, f"only {len(consumed)} of 20 delivered before the restart"
        acked = {d.request.request_id for d in consumed}

        await harness.stop_broker()
        try:
            assert not await harness.broker_answers(budget.left(harness.scaled(10))), (
                "the broker still answers after stop_broker(): the restart would prove nothing"
            )
        finally:
            await harness.start_broker()

        # The same client carries on by itself: enqueues fail transiently
        # until it has reconnected; only acknowledged ones must be delivered.
        after: list[WorkRequest] = []
        for request in make_requests(40):
            while True:
                try:
                    after.append(await queue.enqueue(request))
                    break
                except TransientTransportError as exc:
                    assert not budget.expired(), (
                        f"enqueue did not recover after the restart ({len(after)} of 40 "
                        f"accepted): {exc}"
                    )
                    await asyncio.sleep(0.05)  # retry back-off
        owed = {r.request_id for r in before} - acked | {r.request_id for r in after}
        seen: set[str] = set()
        while not owed <= seen and not budget.expired():
            for delivery in await drain(queue, len(owed - seen), budget.left()):
                seen.add(delivery.request.request_id)
        missing = owed - seen
        assert not missing, (
            f"{len(missing)} of {len(owed)} acknowledged enqueues not delivered within "
            f"{budget.seconds:.0f} s of the test's start (lost across the restart): "
            f"{sorted(missing)[:5]}"
        )
