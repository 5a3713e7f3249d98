"""NATS-specific behaviour beyond the conformance suite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import transport_nats
from transport import Transport, TransportConfig, WorkRequest, connect
from transport._spi.shared import SharedQueueHandle
from transport.errors import ConfigurationError, InvalidNameError, TransientTransportError
from transport.testing.brokers import NatsServer, free_port
from transport_nats import NatsOptions, NatsRequestQueue, NatsTransport
from transport_nats._config import parse_servers

pytestmark = [pytest.mark.timeout(60)]


def test_public_names_import() -> None:
    for name in transport_nats.__all__:
        assert getattr(transport_nats, name) is not None


def test_server_list_and_credentials_from_url() -> None:
    servers, creds = parse_servers("nats://alice:pw@h1:4222,h2,nats://h3:5222", ["tls://h4"])
    assert servers == ["nats://h1:4222", "nats://h2:4222", "nats://h3:5222", "tls://h4:4222"]
    assert creds == {"user": "alice", "password": "pw"}
    assert parse_servers("nats://tok@h1", [])[1] == {"token": "tok"}
    with pytest.raises(ConfigurationError):
        parse_servers("nats://h1/path", [])
    with pytest.raises(ConfigurationError):
        parse_servers("nats://h1:notaport", [])


def test_unknown_or_bad_options_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="dupe_window"):
        NatsTransport(TransportConfig(url="nats://127.0.0.1:4222", options={"dupe_window": 1}))
    with pytest.raises(ConfigurationError, match="pull_expires"):
        NatsTransport(TransportConfig(url="nats://127.0.0.1:4222", options={"pull_expires": -1}))
    assert NatsOptions().duplicate_window == 120.0


async def test_unreachable_server_is_transient() -> None:
    with pytest.raises(TransientTransportError, match="no NATS server reachable"):
        await connect(
            TransportConfig(url=f"nats://127.0.0.1:{free_port()}", options={"connect_timeout": 1})
        )


async def test_a_port_that_never_speaks_nats_is_named_as_such() -> None:
    """Something accepts the connection and says nothing (another service's
    port, a paused server): the error says no NATS server answered, not an
    empty "(TimeoutError: )"."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TransientTransportError, match="no NATS server answered") as caught:
            await connect(
                TransportConfig(url=f"nats://127.0.0.1:{port}", options={"connect_timeout": 1})
            )
        assert "connect timeout" in str(caught.value)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def test_broker_names_follow_the_documented_mapping(nats_config: TransportConfig) -> None:
    transport = NatsTransport(nats_config)
    queue = NatsRequestQueue(transport.ctx, "orders", lease_seconds=1, max_attempts=3)
    ns = nats_config.namespace
    assert (queue.stream, queue.subject) == (f"{ns}__orders", f"{ns}.q.orders")
    assert (queue.dlq_stream, queue.dlq_subject) == (f"{ns}__orders__dlq", f"{ns}.dlq.orders")
    for bad in ("a.b", "a*", "a>", "a b", "$SYS", "a__b"):
        with pytest.raises(InvalidNameError):
            transport.request_queue(bad)


async def test_poll_zero_is_prompt(transport: Transport, queue_name: str) -> None:
    queue = transport.request_queue(queue_name, lease_seconds=2)
    started = time.monotonic()
    assert await queue.poll(0) is None
    assert time.monotonic() - started < 0.5
    sent = await queue.enqueue(WorkRequest(task="t"))
    started = time.monotonic()
    delivery = await queue.poll(0)
    assert time.monotonic() - started < 0.5
    assert delivery is not None and delivery.request.request_id == sent.request_id
    assert await delivery.ack()


async def test_a_burst_of_first_enqueues_creates_the_streams_once(
    transport: Transport, queue_name: str
) -> None:
    """Concurrent first enqueues on a new queue share one creation of each
    stream (each made its own before: of 20,000, most timed out)."""
    assert isinstance(transport, NatsTransport)
    js = transport.ctx.js
    created: list[str] = []
    add_stream = js.add_stream

    async def counted(config: Any = None, **params: Any) -> Any:
        created.append(config.name)
        return await add_stream(config, **params)

    js.add_stream = counted  # type: ignore[method-assign]
    queue = transport.request_queue(queue_name)
    stored = await asyncio.gather(
        *(queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(300))
    )
    assert len({r.request_id for r in stored}) == 300
    assert len(created) == len(set(created)), (
        f"{len(created)} creations of {len(set(created))} streams"
    )
    assert (await queue.stats()).depth == 300


