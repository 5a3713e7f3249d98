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


class BrokerOutageConformance:
    """Runs where the harness can stop and start the test broker
    (``harness.can_stop_broker``), its data kept or not: what a worker
    sees while the broker is down."""

    @pytest.mark.timeout(180)
    async def test_a_poll_while_the_broker_is_down_raises_instead_of_answering_empty(
        self, transport: Transport, queue_name: str, harness: BackendHarness, budget: Budget
    ) -> None:
        """A ``poll(timeout)`` that ends while the broker is unreachable
        raises ``TransientTransportError`` (at its timeout at the latest)
        instead of returning ``None`` as for an empty queue: a worker must
        be able to tell an outage from an idle queue (contract item 25).
        On Kafka, NATS and Pulsar three ``poll(2)`` in a row answered
        ``None`` with the broker stopped, until each backend was changed.
        Once the broker is back, polls answer again."""
        if not harness.can_stop_broker:
            pytest.skip("this harness cannot stop the broker")
        queue = transport.request_queue(queue_name)
        sent = await queue.enqueue(WorkRequest(task="warm-up"))
        got = await queue.poll(budget.left(harness.scaled(30)))
        assert got is not None and got.request.request_id == sent.request_id
        assert await got.ack()
        await harness.stop_broker()
        try:
            assert not await harness.broker_answers(budget.left(harness.scaled(10))), (
                "the broker still answers after stop_broker(): the scenario would prove nothing"
            )
            for _ in range(2):
                started = asyncio.get_running_loop().time()
                # A poll that never ends fails the scenario with TimeoutError.
                async with asyncio.timeout(budget.left(harness.scaled(30))):
                    with pytest.raises(TransientTransportError):
                        await queue.poll(2)
                took = asyncio.get_running_loop().time() - started
                assert took < 2 + harness.scaled(3), f"poll(2) raised after {took:.1f} s"
        finally:
            await harness.start_broker()
        errors: list[str] = []
        while True:
            assert not budget.expired(), f"polls still raise after the restart: {errors[-3:]}"
            try:
                await queue.poll(1)  # a broker restarted without its data may hold nothing
                break
            except TransientTransportError as exc:  # still reconnecting
                errors.append(str(exc))

    @pytest.mark.timeout(240)
    async def test_a_queue_first_used_while_the_broker_is_down_works_once_it_is_back(
        self, transport: Transport, queue_name: str, harness: BackendHarness, budget: Budget
    ) -> None:
        """A worker that starts polling during an outage carries on once the
        broker is back, with the same handle. On Kafka the first poll's
        failed start (its topics not confirmed) was kept and raised again by
        every later poll at once, even with the broker back, until the
        process restarted."""
        if not harness.can_stop_broker:
            pytest.skip("this harness cannot stop the broker")
        await harness.stop_broker()
        try:
            assert not await harness.broker_answers(budget.left(harness.scaled(10))), (
                "the broker still answers after stop_broker(): the scenario would prove nothing"
            )
            queue = transport.request_queue(queue_name)
            async with asyncio.timeout(budget.left(harness.scaled(60))):
                with pytest.raises(TransientTransportError):
                    await queue.poll(2)
        finally:
            await harness.start_broker()
        errors: list[str] = []
        sent: WorkRequest | None = None
        while True:
            assert not budget.expired(), f"still failing after the restart: {errors[-3:]}"
            try:
                if sent is None:
                    sent = await queue.enqueue(WorkRequest(task="after-the-outage"))
                got = await queue.poll(harness.scaled(5))
            except TransientTransportError as exc:  # still reconnecting
                errors.append(str(exc))
                await asyncio.sleep(0.2)  # retry pacing, as a worker's loop has
                continue
            if got is not None:
                break
        assert got.request.request_id == sent.request_id
        assert await got.ack()
