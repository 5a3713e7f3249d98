"""This library's side of the benchmarks, the same on every backend.

Each function connects with ``target`` (a URL or a ``TransportConfig``),
measures one operation through the public API only, and closes the
transport. The raw-client baselines stay in the backend modules.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks._common import Row, alternate, rate, run_concurrently, throughput_row
from transport import (
    DeadLetter,
    Delivery,
    Ensemble,
    Network,
    Outbox,
    QueueStats,
    RequestQueue,
    TaskContext,
    TransientTransportError,
    TransportConfig,
    WorkRequest,
    WorkResponse,
    connect,
)

PAYLOAD = {"dish": "soup", "table": 7, "notes": "x" * 200}
#: Callers in flight in the request/response rows (ours and FastStream's).
CALLERS = 32

Target = str | TransportConfig


def requests(n: int) -> list[WorkRequest]:
    return [WorkRequest(task="work", payload=PAYLOAD) for _ in range(n)]


async def enqueue(target: Target, n: int, concurrency: int, *, warm_up: bool = True) -> float:
    """Durable enqueues per second, ``concurrency`` in flight."""
    transport = await connect(target)
    try:
        queue = transport.request_queue(f"e{uuid.uuid4().hex[:8]}")
        batch = requests(n)
        if warm_up:
            await queue.enqueue(WorkRequest(task="warmup"))
        return await rate(
            n, lambda: run_concurrently(n, concurrency, lambda i: queue.enqueue(batch[i]))
        )
    finally:
        await transport.aclose()


async def enqueue_many(target: Target, n: int, batch: int) -> float:
    """Durable enqueues per second through ``enqueue_many``, ``batch``
    requests per call, one call after the other."""
    transport = await connect(target)
    try:
        queue = transport.request_queue(f"m{uuid.uuid4().hex[:8]}")
        items = requests(n)

        async def body() -> None:
            for i in range(0, n, batch):
                await queue.enqueue_many(items[i : i + batch])

        return await rate(n, body)
    finally:
        await transport.aclose()


async def fill(queue: RequestQueue, n: int) -> None:
    """Enqueue ``n`` requests (64 at a time): a benchmark's backlog."""
    await run_concurrently(
        n, 64, lambda i: queue.enqueue(WorkRequest(task="work", payload=PAYLOAD))
    )


async def pipelined_poll_ack(
    queue: RequestQueue, n: int, pollers: int, in_flight: int
) -> tuple[float, float]:
    """``pollers`` loops polling one request at a time; each ack runs in its
    own task (at most ``in_flight`` at a time), so a poller moves on while
    its ack is made durable -- as an ``Ensemble`` with concurrency > 1 acks,
    and as a raw loop moves on after an asynchronous commit or
    ``acknowledge``. Returns ``time.perf_counter()`` at the first delivery
    and at the n-th ``ack()`` returned (each must return True)."""
    polled = acked = 0
    first: float | None = None
    end = 0.0
    failed: list[BaseException] = []
    finished = asyncio.Event()
    slots = asyncio.Semaphore(in_flight)
    acks: set[asyncio.Task[None]] = set()

    async def ack(delivery: Delivery) -> None:
        nonlocal acked, end
        try:
            if not await delivery.ack():
                raise RuntimeError("ack of a live delivery returned False")
            acked += 1
            if acked == n:
                end = time.perf_counter()
                finished.set()
        except Exception as exc:  # fails the run at once (not after the wait)
            failed.append(exc)
            finished.set()
        finally:
            slots.release()

    async def consume() -> None:
        nonlocal polled, first
        while polled < n:
            await slots.acquire()
            delivery = await queue.poll(0.5)
            if delivery is None:
                slots.release()
                continue
            if first is None:
                first = time.perf_counter()
            polled += 1
            task = asyncio.create_task(ack(delivery))  # the no-op handler returned
            acks.add(task)
            task.add_done_callback(acks.discard)

    tasks = [asyncio.create_task(consume()) for _ in range(pollers)]
    try:
        await asyncio.wait_for(finished.wait(), 600)
    finally:
        for task in tasks:
            task.cancel()  # idle ones wait in poll(), which is cancellation-safe
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*acks, return_exceptions=True)
    if failed:
        raise failed[0]
    assert first is not None
    return first, end


