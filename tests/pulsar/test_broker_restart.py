"""Broker killed with SIGKILL and restarted on the same port and data
directory (pulsar-lite only: an external broker is not ours to kill)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from transport import WorkRequest, WorkResponse
from transport.errors import TransientTransportError
from transport.testing._util import drain, make_requests

from .conftest import PulsarHarness, PulsarLiteBroker

pytestmark = [pytest.mark.broker]


@pytest.fixture
def harness(
    transport_harness: PulsarHarness, pulsar_broker: PulsarLiteBroker | None
) -> PulsarHarness:
    if pulsar_broker is None:
        pytest.skip("an external or containerised broker is not restarted by the tests")
    return transport_harness


def name() -> str:
    return f"r{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
async def test_every_acknowledged_enqueue_survives_a_broker_stop(
    harness: PulsarHarness, pulsar_broker: PulsarLiteBroker, stop: str
) -> None:
    transport = await harness.connect()
    try:
        queue = transport.request_queue(name())
        # Concurrent enqueues: many sends in flight at once (send_async under
        # the hood), each returning on its own receipt; the broker is stopped
        # right after the last receipt.
        sent = await asyncio.gather(*(queue.enqueue(r) for r in make_requests(200)))
        if stop == "sigkill":
            await harness.restart_broker()
        else:
            await asyncio.to_thread(pulsar_broker.stop)
            await asyncio.to_thread(pulsar_broker.start)
        got = await drain(queue, 200, 60, ack=False)
        assert {d.request.request_id for d in got} == {r.request_id for r in sent}, "lost requests"
        assert all(await asyncio.gather(*(d.ack() for d in got)))
    finally:
        await transport.aclose()


async def test_a_connected_client_keeps_working_across_a_restart(harness: PulsarHarness) -> None:
    transport = await harness.connect()
    try:
        queue = transport.request_queue(name())
        before = await queue.enqueue(WorkRequest(task="before"))
        first = await queue.poll(10)
        assert first is not None and first.request.request_id == before.request_id
        assert await first.ack()
        await harness.restart_broker()
        after = await queue.enqueue(WorkRequest(task="after"))  # the client reconnects by itself
        again = await queue.poll(30)
        assert again is not None and again.request.request_id == after.request_id
        assert await again.ack()
        assert await queue.poll(1.0) is None, "an acked request came back after the restart"
    finally:
        await transport.aclose()


async def test_acks_given_before_a_restart_are_kept(harness: PulsarHarness) -> None:
    transport = await harness.connect()
    try:
        queue = transport.request_queue(name())
        sent = [await queue.enqueue(r) for r in make_requests(10)]
        leased = await drain(queue, 10, 20, ack=False)
        assert len(leased) == 10
        acked = {d.request.request_id for d in leased[1::2]}
        for delivery in leased[1::2]:  # out of order: every other one
            assert await delivery.ack()
        await transport.aclose()
        await harness.restart_broker()
        transport = await harness.connect()
        queue = transport.request_queue(queue.name)
        back = await drain(queue, 5, 20)
        ids = {d.request.request_id for d in back}
        assert ids == {r.request_id for r in sent} - acked
        assert await queue.poll(1.5) is None, "an acked request came back after the restart"
    finally:
        await transport.aclose()


async def test_an_ack_given_while_the_broker_is_down_completes_once_it_is_back(
    harness: PulsarHarness, pulsar_broker: PulsarLiteBroker
) -> None:
    """Acks wait for the broker's receipt (ack_receipts, the default), so
    one given while the broker is unreachable cannot complete then; it is
    sent again once the consumer has reconnected, within the operation
    timeout, and the copy the broker dispatched again on that reconnect is
    not handed out."""
    transport = await harness.connect()
    try:
        queue = transport.request_queue(name(), lease_seconds=60)
        request = await queue.enqueue(WorkRequest(task="x"))
        delivery = await queue.poll(10)
        assert delivery is not None and delivery.request.request_id == request.request_id
        await asyncio.to_thread(pulsar_broker.kill)
        ack = asyncio.create_task(delivery.ack())
        await asyncio.sleep(0)  # the ack is attempted against the dead broker
        assert not ack.done(), "an ack without a broker must not complete (nor fail at once)"
        await asyncio.to_thread(pulsar_broker.start)
        timeout = harness.config.options["operation_timeout_seconds"] + 5
        assert await asyncio.wait_for(ack, timeout), "the ack did not complete after the restart"
        again = await queue.poll(2.0)
        assert again is None, (
            f"an acked request was handed out again (attempt {again and again.attempt})"
        )
    finally:
        await transport.aclose()


async def test_registry_and_dead_letters_survive_a_restart(harness: PulsarHarness) -> None:
    transport = await harness.connect()
    inbox = name()
    try:
        registry = transport.delivery_registry(inbox)
        await registry.register("req-1")
        await registry.complete("req-1", WorkResponse(request_id="req-1", result={"ok": True}))
        queue = transport.request_queue(name(), max_attempts=1)
        await queue.enqueue(WorkRequest(request_id="poison-1", task="poison"))
        delivery = await queue.poll(10)
        assert delivery is not None
        assert await delivery.dead_letter("broken")
    finally:
        await transport.aclose()
    await harness.restart_broker()
    transport = await harness.connect()
    try:
        registry = transport.delivery_registry(inbox)
        pending = await registry.wait("req-1")
        response = await pending.result(timeout=30)
        assert response.result == {"ok": True}
        dead = await transport.request_queue(queue.name).dead_letters()
        assert [(d.request_id, d.error) for d in dead] == [("poison-1", "broken")]
    finally:
        await transport.aclose()


async def test_a_lease_held_when_the_broker_dies_comes_back(harness: PulsarHarness) -> None:
    transport = await harness.connect()
    try:
        queue = transport.request_queue(name(), lease_seconds=1.0)
        request = await queue.enqueue(WorkRequest(task="held"))
        held = await queue.poll(10)
        assert held is not None
        await harness.restart_broker()
        deadline = time.monotonic() + 30
        again = None
        while again is None and time.monotonic() < deadline:
            again = await queue.poll(1.0)
        assert again is not None and again.request.request_id == request.request_id
        assert await held.ack() is False, "the stale lease must not settle the request"
        assert await again.ack()
    finally:
        await transport.aclose()


async def test_event_log_and_its_cursors_survive_a_restart(harness: PulsarHarness) -> None:
    stream = name()
    transport = await harness.connect()
    try:
        log = transport.event_log()
        positions = [await log.append(stream, i) for i in range(5)]
        reader = await log.read(stream, "earliest", cursor="audit")
        assert [(await reader.next(10)).data for _ in range(3)] == [0, 1, 2]  # type: ignore[union-attr]
        await reader.aclose()
    finally:
        await transport.aclose()
    await harness.restart_broker()
    transport = await harness.connect()
    try:
        log = transport.event_log()
        resumed = await log.read(stream, "earliest", cursor="audit")
        assert [(await resumed.next(30)).data for _ in range(2)] == [3, 4]  # type: ignore[union-attr]
        replay = await log.read(stream, positions[1])
        first = await replay.next(10)
        assert first is not None and first.data == 1 and first.position == positions[1]
    finally:
        await transport.aclose()


KILLED_WORKER = """
import asyncio, sys
from transport import connect

