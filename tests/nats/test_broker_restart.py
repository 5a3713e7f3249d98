"""nats-server killed with SIGKILL and restarted (same port, same store dir,
``sync_interval: always``) while producers and consumers run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from transport import Transport, TransportConfig, WorkRequest, WorkResponse, connect
from transport._spi.shared import SharedQueueHandle
from transport.errors import TransientTransportError
from transport.testing.brokers import NatsServer
from transport_nats import NatsRequestQueue

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of this test alone: restarting it disturbs no other test."""
    if os.environ.get("NATS_URL"):
        pytest.skip("an external NATS_URL server cannot be restarted by the test")
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _connect(server: NatsServer, namespace: str, **options: object) -> Transport:
    opts = {"reconnect_time_wait": 0.1, "request_timeout": 2.0, "pull_expires": 2.0, **options}
    return await connect(TransportConfig(url=server.url, namespace=namespace, options=opts))


async def _until_pull_parked(server: NatsServer, queue: object, timeout: float = 10.0) -> None:
    """Wait until the server holds a waiting pull request on the queue's
    consumer (``num_waiting``), as seen by a separate raw client."""
    assert isinstance(queue, NatsRequestQueue | SharedQueueHandle)
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while (await js.consumer_info(queue.stream, queue.durable)).num_waiting < 1:
            assert time.monotonic() < deadline, f"no pull request parked within {timeout} s"
            await asyncio.sleep(0.02)
    finally:
        await nc.close()


async def test_kill_9_mid_run_loses_no_acknowledged_enqueue(
    own_server: NatsServer, namespace: str
) -> None:
    producer = await _connect(own_server, namespace)
    consumer = await _connect(own_server, namespace)
    try:
        q_in = producer.request_queue("work", lease_seconds=3)
        q_out = consumer.request_queue("work", lease_seconds=3)
        acked: set[str] = set()
        indeterminate: set[str] = set()
        consumed: set[str] = set()
        ack_failures: list[str] = []
        consumed_after_restart = 0
        restarted = asyncio.Event()
        done_producing = asyncio.Event()
        all_seen = asyncio.Event()
        total = 900

        async def produce() -> None:
            for i in range(total):
                request = WorkRequest(task="work", payload={"i": i})
                try:
                    await q_in.enqueue(request)
                    acked.add(request.request_id)
                except TransientTransportError:
                    # Timed out: may or may not be stored. Not counted as lost.
                    indeterminate.add(request.request_id)
                if i in (total // 3, 2 * total // 3):  # two crashes
                    await asyncio.to_thread(own_server.restart)
                    restarted.set()
            done_producing.set()

        async def consume() -> None:
            nonlocal consumed_after_restart
            while True:
                try:
                    delivery = await q_out.poll(0.5)
                except TransientTransportError:
                    await asyncio.sleep(0.05)
                    continue
                if delivery is not None:
                    # Seen = processed. An ack that timed out during the
                    # restart may still have removed it on the server.
                    consumed.add(delivery.request.request_id)
                    if restarted.is_set():
                        consumed_after_restart += 1
                    try:
                        await delivery.ack()
                    except TransientTransportError:
                        ack_failures.append(delivery.request.request_id)
                if done_producing.is_set() and acked <= consumed:
                    all_seen.set()

        consumer_task = asyncio.create_task(consume())
        await asyncio.wait_for(produce(), 60)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_seen.wait(), 30)
        consumer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer_task
        lost = acked - consumed
        print(
            f"enqueued(acked)={len(acked)} indeterminate={len(indeterminate)} "
            f"consumed={len(consumed)} after_restart={consumed_after_restart} lost={len(lost)} "
            f"ack_failures={len(ack_failures)}"
        )
        assert restarted.is_set()
        assert len(acked) > total // 2
        assert not lost, f"{len(lost)} acknowledged enqueues lost"
        assert consumed_after_restart > 0
        # Nothing consumed that was never sent.
        assert consumed <= acked | indeterminate
    finally:
        await producer.aclose()
        await consumer.aclose()