async def sequential_poll_ack(target: Target, n: int) -> float:
    """Requests per second through one worker looping ``poll`` -> ``ack``,
    one request at a time: each ``ack()`` returns before the next ``poll``.
    ``n`` requests are enqueued first; the first delivery (joining the
    queue) is not timed."""
    transport = await connect(target)
    try:
        queue = transport.request_queue(f"s{uuid.uuid4().hex[:8]}")
        await fill(queue, n + 1)
        first = await queue.poll(30)
        if first is None or not await first.ack():
            raise RuntimeError("sequential poll+ack: the first request never arrived")

        async def body() -> None:
            for done in range(n):
                delivery = await queue.poll(30)
                if delivery is None:
                    raise RuntimeError(f"sequential poll+ack stopped after {done} of {n}")
                if not await delivery.ack():
                    raise RuntimeError("ack of a live delivery returned False")

        return await rate(n, body)
    finally:
        await transport.aclose()


async def batch_poll_ack(target: Target, n: int, batch: int = 64) -> float:
    """Requests per second through one loop taking ``poll_many(batch)`` and
    settling it with ``ack_many`` (the batch path; each ``ack_many``
    returns once the acks are durable), timed from the first batch
    received to the last ack. ``n`` requests are enqueued first (untimed)."""
    transport = await connect(target)
    try:
        queue = transport.request_queue(f"b{uuid.uuid4().hex[:8]}")
        await fill(queue, n)
        done = 0
        start: float | None = None
        while done < n:
            got = await queue.poll_many(batch, 30)
            if not got:
                raise RuntimeError(f"poll_many+ack_many stopped after {done} of {n}")
            if start is None:
                start = time.perf_counter()
            if not all(await queue.ack_many(got)):
                raise RuntimeError("ack_many of live deliveries returned False")
            done += len(got)
        assert start is not None
        return n / (time.perf_counter() - start)
    finally:
        await transport.aclose()


async def round_trip(target: Target, n: int, *, warm_ups: int = 3) -> list[float]:
    """Milliseconds from ``register`` + ``enqueue`` to the response, through
    the delivery registry, one request at a time.

    One poller; each request is answered and acked in its own task, as an
    ``Ensemble`` with concurrency > 1 does: the worker does not hold up the
    next request while the previous ack is being made durable.
    """
    transport = await connect(target)
    try:
        queue = transport.request_queue(f"r{uuid.uuid4().hex[:8]}")
        inbox = transport.delivery_registry("bench-caller")
        registry = transport.delivery_registry("bench-caller")
        stop = asyncio.Event()
        handlers: set[asyncio.Task[None]] = set()

        async def handle(delivery: Any) -> None:
            await registry.complete(
                delivery.request.request_id, WorkResponse(request_id=delivery.request.request_id)
            )
            await delivery.ack()

        async def worker() -> None:
            while not stop.is_set():
                delivery = await queue.poll(0.2)
                if delivery is None:
                    continue
                task = asyncio.create_task(handle(delivery))
                handlers.add(task)
                task.add_done_callback(handlers.discard)

        async def once() -> float:
            start = time.perf_counter()
            request = WorkRequest(task="work", payload=PAYLOAD, reply_to="bench-caller")
            pending = await inbox.register(request.request_id)
            await queue.enqueue(request)
            await pending.result(10)
            return (time.perf_counter() - start) * 1000

        task = asyncio.create_task(worker())
        try:
            for _ in range(warm_ups):  # producer, consumer, registry watch
                await once()
            return [await once() for _ in range(n)]
        finally:
            stop.set()
            await task
            if handlers:
                await asyncio.gather(*handlers)
    finally:
        await transport.aclose()


async def bus_latency(target: Target, n: int) -> list[float]:
    """Publish→receive on the event bus, one event at a time (ms each)."""
    transport = await connect(target)
    try:
        bus = transport.event_bus()
        subject = f"bench.lat.{uuid.uuid4().hex[:8]}"
        subscription = await bus.subscribe(subject)
        samples = []
        for i in range(n):
            start = time.perf_counter()
            await bus.publish(subject, i)
            event = await subscription.next(timeout=5)
            assert event is not None and event.data == i
            samples.append((time.perf_counter() - start) * 1000)
        await subscription.aclose()
        return samples
    finally:
        await transport.aclose()