async def test_retried_enqueue_is_stored_once(transport: Transport, queue_name: str) -> None:
    queue = transport.request_queue(queue_name, lease_seconds=2)
    request = WorkRequest(task="t")
    await queue.enqueue(request)
    await queue.enqueue(request)  # a retry with the same request_id (Nats-Msg-Id)
    assert (await queue.stats()).depth == 1
    delivery = await queue.poll(2)
    assert delivery is not None and await delivery.ack()
    assert await queue.poll(0.5) is None


async def test_requeued_dead_letter_is_not_swallowed_by_the_duplicate_window(
    transport: Transport, queue_name: str
) -> None:
    queue = transport.request_queue(queue_name, lease_seconds=2, max_attempts=1)
    sent = await queue.enqueue(WorkRequest(task="t", payload={"k": 1}))
    delivery = await queue.poll(2)
    assert delivery is not None and await delivery.nack(error="boom")
    [dead] = await queue.dead_letters()
    assert dead.error == "boom" and dead.attempts == 1
    for _ in range(2):  # requeued twice within the duplicate window
        assert await queue.requeue_dead_letters() == 1
        again = await queue.poll(2)
        assert again is not None and again.request.request_id == sent.request_id
        assert again.attempt == 1
        assert await again.nack()
    assert await queue.stats() == (await queue.stats()).model_copy(update={"dead_lettered": 1})


async def test_single_extend_longer_than_the_ack_wait_holds_the_lease(
    make_transport: Callable[[], Awaitable[Transport]], queue_name: str
) -> None:
    t1 = await make_transport()
    t2 = await make_transport()
    lease = 1.0
    worker = t1.request_queue(queue_name, lease_seconds=lease)
    rival = t2.request_queue(queue_name, lease_seconds=lease)
    await worker.enqueue(WorkRequest(task="long"))
    delivery = await worker.poll(2)
    assert delivery is not None
    assert await delivery.extend(4 * lease)  # one call; renewed in the background
    assert await rival.poll(3.5 * lease) is None
    assert await delivery.ack()


async def test_nack_with_delay_is_counted_as_leased(transport: Transport, queue_name: str) -> None:
    queue = transport.request_queue(queue_name, lease_seconds=2)
    await queue.enqueue(WorkRequest(task="t"))
    delivery = await queue.poll(2)
    assert delivery is not None and await delivery.nack(delay=1.0)
    stats = await queue.stats()
    assert (stats.depth, stats.in_flight, stats.delayed) == (0, 1, None)
    assert await queue.poll(0.3) is None
    again = await queue.poll(3)
    assert again is not None and again.attempt == 2
    assert await again.ack()


async def test_health_reports_a_dead_server_without_raising(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "h")
    server.start()
    transport = await connect(
        TransportConfig(url=server.url, options={"reconnect_time_wait": 0.1, "request_timeout": 1})
    )
    try:
        assert (await transport.health()).ok
        server.kill()
        # No grace period: whether or not the client has noticed the
        # disconnect yet, the very next check must say the server is gone.
        status = await transport.health()
        assert not status.ok, f"health still ok right after the server was killed: {status}"
    finally:
        server.stop()
        await transport.aclose()


async def test_keyed_log_get_by_direct_get(transport: Transport, namespace: str) -> None:
    """Values, empty values, delete markers and missing keys, read with the
    direct get (single replica)."""
    from transport_nats._registries import NatsKeyedLog

    assert isinstance(transport, NatsTransport)
    log = NatsKeyedLog(transport.ctx, f"{namespace}__delivery__direct")
    await log.put("a", b"one")
    await log.put("empty", b"")
    assert await log.get("a") == b"one"
    assert await log.get("empty") == b""
    assert await log.get("missing") is None
    await log.delete("a")
    assert await log.get("a") is None
    await log.put("a", b"two")
    assert await log.get("a") == b"two"
    kv = await log._bucket()
    assert getattr(kv, "_direct", False), "single-replica buckets use direct gets"


