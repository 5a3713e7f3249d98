"""pulsar:// against raw pulsar-client on the same pulsar-lite broker (from the
``pulsar-lite`` wheel, started here on a free loopback port with its metrics
endpoint disabled, stopped by PID), in the same run, alternating.

Baselines give the library's guarantees where the raw client can:

* enqueue: a non-batching producer, ``send_async`` with a receipt callback
  per message, the same number of sends in flight as the library's enqueues;
* poll+ack: ``receive`` + ``acknowledge`` in a thread (prefetch 64, as the
  library's consumers here), the
  best at-least-once loop the raw client offers. Its acks are *not* on the
  wire when ``acknowledge`` returns (the client groups them on a 100 ms
  tick); the library sends acks at once and ``ack()`` returns on the
  broker's receipt (with ``ack_receipts=False``: once handed to the
  connection) — see docs/backends/pulsar.md;
* sequential poll+ack: one ``receive`` -> ``acknowledge`` loop in a thread,
  one message at a time, with the library's default consumer settings
  (prefetch 1, acks sent at once, ack receipts), against one ``poll`` ->
  ``ack`` loop with the defaults; informational rows compare the same loop
  with the client's own grouped acks, and both sides without receipts;
* round trip: the raw client's own publish → receive → ack → reply publish →
  receive, with two threads.

``python -m benchmarks.pulsar [N] [ROUNDS]`` runs only the sequential rows
(N requests, default 2,000; ROUNDS alternating rounds, default 3) and prints
the load average around them.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import _pulsar
import pulsar

from benchmarks import _library as library
from benchmarks._common import (
    Row,
    Sizes,
    alternate,
    percentile,
    rss_mb,
    run_concurrently,
    throughput_row,
)
from benchmarks._library import PAYLOAD
from benchmarks.registry import registry_rows
from benchmarks.scaleout import scaleout_rows
from transport import (
    TransportConfig,
    WorkRequest,
    WorkResponse,
    connect,
)
from transport.testing.brokers import PulsarLiteBroker
from transport_pulsar._client import send_acks_at_once

#: Poller tasks (library) for poll+ack; the raw loop runs in one thread.
CONSUMERS = 64
#: Acks in flight at most in the library's poll+ack run (each runs in its
#: own task, as an ``Ensemble`` acks in the background).
ACKS_IN_FLIGHT = 4096
#: Prefetch for the library's consumers in the throughput runs (the option
#: ``receiver_queue_size``; the default, 1, suits long-running work).
PREFETCH = 64
OPTIONS = {"close_timeout_seconds": 5, "operation_timeout_seconds": 15}


def _broker() -> PulsarLiteBroker:
    """A pulsar-lite broker in a temporary directory (``close()`` removes it)."""
    broker = PulsarLiteBroker()
    broker.start()
    return broker


def _body() -> bytes:
    return WorkRequest(task="work", payload=PAYLOAD).model_dump_json().encode()


def _config(url: str, **options: Any) -> TransportConfig:
    return TransportConfig(url=url, namespace="bench", options={**OPTIONS, **options})


def _raw_client(url: str) -> pulsar.Client:
    # The library's default log routing: warnings and errors, filtered in C++.
    logger = pulsar.FileLogger(pulsar.LoggerLevel.Warn, "/dev/stderr")
    return pulsar.Client(url, operation_timeout_seconds=15, logger=logger)


def _topic(prefix: str) -> str:
    return f"persistent://public/default/bench.raw.{prefix}{uuid.uuid4().hex[:8]}"


# -- ours ----------------------------------------------------------------------
async def ours_consume(url: str, n: int, **options: Any) -> float:
    """``CONSUMERS`` pollers; each ack runs in its own task (at most
    ``ACKS_IN_FLIGHT`` at a time), so a poller moves on while an ack waits
    for the broker's receipt, as the raw loop moves on after
    ``acknowledge``. Timed from the start to the n-th completed ``ack()``."""
    transport = await connect(_config(url, receiver_queue_size=PREFETCH, **options))
    try:
        queue = transport.request_queue(f"c{uuid.uuid4().hex[:8]}")
        await library.fill(queue, n)
        start = time.perf_counter()
        _, last = await library.pipelined_poll_ack(queue, n, CONSUMERS, ACKS_IN_FLIGHT)
        return n / (last - start)
    finally:
        await transport.aclose()


async def backlog_memory(url: str, n: int) -> tuple[float, float, float, float]:
    """Fill an ``n`` request backlog, drain it with one queue handle (one
    poller; acks overlap in tasks of their own, at most
    ``ACKS_IN_FLIGHT`` at a time). Returns RSS before, after fill, peak while
    draining (MB) and the drain rate."""
    transport = await connect(_config(url, receiver_queue_size=PREFETCH))
    try:
        queue = transport.request_queue(f"backlog{uuid.uuid4().hex[:8]}")
        before = rss_mb()
        await run_concurrently(n, 64, lambda i: queue.enqueue(WorkRequest(task="w", payload=i)))
        filled = rss_mb()
        peak = filled
        done = 0
        slots = asyncio.Semaphore(ACKS_IN_FLIGHT)
        acks: set[asyncio.Task[bool]] = set()

        async def ack(delivery: Any) -> bool:
            try:
                return bool(await delivery.ack())
            finally:
                slots.release()

        start = time.perf_counter()
        while done < n:
            await slots.acquire()
            delivery = await queue.poll(5)
            if delivery is None:
                slots.release()
                break
            task = asyncio.create_task(ack(delivery))
            acks.add(task)
            task.add_done_callback(acks.discard)
            done += 1
            if done % 5000 == 0:
                peak = max(peak, rss_mb())
        if acks:
            await asyncio.gather(*acks)
        drain_rate = done / (time.perf_counter() - start)
        peak = max(peak, rss_mb())
        if done < n:
            raise RuntimeError(f"backlog drain stopped at {done} of {n}")
        return before, filled, peak, drain_rate
    finally:
        await transport.aclose()


# -- raw pulsar-client -----------------------------------------------------------
async def raw_enqueue(url: str, n: int, concurrency: int) -> float:
    """``send_async`` with a receipt callback, at most ``concurrency`` in flight."""

    def run() -> float:
        client = _raw_client(url)
        try:
            producer = client.create_producer(_topic("e"), batching_enabled=False)
            body = _body()
            producer.send(body)  # warm up
            window = threading.Semaphore(concurrency)
            done = threading.Event()
            remaining = [n]
            errors: list[Any] = []
            lock = threading.Lock()

            def receipt(result: Any, _msg_id: Any) -> None:
                if result != pulsar.Result.Ok:
                    errors.append(result)
                window.release()
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

            start = time.perf_counter()
            for _ in range(n):
                window.acquire()
                producer.send_async(body, receipt)
            done.wait(120)
            elapsed = time.perf_counter() - start
            if errors or not done.is_set():
                raise RuntimeError(f"raw sends failed: {errors[:3]}")
            producer.close()
            return n / elapsed
        finally:
            client.close()

    return await asyncio.to_thread(run)


async def raw_consume(url: str, n: int) -> float:
    """``receive`` + ``acknowledge`` (each message decoded, like the library)."""

    def run() -> float:
        client = _raw_client(url)
        try:
            topic = _topic("c")
            consumer = client.subscribe(
                topic,
                "w",
                consumer_type=pulsar.ConsumerType.Shared,
                initial_position=pulsar.InitialPosition.Earliest,
                receiver_queue_size=PREFETCH,
            )
            producer = client.create_producer(
                topic, batching_enabled=False, block_if_queue_full=True
            )
            body = _body()
            failed: list[Any] = []
            for _ in range(n):
                producer.send_async(
                    body,
                    lambda result, _id: (
                        None if result == pulsar.Result.Ok else failed.append(result)
                    ),
                )
            producer.flush()
            if failed:
                raise RuntimeError(f"raw fill failed: {failed[:3]}")
            start = time.perf_counter()
            for _ in range(n):
                msg = consumer.receive(30_000)
                WorkRequest.model_validate_json(msg.data())
                consumer.acknowledge(msg)
            elapsed = time.perf_counter() - start
            consumer.close()
            producer.close()
            return n / elapsed
        finally:
            client.close()

    return await asyncio.to_thread(run)


async def raw_sequential(url: str, n: int, *, acks: str = "receipts") -> float:
    """One thread: ``receive`` -> decode -> ``acknowledge``, one message at a
    time, prefetch 1 (the default of ``receiver_queue_size``). ``acks``:
    ``"receipts"`` (the library's default consumer settings: no ack
    grouping, ``acknowledge`` returns on the broker's receipt, as ``ack()``
    does), ``"at once"`` (no grouping, ``acknowledge`` returns once the ack
    is handed to the connection, as ``ack()`` with ``ack_receipts=False``)
    or ``"grouped"`` (the
    client's own default: acks grouped on a 100 ms tick, ``acknowledge``
    returns before its ack is on the wire)."""

    def run() -> float:
        client = _raw_client(url)
        try:
            topic = _topic("s")
            conf = _pulsar.ConsumerConfiguration()
            conf.consumer_type(pulsar.ConsumerType.Shared)
            conf.receiver_queue_size(1)
            conf.subscription_initial_position(_pulsar.InitialPosition.Earliest)
            conf.negative_ack_redelivery_delay_ms(100)
            if acks != "grouped" and not send_acks_at_once(conf, 100, receipts=acks == "receipts"):
                raise RuntimeError("this pulsar-client build does not allow ungrouped acks")
            consumer = client._client.subscribe(topic, "w", conf)
            producer = client.create_producer(
                topic, batching_enabled=False, block_if_queue_full=True
            )
            body = _body()
            for _ in range(n + 1):
                producer.send_async(body, lambda result, _id: None)
            producer.flush()
            consumer.acknowledge(consumer.receive(30_000))  # warm up, as ours
            start = time.perf_counter()
            for _ in range(n):
                msg = consumer.receive(30_000)
                WorkRequest.model_validate_json(msg.data())
                consumer.acknowledge(msg)  # with receipts: waits for the broker's receipt
            elapsed = time.perf_counter() - start
            consumer.close()
            producer.close()
            return n / elapsed
        finally:
            client.close()

    return await asyncio.to_thread(run)


async def raw_round_trip(url: str, n: int) -> list[float]:
    """Caller: send (receipt) to the request topic, wait for the reply on its
    reply topic. Worker thread: receive, reply (receipt), ack."""

    def run() -> list[float]:
        client = _raw_client(url)
        try:
            requests, replies = _topic("rq"), _topic("rp")
            worker_in = client.subscribe(requests, "w", consumer_type=pulsar.ConsumerType.Shared)
            caller_in = client.subscribe(replies, "c", consumer_type=pulsar.ConsumerType.Shared)
            to_worker = client.create_producer(requests, batching_enabled=False)
            to_caller = client.create_producer(replies, batching_enabled=False)
            stop = threading.Event()

            def worker() -> None:
                while not stop.is_set():
                    try:
                        msg = worker_in.receive(200)
                    except pulsar.Timeout:
                        continue
                    request = WorkRequest.model_validate_json(msg.data())
                    to_caller.send(
                        WorkResponse(request_id=request.request_id).model_dump_json().encode()
                    )
                    worker_in.acknowledge(msg)

            thread = threading.Thread(target=worker, daemon=True)
            thread.start()
            samples = []
            for i in range(n + 3):
                start = time.perf_counter()
                to_worker.send(WorkRequest(task="work", payload=PAYLOAD).model_dump_json().encode())
                reply = caller_in.receive(10_000)
                caller_in.acknowledge(reply)
                if i >= 3:  # warm-up
                    samples.append((time.perf_counter() - start) * 1000)
            stop.set()
            thread.join(5)
            return samples
        finally:
            client.close()

    return await asyncio.to_thread(run)


async def sequential_rows(
    url: str, n: int, rounds: int, progress: Callable[[str], None]
) -> list[Row]:
    """The sequential poll→ack rows: one worker, one request at a time,
    ``n`` requests, ``rounds`` alternating rounds (median)."""
    rows: list[Row] = []
    # (label, our ack_receipts, the raw loop's acks, note, target)
    variants: list[tuple[str, bool, str, str, float | None]] = [
        (
            "sequential poll+ack",
            True,
            "receipts",
            "one receive+acknowledge loop, prefetch 1, ack receipts (ours: one poll→ack loop, defaults)",
            0.5,
        ),
        (
            "sequential (raw grouped)",
            True,
            "grouped",
            "same loop, the client's default 100 ms ack grouping (acks not sent on return; informational)",
            None,
        ),
        (
            "sequential (no receipts)",
            False,
            "at once",
            "same loop, both with acks sent at once, unconfirmed (ours: ack_receipts=False; informational)",
            None,
        ),
    ]
    for label, receipts, raw_acks, note, target in variants:
        progress(f"pulsar: {label} ({n:,})")
        a, b = await alternate(
            lambda receipts=receipts: library.sequential_poll_ack(
                _config(url, ack_receipts=receipts), n
            ),
            lambda raw_acks=raw_acks: raw_sequential(url, n, acks=raw_acks),
            rounds,
        )
        rows.append(throughput_row("pulsar", label, a, b, note, target))
    return rows


async def run(sizes: Sizes, progress: Callable[[str], None]) -> list[Row]:
    broker = await asyncio.to_thread(_broker)
    url, r = broker.url, sizes.rounds
    rows: list[Row] = []
    try:
        progress("pulsar: enqueue")
        a, b = await alternate(
            lambda: library.enqueue(_config(url), sizes.enqueue, sizes.concurrency),
            lambda: raw_enqueue(url, sizes.enqueue, sizes.concurrency),
            r,
        )
        rows.append(
            throughput_row(
                "pulsar",
                "enqueue",
                a,
                b,
                f"send_async + receipt, unbatched, {sizes.concurrency} in flight",
                0.8,
            )
        )
        drain = max(sizes.enqueue // 10, 500)
        progress(f"pulsar: outbox drain ({drain:,})")
        rows.append(await library.outbox_row("pulsar", _config(url), drain, r))
        # The raw loop drains 2,000 in ~40 ms: too short to time; use 10,000.
        consume = max(sizes.consume, 10_000)
        progress(f"pulsar: poll+ack ({consume:,})")
        a, b = await alternate(
            lambda: ours_consume(url, consume),
            lambda: raw_consume(url, consume),
            r,
        )
        rows.append(
            throughput_row(
                "pulsar",
                "poll+ack",
                a,
                b,
                f"receive+acknowledge loop (ours: {CONSUMERS} pollers, acks confirmed, ≤{ACKS_IN_FLIGHT} in flight)",
                0.5,
            )
        )
        progress("pulsar: poll+ack without ack receipts")
        a, b = await alternate(
            lambda: ours_consume(url, consume, ack_receipts=False),
            lambda: raw_consume(url, consume),
            r,
        )
        rows.append(
            throughput_row(
                "pulsar",
                "poll+ack (no receipts)",
                a,
                b,
                "same; ours with ack_receipts=False: acks unconfirmed on return (informational)",
                None,
            )
        )
        progress(f"pulsar: poll_many({PREFETCH})+ack_many ({consume:,})")
        a, b = await alternate(
            lambda: library.batch_poll_ack(
                _config(url, receiver_queue_size=PREFETCH), consume, PREFETCH
            ),
            lambda: raw_consume(url, consume),
            r,
        )
        rows.append(
            throughput_row(
                "pulsar",
                f"poll_many({PREFETCH})+ack_many",
                a,
                b,
                "receive+acknowledge loop (ours: one batch loop, acks confirmed)",
                0.5,
            )
        )
        sequential = max(sizes.consume // 4, 2000)
        rows += await sequential_rows(url, sequential, r, progress)
        progress("pulsar: round trip")
        ours_samples: list[float] = []
        raw_samples: list[float] = []
        for i in range(r):
            if i % 2 == 0:
                ours_samples += await library.round_trip(_config(url), sizes.round_trips)
                raw_samples += await raw_round_trip(url, sizes.round_trips)
            else:
                raw_samples += await raw_round_trip(url, sizes.round_trips)
                ours_samples += await library.round_trip(_config(url), sizes.round_trips)
        for q in (0.5, 0.99):
            o, b = percentile(ours_samples, q), percentile(raw_samples, q)
            target = (b * 2 + 0.5) if q == 0.5 else None
            rows.append(
                Row(
                    "pulsar",
                    f"round trip p{int(q * 100)}",
                    round(o, 3),
                    round(b, 3),
                    "raw publish→consume→reply round trip",
                    "ms",
                    round(b / o, 3),
                    None if target is None else round(b / target, 3),
                )
            )
        progress("pulsar: ensemble end to end")
        thr = await library.ensemble(_config(url), sizes.round_trips * 2)
        rows.append(library.ensemble_row("pulsar", thr))
        backlog = 50_000 if sizes.quick else 1_000_000
        progress(f"pulsar: backlog of {backlog:,} drained by one worker")
        before, filled, peak, drain = await backlog_memory(url, backlog)
        rows.append(
            Row(
                "pulsar",
                f"backlog {backlog // 1000}k RSS peak",
                round(peak, 1),
                round(before, 1),
                f"RSS before fill (MB); after fill {filled:.0f} MB",
                "MB",
                0.0,
            )
        )
        rows.append(
            Row(
                "pulsar",
                f"backlog {backlog // 1000}k drain",
                round(drain, 1),
                0.0,
                "(informational)",
                "msg/s",
                0.0,
            )
        )
        rows += await scaleout_rows("pulsar", url, {}, sizes.quick, progress)
        rows += await registry_rows("pulsar", url, {}, sizes.quick, progress)
    finally:
        await asyncio.to_thread(broker.close)
    return rows


async def _sequential_main(n: int, rounds: int) -> None:
    broker = await asyncio.to_thread(_broker)
    try:
        before = os.getloadavg()
        rows = await sequential_rows(broker.url, n, rounds, lambda line: print(line, flush=True))
        after = os.getloadavg()
    finally:
        await asyncio.to_thread(broker.close)
    for row in rows:
        print(
            f"{row.operation:26s} ours {row.ours:10,.1f}  raw {row.baseline:10,.1f} msg/s"
            f"  ratio {row.ratio:.2f}"
        )
    print(f"load average {before[0]:.2f} {before[1]:.2f} -> {after[0]:.2f} {after[1]:.2f}")


if __name__ == "__main__":
    # Just the sequential rows: python -m benchmarks.pulsar [N] [ROUNDS]
    asyncio.run(
        _sequential_main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 2000,
            int(sys.argv[2]) if len(sys.argv) > 2 else 3,
        )
    )