async def ensemble(
    target: Target, n: int, *, concurrency: int = 16, callers: int = CALLERS
) -> float:
    """Requests per second answered end to end by an ``Ensemble``
    (``Network.request``: register, enqueue, handle, complete, ack, collect)."""
    transport = await connect(target)
    try:
        name = f"bench{uuid.uuid4().hex[:8]}"
        ens = Ensemble(name, transport=transport, concurrency=concurrency, advertise=False)

        @ens.task("work")
        async def work(ctx: TaskContext) -> int:
            return 1

        caller = Network(transport, caller=f"{name}-caller")
        async with ens:
            await caller.request(name, "work", PAYLOAD, timeout=60)  # warm up

            async def one(i: int) -> None:
                await caller.request(name, "work", PAYLOAD, timeout=60)

            return await rate(n, lambda: run_concurrently(n, callers, one))
    finally:
        await transport.aclose()


def request_reply_row(backend: str, ours: list[float], theirs: list[float], how: str) -> Row:
    """``Ensemble`` request/response against FastStream's request/reply on
    the same broker (target: at least as many per second, although ours is
    durable and theirs is not)."""
    return throughput_row(
        backend,
        "ensemble request/response",
        ours,
        theirs,
        f"FastStream request/reply, {CALLERS} callers ({how}; not durable: a request in "
        "flight is lost with its process, ours is a durable queue + delivery registry)",
        1.0,
        unit="req/s",
    )


def ensemble_row(backend: str, requests_per_second: float, why: str = "") -> Row:
    """The informational row of :func:`ensemble` (no baseline does the same;
    ``why``: why there is none on this broker)."""
    return Row(
        backend,
        "ensemble request/response",
        round(requests_per_second, 1),
        0.0,
        f"(informational{': ' + why if why else ''})",
        "req/s",
        0.0,
    )


class _Unreachable(RequestQueue):
    """A destination that is always down: the outbox stores and holds."""

    name = "unreachable"
    lease_seconds = 30.0
    max_attempts = 5

    async def enqueue(self, request: WorkRequest) -> WorkRequest:
        raise TransientTransportError("unreachable (benchmark)")

    async def poll(self, timeout: float | None = None) -> Delivery | None:
        raise TransientTransportError("unreachable (benchmark)")

    async def stats(self) -> QueueStats:
        raise TransientTransportError("unreachable (benchmark)")

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        raise TransientTransportError("unreachable (benchmark)")

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        raise TransientTransportError("unreachable (benchmark)")

    async def aclose(self) -> None:
        return None


async def outbox_drain(target: Target, n: int) -> float:
    """Requests per second an :class:`~transport.Outbox` forwards: ``n``
    requests stored while the destination was unreachable (untimed), then a
    new outbox on the file, timed until ``flush()`` returns (every request
    accepted by the queue)."""
    transport = await connect(target)
    try:
        name = f"o{uuid.uuid4().hex[:8]}"
        await transport.request_queue(name).enqueue(WorkRequest(task="warmup"))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "outbox.db"
            async with Outbox(
                transport, path, queue_factory=lambda queue, levels: _Unreachable()
            ) as holding:
                for request in requests(n):
                    await holding.enqueue(name, request)
                if await holding.depth() != n:
                    raise RuntimeError("outbox drain: the requests were not all held")
            async with Outbox(transport, path) as outbox:
                return await rate(n, lambda: outbox.flush(600))
    finally:
        await transport.aclose()


async def outbox_row(backend: str, target: Target, n: int, rounds: int) -> Row:
    """:func:`outbox_drain` of ``n`` requests against one ``enqueue`` after
    the other (what a line that sends each request once the one before it
    was accepted can reach on this backend; informational), alternating,
    ``rounds`` each."""
    drained, sequential = await alternate(
        lambda: outbox_drain(target, n), lambda: enqueue(target, n, 1), rounds
    )
    return throughput_row(
        backend,
        "outbox drain",
        drained,
        sequential,
        "one enqueue after the other, awaited (the outbox's FIFO sending; informational)",
        None,
        unit="req/s",
    )