async def test_waiting_poll_resumes_after_restart_without_waiting_for_pull_expiry(
    own_server: NatsServer, namespace: str
) -> None:
    # A pull request lives only in the server's memory: after a restart the
    # client must re-issue it, not wait for an answer that never comes.
    consumer = await _connect(own_server, namespace, pull_expires=60.0)
    producer = await _connect(own_server, namespace)
    try:
        q_out = consumer.request_queue("idle", lease_seconds=3)
        q_in = producer.request_queue("idle", lease_seconds=3)
        await q_in.enqueue(WorkRequest(task="warmup"))
        first = await q_out.poll(5)
        assert first is not None and await first.ack()
        waiting = asyncio.create_task(q_out.poll(40))
        await _until_pull_parked(own_server, q_out)
        await asyncio.to_thread(own_server.restart)
        request = await q_in.enqueue(WorkRequest(task="after"))
        started = time.monotonic()
        delivery = await asyncio.wait_for(waiting, 15)
        assert delivery is not None
        assert delivery.request.request_id == request.request_id
        assert time.monotonic() - started < 10
        assert await delivery.ack()
    finally:
        await producer.aclose()
        await consumer.aclose()


async def test_registries_survive_a_restart(own_server: NatsServer, namespace: str) -> None:
    caller = await _connect(own_server, namespace)
    worker = await _connect(own_server, namespace)
    try:
        registry = caller.delivery_registry("inbox")
        pending = await registry.register("req-1")
        await asyncio.to_thread(own_server.restart)
        # Completed by another client after the restart: the caller's KV
        # watch must have been re-established to see it.
        for _ in range(50):
            try:
                await worker.delivery_registry("inbox").complete(
                    "req-1", WorkResponse(request_id="req-1", result={"ok": True})
                )
                break
            except TransientTransportError:
                await asyncio.sleep(0.1)
        response = await pending.result(timeout=15)
        assert response.result == {"ok": True}
    finally:
        await caller.aclose()
        await worker.aclose()


async def test_event_log_reader_and_cursor_survive_a_restart(
    own_server: NatsServer, namespace: str
) -> None:
    reader_side = await _connect(own_server, namespace)
    writer_side = await _connect(own_server, namespace)
    try:
        writer = writer_side.event_log()
        for i in range(3):
            await writer.append("audit", i)
        reader = await reader_side.event_log().read("audit", "earliest", cursor="auditor")
        got = [await reader.next(5) for _ in range(3)]
        assert [e.data for e in got if e] == [0, 1, 2]
        await reader.commit()
        waiting = asyncio.create_task(reader.next(20))
        await asyncio.to_thread(own_server.restart)
        for _ in range(50):
            try:
                await writer.append("audit", "after-restart")
                break
            except TransientTransportError:
                await asyncio.sleep(0.1)
        event = await asyncio.wait_for(waiting, 20)
        assert event is not None and event.data == "after-restart"
        await reader.aclose()
        resumed = await writer_side.event_log().read("audit", "earliest", cursor="auditor")
        assert await resumed.next(1) is None  # everything up to here was committed
        await resumed.aclose()
    finally:
        await reader_side.aclose()
        await writer_side.aclose()


async def _until_down(transport: Transport, timeout: float = 10.0) -> None:
    """Wait until the transport has seen the server go (health not ok)."""
    deadline = time.monotonic() + timeout
    while (await transport.health()).ok:
        assert time.monotonic() < deadline, f"the server's stop not seen within {timeout} s"
        await asyncio.sleep(0.05)


