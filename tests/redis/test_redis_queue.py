"""Redis-specific queue behaviour beyond the conformance suite: what the
stream holds (retention, wire fields), leases longer than one lease,
delays longer than one lease, cancelled polls, and durability across a
``kill -9`` of the server with and without the append-only file."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.connection import Connection

from transport import TransportConfig, WorkRequest, connect
from transport._spi.shared import SharedQueueHandle
from transport.errors import TransientTransportError
from transport.testing._util import enqueue_all, make_requests, poll_until
from transport.testing.brokers import RedisServer
from transport.testing.harness import BackendHarness
from transport_redis import RedisTransport
from transport_redis._client import keys
from transport_redis._queue import _ACK, _LEASE, RedisDelivery

pytestmark = [pytest.mark.asyncio, pytest.mark.broker, pytest.mark.timeout(90)]


def _queue(transport: object, name: str, **kw: float) -> Any:
    """A handle on the queue the transport shares (its internals are the
    shared RedisRequestQueue's)."""
    assert isinstance(transport, RedisTransport)
    queue = transport.request_queue(name, **kw)  # type: ignore[arg-type]
    assert isinstance(queue, SharedQueueHandle)
    return queue


async def test_acked_requests_leave_the_stream_and_the_wire_is_plain_json(
    transport: RedisTransport, queue_name: str, harness: BackendHarness
) -> None:
    queue = _queue(transport, queue_name)
    [sent] = await enqueue_all(queue, make_requests(1))
    redis = transport.client.redis
    stream = keys.queue(transport.config.namespace, queue_name)
    [(_, fields)] = await redis.xrange(stream)
    assert set(fields) == {b"body"}
    body = json.loads(fields[b"body"])
    assert body["request_id"] == sent.request_id and body["task"] == sent.task
    delivery = await queue.poll(harness.scaled(10))
    assert delivery is not None
    assert await delivery.ack()
    assert await redis.xlen(stream) == 0, "an acked request must not stay in the stream"
    summary = await redis.xpending(stream, transport.config.consumer_group)
    assert summary["pending"] == 0


async def test_nack_error_and_attempts_travel_with_the_re_added_entry(
    transport: RedisTransport, queue_name: str, harness: BackendHarness
) -> None:
    queue = _queue(transport, queue_name)
    await enqueue_all(queue, make_requests(1))
    first = await queue.poll(harness.scaled(10))
    assert first is not None
    assert await first.nack(error="busy")
    stream = keys.queue(transport.config.namespace, queue_name)
    [(_, fields)] = await transport.client.redis.xrange(stream)
    assert (fields[b"attempts"], fields[b"error"]) == (b"1", b"busy")
    again = await queue.poll(harness.scaled(10))
    assert again is not None and again.attempt == 2
    assert await again.ack()


def _seconds(server_time: tuple[int, int]) -> float:
    seconds, micros = server_time
    return seconds + micros / 1e6


async def test_a_delay_longer_than_the_lease_is_kept(
    transport: RedisTransport, queue_name: str, harness: BackendHarness
) -> None:
    lease = harness.lease_seconds
    queue = _queue(transport, queue_name, lease_seconds=lease)
    [request] = await enqueue_all(queue, make_requests(1))
    delivery = await queue.poll(harness.scaled(10))
    assert delivery is not None
    delay = 3 * lease
    # The delay is counted on the Redis server's clock (TIME, a wall clock):
    # measured on the test host's monotonic clock, a step of the wall clock
    # (time sync on a fresh machine) made it look 0.28 s short once.
    redis = transport.client.redis
    nacked = _seconds(await redis.time())
    assert await delivery.nack(delay=delay)
    assert (await queue.stats()).delayed == 1
    back = await poll_until(queue, request.request_id, delay + harness.scaled(10))
    assert back is not None, "the delayed request never came back"
    assert _seconds(await redis.time()) - nacked >= delay - 0.001
    assert back.attempt == 2
    assert await back.ack()


async def test_extend_longer_than_the_lease_then_lapse(
    transport: RedisTransport,
    queue_name: str,
    harness: BackendHarness,
    make_transport: object,
) -> None:
    lease = harness.lease_seconds
    queue = _queue(transport, queue_name, lease_seconds=lease)
    [request] = await enqueue_all(queue, make_requests(1))
    held = await queue.poll(harness.scaled(10))
    assert held is not None
    span = 3 * lease
    extended = time.monotonic()
    assert await held.extend(span)
    rival = _queue(await make_transport(), queue_name, lease_seconds=lease)  # type: ignore[operator]
    stolen = await rival.poll(span - 0.5)
    assert stolen is None, "redelivered within an extension longer than the lease"
    # The extension ends; the holder's handle stops renewing and the lease
    # runs out one lease later.
    again = await poll_until(rival, request.request_id, lease + harness.scaled(10))
    assert again is not None and again.attempt == 2
    assert time.monotonic() - extended >= span
    assert await held.ack() is False
    assert await again.ack()


async def test_cancelled_polls_cost_no_attempt(
    transport: RedisTransport, queue_name: str, harness: BackendHarness
) -> None:
    queue = _queue(transport, queue_name, max_attempts=1000)
    [request] = await enqueue_all(queue, make_requests(1))
    handed_out = 0
    rng = random.Random(7)
    for _ in range(150):
        task = asyncio.ensure_future(queue.poll(harness.scaled(5)))
        await asyncio.sleep(rng.uniform(0, 0.004))
        task.cancel()
        try:
            delivery = await task
        except asyncio.CancelledError:
            continue
        assert delivery is not None, "a poll with a 5 s timeout returned nothing"
        handed_out += 1
        assert delivery.attempt == handed_out, "a cancelled poll used an attempt"
        assert await delivery.nack()
    # Orphans are given back in the background: the request comes back
    # (not after a lease) with one attempt per handing-out only.
    final = await poll_until(queue, request.request_id, harness.scaled(10))
    assert final is not None, "a cancelled poll lost the request"
    assert final.attempt == handed_out + 1, f"handed out {handed_out} times"
    assert handed_out < 150, "no poll was cancelled: the test proved nothing"
    assert await final.ack()


async def test_a_cancel_landing_as_a_poll_sends_its_wait_ends_the_poll(
    transport: RedisTransport,
    queue_name: str,
    harness: BackendHarness,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-py sends each command under ``asyncio.wait_for`` (the socket
    timeout), which on Python 3.11 returns the send's result when the
    caller is cancelled just after the send finished: the cancellation was
    lost, and a worker's ``while True: await queue.poll(0.2)`` loop went on
    polling after its task was cancelled (a hang for whoever awaits it).
    The cancel is aimed at that step: right after the poll's ``XREAD``
    went out."""
    queue = _queue(transport, queue_name)
    sent_wait = asyncio.Event()
    poller: asyncio.Task[None] | None = None
    original = Connection._send_packed_command

    async def send(self: Connection, command: Iterable[bytes]) -> None:
        chunks = list(command)
        await original(self, chunks)
        if poller is not None and not sent_wait.is_set() and b"\r\nXREAD\r\n" in chunks[0]:
            sent_wait.set()
            poller.cancel()

    monkeypatch.setattr(Connection, "_send_packed_command", send)

    async def worker() -> None:
        while True:
            await queue.poll(0.2)

    poller = asyncio.create_task(worker())
    try:
        async with asyncio.timeout(harness.scaled(10)):
            await sent_wait.wait()
        done, _ = await asyncio.wait({poller}, timeout=harness.scaled(5))
        assert done, "the poll loop went on after its task was cancelled"
        assert poller.cancelled()
    finally:
        poller.cancel()
        await asyncio.wait({poller}, timeout=harness.scaled(5))


async def test_polls_and_acks_waiting_on_a_cancelled_shared_call_get_an_error(
    transport: RedisTransport,
    queue_name: str,
    harness: BackendHarness,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The task making a shared lease or ack call may be cancelled (a close
    that timed out, a loop shutting down); the polls and acks waiting on it
    were not: they get an error of the queue's, not a cancellation and not
    a wait without end."""
    queue = _queue(transport, queue_name)
    await enqueue_all(queue, make_requests(1))
    held = await queue.poll(harness.scaled(10))
    assert held is not None
    client = transport.client
    original = client.run
    entered = asyncio.Event()

    async def stuck(source: str, keys_: list[str], args: list[Any], what: str) -> Any:
        if source in (_ACK, _LEASE):
            entered.set()
            await asyncio.Event().wait()  # never answers: only a cancel ends it
        return await original(source, keys_, args, what)

    monkeypatch.setattr(client, "run", stuck)
    starts: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (lambda: queue.poll(harness.scaled(10)), "_leaser"),
        (held.ack, "_acker"),
    ]
    for start, worker in starts:
        entered.clear()
        call = asyncio.ensure_future(start())
        async with asyncio.timeout(harness.scaled(10)):
            await entered.wait()
        shared = getattr(queue, worker)
        assert shared is not None and not shared.done()
        shared.cancel()
        async with asyncio.timeout(harness.scaled(10)):
            with pytest.raises(TransientTransportError, match="shared call was cancelled"):
                await call
    monkeypatch.undo()
    # The handle still works: the lease was never lost.
    assert await held.ack()


async def test_clean_close_deletes_its_consumer(
    transport: RedisTransport, queue_name: str, harness: BackendHarness, make_transport: object
) -> None:
    producer = _queue(transport, queue_name)
    await enqueue_all(producer, make_requests(2))
    client = await make_transport()  # type: ignore[operator]
    worker = _queue(client, queue_name)
    delivery = await worker.poll(harness.scaled(10))
    assert delivery is not None
    await client.aclose()
    stream = keys.queue(transport.config.namespace, queue_name)
    consumers = await transport.client.redis.xinfo_consumers(
        stream, transport.config.consumer_group
    )
    names = {c["name"].decode() for c in consumers}
    assert worker.consumer not in names, "a closed handle's consumer stays in the group"


async def _filled_then_killed(server: RedisServer, namespace: str, name: str) -> list[str]:
    config = TransportConfig(url=server.url, namespace=namespace)
    async with await connect(config) as transport:
        sent = await enqueue_all(transport.request_queue(name), make_requests(50))
    await asyncio.to_thread(server.kill)  # SIGKILL: no shutdown save
    await asyncio.to_thread(server.start)
    return [r.request_id for r in sent]


async def _all_ids(url: str, namespace: str, name: str, count: int) -> set[str]:
    async with await connect(TransportConfig(url=url, namespace=namespace)) as transport:
        queue = transport.request_queue(name)
        got: set[str] = set()
        while len(got) < count:
            delivery = await queue.poll(1.0)
            if delivery is None:
                break
            got.add(delivery.request.request_id)
            await delivery.ack()
        return got


async def test_aof_always_keeps_every_acknowledged_enqueue_across_kill_9(
    tmp_path: Path, namespace: str, queue_name: str
) -> None:
    server = RedisServer(tmp_path / "aof", appendfsync="always")
    server.start()
    try:
        sent = await _filled_then_killed(server, namespace, queue_name)
        assert await _all_ids(server.url, namespace, queue_name, len(sent)) == set(sent)
    finally:
        server.stop()


async def test_without_the_aof_a_restart_loses_everything_and_doctor_says_so(
    tmp_path: Path, namespace: str, queue_name: str
) -> None:
    # The contrast that shows the test above can fail, and why doctor
    # insists on appendonly.
    server = RedisServer(tmp_path / "noaof", aof=False)
    server.start()
    try:
        await _filled_then_killed(server, namespace, queue_name)
        assert await _all_ids(server.url, namespace, queue_name, 50) == set()
        async with await connect(TransportConfig(url=server.url, namespace=namespace)) as t:
            report = await t.doctor()
        assert not report.ok
        assert any("appendonly is off" in f.finding for f in report.findings), report
    finally:
        server.stop()


async def test_doctor_accepts_appendfsync_always(transport: RedisTransport) -> None:
    report = await transport.doctor()
    assert report.ok, report
    assert any("appendfsync always" in f.finding for f in report.findings), report


async def test_enqueue_wire_is_readable_by_another_program(
    transport: RedisTransport, queue_name: str, harness: BackendHarness
) -> None:
    # Another program reads the stream with plain commands: the body is the
    # documented WorkRequest JSON.
    queue = _queue(transport, queue_name)
    sent = await queue.enqueue(WorkRequest(task="interop", payload={"k": [1, 2]}))
    stream = keys.queue(transport.config.namespace, queue_name)
    [(_, fields)] = await transport.client.redis.xrange(stream)
    assert json.loads(fields[b"body"])["payload"] == {"k": [1, 2]}
    delivery = await poll_until(queue, sent.request_id, harness.scaled(10))
    assert delivery is not None
    await delivery.ack()


async def test_idle_consumers_of_crashed_handles_are_pruned(
    transport: RedisTransport, queue_name: str, harness: BackendHarness, make_transport: object
) -> None:
    # Consumers left by crashed handles: one with nothing pending is deleted
    # when a handle next opens the queue; one with a pending entry is kept.
    queue = _queue(transport, queue_name)
    await enqueue_all(queue, make_requests(2))
    held = await queue.poll(harness.scaled(10))
    assert held is not None
    stream = keys.queue(transport.config.namespace, queue_name)
    group = transport.config.consumer_group
    redis = transport.client.redis
    await redis.xgroup_createconsumer(stream, group, "crashed-empty")
    await redis.xreadgroup(group, "crashed-busy", {stream: ">"}, count=1)
    names = {c["name"].decode() for c in await redis.xinfo_consumers(stream, group)}
    assert {"crashed-empty", "crashed-busy", queue.consumer} <= names
    # "Unseen for long enough" without waiting an hour: a client whose
    # threshold is zero.
    options = {**transport.config.options, "idle_consumer_seconds": 0}
    pruner = await make_transport(options=options)  # type: ignore[operator]
    stats = await pruner.request_queue(queue_name).stats()
    assert stats.in_flight == 2
    await _queue(pruner, queue_name).poll(0)  # first use: prunes
    names = {c["name"].decode() for c in await redis.xinfo_consumers(stream, group)}
    assert "crashed-empty" not in names
    assert "crashed-busy" in names, "a consumer with a pending entry must be kept"
    assert queue.consumer in names, "a consumer holding a lease must be kept"
    assert await held.ack()


async def test_concurrent_polls_share_one_lease_script_and_take_no_more_than_asked(
    transport: RedisTransport, queue_name: str, harness: BackendHarness
) -> None:
    queue = _queue(transport, queue_name)
    sent = await enqueue_all(queue, make_requests(10))
    stream = keys.queue(transport.config.namespace, queue_name)
    redis = transport.client.redis
    await redis.config_resetstat()
    # Four polls waiting at once: one script call, four leases, six left unread.
    got = await asyncio.gather(*(queue.poll(harness.scaled(10)) for _ in range(4)))
    assert all(d is not None for d in got)
    assert len({d.request.request_id for d in got if d is not None}) == 4
    summary = await redis.xpending(stream, transport.config.consumer_group)
    assert summary["pending"] == 4, "a lease was taken that no poll asked for"
    stats = await redis.info("commandstats")
    assert stats["cmdstat_xreadgroup"]["calls"] == 1, stats.get("cmdstat_xreadgroup")
    # Acks issued together: each is checked and answered on its own (a
    # stale one among them is False and the others still take effect).
    first = got[0]
    assert first is not None
    assert await first.ack()
    stale = RedisDelivery(first.request, queue, first._entry, first._count)
    await redis.config_resetstat()
    acked = await asyncio.gather(stale.ack(), *(d.ack() for d in got[1:] if d is not None))
    assert acked == [False, True, True, True]
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1, "acks issued together went one by one"
    assert (await redis.xpending(stream, transport.config.consumer_group))["pending"] == 0
    assert await redis.xlen(stream) == 6
    rest = [await queue.poll(harness.scaled(10)) for _ in range(6)]
    assert {d.request.request_id for d in [*got, *rest] if d is not None} == {
        r.request_id for r in sent
    }
    assert all([await d.ack() for d in rest if d is not None])


async def test_concurrent_enqueues_are_each_stored_once(
    transport: RedisTransport, queue_name: str
) -> None:
    queue = _queue(transport, queue_name)
    requests = make_requests(50)
    await asyncio.gather(*(queue.enqueue(r) for r in requests))
    stream = keys.queue(transport.config.namespace, queue_name)
    rows = await transport.client.redis.xrange(stream)
    ids = [json.loads(fields[b"body"])["request_id"] for _, fields in rows]
    assert sorted(ids) == sorted(r.request_id for r in requests)


async def test_more_concurrent_commands_than_connections_all_get_their_turn(
    redis_config: TransportConfig,
) -> None:
    # 16 writers looping on a pool of 4 connections, one held by a blocking
    # registry watch: with redis-py's own pool a writer that released its
    # connection took it straight back, and a waiter starved until it failed
    # with "No connection available" after request_timeout (1 s here).
    config = redis_config.model_copy(
        update={"options": {**redis_config.options, "max_connections": 4, "request_timeout": 1.0}}
    )
    transport = await connect(config)
    try:
        registry = transport.delivery_registry("fair")
        await registry.pending()  # its view now holds a connection in a blocking read
        stop = asyncio.get_running_loop().time() + 4.0
        done = [0] * 16

        async def writer(n: int) -> None:
            while asyncio.get_running_loop().time() < stop:
                await registry.register(f"r{n}-{done[n]}")
                done[n] += 1

        await asyncio.gather(*(writer(n) for n in range(16)))
        assert all(done), done
        assert len(await registry.pending()) == sum(done)
    finally:
        await transport.aclose()