async def test_prefetch_buffer_is_bounded_and_handed_back_on_close(
    nats_config: TransportConfig, queue_name: str
) -> None:
    """With prefetch 4, one poll takes at most 4 from the server; closing the
    handle hands the buffered ones back at once for another worker."""
    config = nats_config.model_copy(update={"options": {**nats_config.options, "prefetch": 4}})
    first = await connect(config)
    second = await connect(nats_config)
    try:
        queue: Any = first.request_queue(queue_name)
        # A handle on the queue the transport shares (its internals below).
        assert isinstance(queue, SharedQueueHandle)
        requests = [WorkRequest(task="t", payload={"i": i}) for i in range(10)]
        for request in requests:
            await queue.enqueue(request)
        delivery = await queue.poll(5)
        assert delivery is not None
        assert len(queue._buffer) <= 3
        stats = await queue.stats()
        assert stats.in_flight == 1, "buffered requests count as depth, not in flight"
        assert stats.depth == 9
        assert await delivery.ack()
        await queue.aclose()
        other = second.request_queue(queue_name)
        seen: set[str] = set()
        start = time.monotonic()
        while len(seen) < 9:
            got = await other.poll(5)
            assert got is not None, f"only {len(seen)} of 9 came back"
            seen.add(got.request.request_id)
            assert await got.ack()
        assert time.monotonic() - start < 5, "buffered requests must not wait for the ack wait"
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_handle_per_poll_keeps_no_subscription_or_task_per_handle(
    transport: Transport, queue_name: str
) -> None:
    """Each handle pulled through an inbox subscription of its own, with a
    task, kept until the transport closed: a loop opening a handle per poll
    grew by one of each per iteration (300 iterations: 307 tasks). The
    handles of one transport now share one."""
    producer = transport.request_queue(queue_name)
    assert isinstance(transport, NatsTransport)

    async def one() -> None:
        await producer.enqueue(WorkRequest(task="t"))
        delivery = await transport.request_queue(queue_name).poll(5)
        assert delivery is not None and await delivery.ack()

    await one()  # the first poll opens what the handles share
    tasks = len(asyncio.all_tasks())
    subscriptions = len(transport.nc._subs)
    for _ in range(30):
        await one()
    assert len(asyncio.all_tasks()) <= tasks + 2
    assert len(transport.nc._subs) <= subscriptions + 2


async def test_stats_report_the_head_of_the_queue(transport: Transport) -> None:
    from tests._head import check_head_is_the_next_in_line

    await check_head_is_the_next_in_line(transport, "orders")


async def test_a_request_within_the_limit_but_over_the_servers_with_headers_is_refused(
    transport: Transport, queue_name: str
) -> None:
    # The server counts the headers (Nats-Msg-Id, Nats-Expected-Stream) in
    # its max_payload: a body just under max_payload_bytes (1 MiB, the
    # server's default too) went out, the server closed the connection
    # ("maximum payload exceeded") and every later operation of the
    # transport failed for good. It is refused before anything is sent now.
    from transport.errors import PayloadTooLargeError

    queue = transport.request_queue(queue_name)
    await queue.enqueue(WorkRequest(task="t", payload="small"))
    limit = transport.config.max_payload_bytes
    edge = WorkRequest(task="t", payload="x" * (limit - 300))
    assert len(edge.model_dump_json().encode()) < limit
    with pytest.raises(PayloadTooLargeError):
        await queue.enqueue(edge)
    await queue.enqueue(WorkRequest(task="t", payload="still fine"))
    assert (await transport.health()).ok
    got = [await queue.poll(5) for _ in range(2)]
    assert [d.request.payload for d in got if d is not None] == ["small", "still fine"]


async def test_a_body_too_large_for_its_dead_letter_is_dead_lettered_without_it(
    transport: Transport, queue_name: str, transport_harness: Any
) -> None:
    """Another program's undecodable body near the server's limit: its dead
    letter (the body as base64, a third larger) exceeded the limit, so the
    message came back every lease period, never dead-lettered. It is
    dead-lettered without the body, the error says so, and the request
    behind it is delivered."""
    queue = transport.request_queue(queue_name, max_attempts=3)
    await transport_harness.inject_raw(transport, queue_name, b"\x80" * 900_000)
    valid = await queue.enqueue(WorkRequest(task="t", payload=1))
    delivery = await queue.poll(10)
    assert delivery is not None and delivery.request.request_id == valid.request_id
    assert await delivery.ack()
    [dead] = await queue.dead_letters()
    assert dead.raw is None and dead.request is None
    assert "900,000 bytes, was too large to keep" in dead.error, dead.error