async def main():
    transport = await connect()
    queue = transport.request_queue(sys.argv[1], max_attempts=2)
    delivery = await queue.poll(30)
    assert delivery is not None and delivery.attempt == 1, delivery
    print("HOLDING", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_killed_workers_delivery_counts_when_the_broker_forgot_its_redelivery_count(
    harness: PulsarHarness,
) -> None:
    """The broker's redelivery count is no measure of deliveries: Apache
    Pulsar does not count one whose consumer disconnected (a killed worker's
    request comes back at count 0) and forgets every count when the
    subscription's last consumer leaves; pulsar-lite forgets them at a
    restart. A request that a worker took and was killed holding must still
    come back at attempt 2, and be dead-lettered once it has reached
    max_attempts such workers."""
    config = harness.config
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSPORT_")}
    env.update(
        TRANSPORT_URL=config.url,
        TRANSPORT_NAMESPACE=config.namespace,
        TRANSPORT_OPTIONS=json.dumps(config.options),
    )
    queue_name = name()

    def take_and_die() -> None:
        with subprocess.Popen(
            [sys.executable, "-c", KILLED_WORKER, queue_name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as worker:
            try:
                assert worker.stdout is not None and worker.stderr is not None
                line = worker.stdout.readline()  # the worker polls within 30 s or exits
                assert line.strip() == "HOLDING", (line, worker.stderr.read())
            finally:
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait(10)

    transport = await harness.connect()
    try:
        queue = transport.request_queue(queue_name, max_attempts=2)
        sent = await queue.enqueue(WorkRequest(task="crashes-its-worker"))
        await asyncio.to_thread(take_and_die)
        await harness.restart_broker()  # every redelivery count is 0 again
        again = await queue.poll(60)
        assert again is not None and again.request.request_id == sent.request_id
        assert again.attempt == 2, "the killed worker's delivery was not counted"
        await queue.aclose()  # a clean close gives it back, counted twice now
        await harness.restart_broker()  # the counts are forgotten again

        second = transport.request_queue(queue_name, max_attempts=2)
        assert await second.poll(3) is None, "delivered a third time with max_attempts=2"
        deadline = time.monotonic() + 30
        while not (dead := await second.dead_letters()) and time.monotonic() < deadline:
            await second.poll(1)  # dead-lettering runs in the background
        assert [d.request_id for d in dead] == [sent.request_id]
        assert dead[0].attempts == 2, dead[0]
    finally:
        await transport.aclose()


async def test_a_poll_while_the_broker_is_down_raises_instead_of_answering_empty(
    harness: PulsarHarness, pulsar_broker: PulsarLiteBroker
) -> None:
    """The broker is stopped: ``poll(timeout)`` raises
    ``TransientTransportError`` when its time is up instead of returning
    ``None`` as for an empty queue (a worker could not tell an outage from
    an idle queue: three ``poll(2)`` in a row answered ``None``); once the
    broker is back, polls work again."""
    options = {**harness.config.options, "operation_timeout_seconds": 10}
    transport = await harness.connect(options=options)
    stopped = False
    try:
        queue = transport.request_queue(name())
        sent = await queue.enqueue(WorkRequest(task="t", payload="warm"))
        got = await queue.poll(20)
        assert got is not None and got.request.request_id == sent.request_id
        assert await got.ack()
        await asyncio.to_thread(pulsar_broker.stop)
        stopped = True
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(TransientTransportError, match="unreachable"):
                await queue.poll(2)
            took = time.monotonic() - started
            assert took < 2 + 2, f"poll(2) raised after {took:.1f} s"
        await asyncio.to_thread(pulsar_broker.start)
        stopped = False
        deadline = time.monotonic() + 60
        while True:
            try:
                after = await queue.enqueue(WorkRequest(task="t", payload="after"))
                break
            except TransientTransportError:
                assert time.monotonic() < deadline, "no enqueue within 60 s of the restart"
        got = await queue.poll(30)
        assert got is not None and got.request.request_id == after.request_id
        assert await got.ack()
    finally:
        if stopped:
            await asyncio.to_thread(pulsar_broker.start)
        await transport.aclose()
