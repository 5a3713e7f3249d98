"""A real broker outage on ``kafka://``: a Tansu process of this test alone
is killed (SIGKILL) and started again on the same port. Tansu keeps data in
memory only, so it comes back empty: the client must notice that its topics
are gone and create them again, and replace its idempotent producer, whose
id the emptied broker no longer knows (a fatal error for that producer),
without help."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator

import pytest

from transport import WorkRequest, connect
from transport.errors import TransientTransportError
from transport.testing._util import Budget
from transport.testing.brokers import TansuBroker

from .conftest import kafka_config

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]


@pytest.fixture
def own_broker() -> Iterator[TansuBroker]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("KAFKA_TESTCONTAINERS"):
        pytest.skip("needs a dev broker of its own to kill")
    broker = TansuBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()
        broker.close()  # its directory


#: How long a client may take to enqueue again once the broker is back (a
#: fresh client on the restarted broker needs well under a second).
RECOVERY_SECONDS = 20.0


async def test_enqueue_fails_transiently_in_an_outage_and_recreates_its_topics_after(
    own_broker: TansuBroker, budget: Budget
) -> None:
    config = kafka_config(
        own_broker.bootstrap, f"o{uuid.uuid4().hex[:8]}", options={"operation_timeout_s": 3.0}
    )
    producer = await connect(config)
    try:
        queue = producer.request_queue("orders")
        await queue.enqueue(WorkRequest(task="before"))
        own_broker.kill()
        with pytest.raises(TransientTransportError):
            await queue.enqueue(WorkRequest(task="during"))
        own_broker.start()  # same port, no topics
        recovery = Budget(budget.left(RECOVERY_SECONDS))
        after: WorkRequest | None = None
        errors: list[str] = []
        while after is None:
            assert not recovery.expired(), (
                f"enqueue did not recover within {recovery.seconds:.0f} s of the restart: "
                f"{errors[-3:]}"
            )
            try:
                after = await queue.enqueue(WorkRequest(task="after"))
            except TransientTransportError as exc:  # the client is still reconnecting
                errors.append(str(exc))
                await asyncio.sleep(0.1)  # retry back-off
        consumer = await connect(config)
        try:
            delivery = await consumer.request_queue("orders").poll(budget.left(30))
            assert delivery is not None, "the request enqueued after the outage was not stored"
            # "before" went down with the broker's memory; "during" failed.
            assert delivery.request.request_id == after.request_id
            assert await delivery.ack()
        finally:
            await consumer.aclose()
    finally:
        await producer.aclose()


async def test_a_poll_while_the_broker_is_down_raises_instead_of_answering_empty(
    own_broker: TansuBroker, budget: Budget
) -> None:
    """The broker is killed: ``poll(timeout)`` raises
    ``TransientTransportError`` when its time is up instead of returning
    ``None`` as for an empty queue (a worker could not tell an outage from
    an idle queue: three ``poll(2)`` in a row answered ``None``), and
    ``poll()`` without a timeout raises once no broker has been reachable
    for the operation timeout; once the broker is back, polls answer again
    (what tells the client a broker is back is the client's statistics)."""
    config = kafka_config(
        own_broker.bootstrap, f"o{uuid.uuid4().hex[:8]}", options={"operation_timeout_s": 4.0}
    )
    transport = await connect(config)
    try:
        queue = transport.request_queue("orders")
        sent = await queue.enqueue(WorkRequest(task="warm"))
        got = await queue.poll(budget.left(30))
        assert got is not None and got.request.request_id == sent.request_id
        assert await got.ack()
        own_broker.kill()
        started = time.monotonic()
        with pytest.raises(TransientTransportError, match="no Kafka broker reachable"):
            await asyncio.wait_for(queue.poll(), budget.left(30))
        took = time.monotonic() - started
        assert 4.0 <= took < 4.0 + 3, f"poll() raised after {took:.1f} s"
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(TransientTransportError, match="no Kafka broker reachable"):
                await queue.poll(2)
            took = time.monotonic() - started
            assert 2 <= took < 2 + 2, f"poll(2) raised after {took:.1f} s"
        own_broker.start()  # same port, empty
        # Tansu comes back without its data, so the consumer's position is
        # past the end of the new, empty partition and nothing is delivered
        # again (a real Kafka keeps its records and offsets): what is checked
        # here is that polls answer again instead of raising.
        recovery = Budget(budget.left(RECOVERY_SECONDS))
        errors: list[str] = []
        while True:
            assert not recovery.expired(), f"polls still raise after the restart: {errors[-3:]}"
            try:
                assert await queue.poll(1) is None, "a request came from an empty broker"
                break
            except TransientTransportError as exc:
                errors.append(str(exc))
    finally:
        await transport.aclose()