async def test_an_enqueue_that_raised_in_an_outage_is_not_stored_after_it(
    own_server: NatsServer, namespace: str
) -> None:
    """The server is down: ``enqueue`` raises ``TransientTransportError``
    within the operation timeout, and the request is not stored when the
    server comes back (nats-py kept it in its reconnect buffer and sent it
    then, so a request the caller was told had failed was handled anyway,
    at attempt 1, and a caller that retried it with a new id got it twice)."""
    transport = await _connect(own_server, namespace, enqueue_retry_seconds=1, connect_timeout=1)
    try:
        queue = transport.request_queue("work")
        warm = await queue.enqueue(WorkRequest(task="t", payload="warm"))
        got = await queue.poll(10)
        assert got is not None and got.request.request_id == warm.request_id
        assert await got.ack()
        own_server.stop()
        await _until_down(transport)
        failed = WorkRequest(task="t", payload="failed")
        started = time.monotonic()
        with pytest.raises(TransientTransportError, match="unavailable"):
            await queue.enqueue(failed)
        took = time.monotonic() - started
        assert took < transport.operation_timeout + 1, f"enqueue raised after {took:.1f} s"
        own_server.start()
        after = await asyncio.wait_for(_enqueue_when_back(queue, "after"), 30)
        got = await queue.poll(10)
        assert got is not None, "nothing delivered after the server came back"
        assert got.request.payload != "failed", "the enqueue that raised was stored after all"
        assert got.request.request_id == after.request_id
        assert await got.ack()
        assert await queue.poll(1) is None
    finally:
        await transport.aclose()


async def _enqueue_when_back(queue: object, payload: str) -> WorkRequest:
    assert isinstance(queue, NatsRequestQueue | SharedQueueHandle)
    while True:
        try:
            return await queue.enqueue(WorkRequest(task="t", payload=payload))
        except TransientTransportError:
            await asyncio.sleep(0.1)


async def test_a_poll_in_an_outage_raises_instead_of_answering_empty(
    own_server: NatsServer, namespace: str
) -> None:
    """The server is down: ``poll(timeout)`` raises ``TransientTransportError``
    when its time is up (it returned ``None``, as for an empty queue, and a
    worker could not tell an outage from idleness), ``poll(None)`` within
    the operation timeout; once the server is back, polls work again."""
    transport = await _connect(own_server, namespace, connect_timeout=1)
    try:
        queue = transport.request_queue("work")
        assert await queue.poll(0) is None  # the consumer exists
        waiting = asyncio.ensure_future(queue.poll(None))
        await _until_pull_parked(own_server, queue)  # it waits on a pull the server holds
        own_server.stop()
        await _until_down(transport)
        for timeout in (0, 1):
            started = time.monotonic()
            with pytest.raises(TransientTransportError, match="unavailable"):
                await queue.poll(timeout)
            took = time.monotonic() - started
            assert took < timeout + 1, f"poll({timeout}) raised after {took:.1f} s"
        limit = transport.operation_timeout + 1
        with pytest.raises(TransientTransportError):
            await asyncio.wait_for(waiting, limit + 3)
        own_server.start()
        sent = await asyncio.wait_for(_enqueue_when_back(queue, "back"), 30)
        got = await queue.poll(10)
        assert got is not None and got.request.request_id == sent.request_id
        assert await got.ack()
    finally:
        await transport.aclose()


async def _until_up(transport: Transport, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not (await transport.health()).ok:
        assert time.monotonic() < deadline, f"not reconnected within {timeout} s"
        await asyncio.sleep(0.05)


async def test_a_registry_write_rides_out_a_short_reconnect(
    own_server: NatsServer, namespace: str
) -> None:
    """A registry write made while the connection is down waits for it to
    come back (up to ``request_timeout``) instead of failing at once: an
    ``Ensemble`` whose ``complete`` failed would run the handler again."""
    transport = await _connect(own_server, namespace, request_timeout=10.0)
    try:
        registry = transport.delivery_registry("inbox")
        first = WorkRequest(task="t")
        await registry.register(first.request_id)
        own_server.stop()
        await _until_down(transport)
        second = WorkRequest(task="t")
        writing = asyncio.ensure_future(registry.register(second.request_id))
        done, _ = await asyncio.wait({writing}, timeout=0.5)
        assert not done, f"the write did not wait for the connection: {writing!r}"
        own_server.start()
        pending = await asyncio.wait_for(writing, 15)
        assert pending.request_id == second.request_id
        assert {p.request_id for p in await registry.pending()} >= {
            first.request_id,
            second.request_id,
        }
    finally:
        await transport.aclose()


async def test_a_claim_that_raised_in_an_outage_takes_nothing_later(
    own_server: NatsServer, namespace: str
) -> None:
    """A collect (``claim``) that fails while the server is down sends
    nothing that could take the response after the caller was told it
    failed: its delete marker went into the reconnect buffer while the
    deletes beside it raised, and deleted the response on reconnect."""
    transport = await _connect(own_server, namespace, request_timeout=1.0, connect_timeout=1)
    try:
        registry = transport.delivery_registry("claims")  # kept: its log closes with it
        log_ = registry._log
        await log_.put("c.x", b"response")
        await log_.put("p.x", b"registration")
        kv = await log_._bucket()
        revision = str((await kv.get("c.x")).revision).encode()
        own_server.stop()
        await _until_down(transport)
        with pytest.raises(TransientTransportError, match="unavailable"):
            await log_.claim("c.x", also=("p.x",), position=revision)
        own_server.start()
        await _until_up(transport)
        assert await log_.get_many(["c.x", "p.x"]) == [b"response", b"registration"]
        assert await log_.claim("c.x", also=("p.x",), position=revision) is True
    finally:
        await transport.aclose()


async def test_a_poll_shared_by_two_handles_rides_out_a_short_outage(
    own_server: NatsServer, namespace: str
) -> None:
    """Two handles of one queue poll (their polls then wait in one-second
    slices): a server that is back within the operation timeout does not
    fail either poll, and work enqueued then reaches one of them."""
    transport = await _connect(own_server, namespace, connect_timeout=3)  # 7 s
    try:
        first, second = transport.request_queue("work"), transport.request_queue("work")
        assert await first.poll(0) is None
        polls = [asyncio.ensure_future(q.poll(None)) for q in (first, second)]
        own_server.stop()
        await _until_down(transport)
        done, _ = await asyncio.wait(polls, timeout=1.5)
        assert not done, f"a poll raised in a short outage: {done}"
        own_server.start()
        sent = await asyncio.wait_for(_enqueue_when_back(first, "after"), 30)
        done, _ = await asyncio.wait(polls, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        assert done, "neither poll got the request enqueued after the outage"
        got = next(iter(done)).result()
        assert got is not None and got.request.request_id == sent.request_id
        assert await got.ack()
    finally:
        for poll in polls:
            poll.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        await transport.aclose()


async def test_a_second_outage_is_timed_from_its_own_start(
    own_server: NatsServer, namespace: str
) -> None:
    """A ``poll(None)`` rode out one outage; a second one later is timed
    from its own start: the poll does not raise at its first failure
    because the first outage began more than the operation timeout ago."""
    # Operation timeout 7 s: a stop of the server (JetStream flushing) and
    # its start take a few seconds of the outage already.
    transport = await _connect(own_server, namespace, connect_timeout=3)
    try:
        queue = transport.request_queue("work")
        assert await queue.poll(0) is None
        polling = asyncio.ensure_future(queue.poll(None))
        own_server.stop()
        await _until_down(transport)
        done, _ = await asyncio.wait({polling}, timeout=1.0)
        assert not done, f"the poll raised in the first, short outage: {polling!r}"
        own_server.start()
        await _until_up(transport)
        await _until_pull_parked(own_server, queue)  # it asks the server again
        # Longer than the operation timeout after the first outage began.
        done, _ = await asyncio.wait({polling}, timeout=transport.operation_timeout)
        assert not done, f"the poll ended while the server was up: {polling!r}"
        own_server.stop()
        await _until_down(transport)
        done, _ = await asyncio.wait({polling}, timeout=1.0)
        assert not done, f"the poll raised at once in the second outage: {polling!r}"
        with pytest.raises(TransientTransportError):
            await asyncio.wait_for(polling, transport.operation_timeout + 10)
    finally:
        polling.cancel()
        await asyncio.gather(polling, return_exceptions=True)
        if not own_server.running:
            own_server.start()
        await transport.aclose()
