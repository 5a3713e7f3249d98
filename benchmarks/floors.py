"""``python -m benchmarks.floors [--n N] [--rounds R]``: how far the missed
in-process targets of ``make bench`` can be reached at all.

For each of them, the work every request needs done in the plainest way
(one thread, no event loop, no store thread), beside the row's raw baseline
and this library, alternating (median of ``--rounds``):

* ``memory`` put+get+ack against kombu's memory transport: only building,
  stamping (``enqueued_at``), encoding and decoding each request -- the JSON
  round trip every backend makes and ``memory://`` keeps (a handler cannot
  change a stored request, a payload that would not survive JSON is
  refused) -- with no queue at all.
* ``sqlite`` enqueue against raw batched inserts: the multi-row ``INSERT``
  of 64 requests into this backend's own table (its columns and index),
  with the next sequence number read, one fsynced commit per 64.
* ``sqlite`` poll+ack (32 pollers) and ``poll_many(64)``: per round of 32 or
  64 rows, the lease (``SELECT``, ``UPDATE``, a commit without fsync), the
  decoding of each request and the ack (``DELETE … RETURNING``, an fsynced
  commit), as this backend does, in one thread.
* with ``--kafka`` (starts its own Tansu broker, stopped by its PID):
  ``kafka`` ``poll_many(500)`` + ``ack_many`` against the raw
  ``consume(500)`` loop with asynchronous commits: per batch of the raw
  client's ``consume(500)``, the batch's delivery counts written as one
  record of a state topic and awaited (``acks=all``) before any request of
  it is decoded, each request decoded as the raw loop does, then a
  synchronous commit of the batch (acks durable on return): the durable
  steps ``kafka://`` makes, in one thread, without an event loop.
* with ``--nats`` (starts its own nats-server, JetStream on file storage
  with its default fsync interval, as ``benchmarks.nats``; stopped by its
  PID): ``nats`` ``Ensemble`` request/response against FastStream's
  request/reply (core NATS, nothing kept): per request, the durable steps
  an ``Ensemble`` request makes on ``nats://``, with raw nats-py in one
  process and no library: the caller registers it (a key-value put),
  enqueues it (a JetStream publish with ``Nats-Msg-Id``, the PubAck
  awaited) and waits for its answer on a watch of the bucket; a worker
  (16 requests at a time, pulled from a durable consumer) decodes it, puts
  the answer and acks with the server's confirmation; the caller collects
  the answer (deleting both keys, together). Four acknowledged writes and
  one confirmed ack per request, as many callers and handlers as the row
  (``--n`` / 5 requests per measurement: this row runs at a few thousand a
  second).
* with ``--pulsar`` (starts its own pulsar-lite, stopped by its PID):
  ``pulsar`` enqueue (64 in flight) against the raw client's
  ``send_async`` loop in a thread (the same bytes every time, a receipt
  callback): the least an asyncio ``enqueue`` that returns on the broker's
  receipt does with this client -- stamp ``enqueued_at`` and encode each
  request (the row's requests are built before the timer, as for ours),
  ``send_async`` it on an unbatched producer, and complete one future per
  request from the receipt callbacks, which wake the event loop once per
  burst of receipts (one ``call_soon_threadsafe`` while earlier ones are
  still waiting to be run).

A ratio of the floor below a row's target means the target cannot be met
without giving up what the floor does; above it, the gap is this
library's own work (see ``docs/backends/sqlite.md``, "Performance").
Not part of ``make bench``: it writes no results. ``--kafka`` adds the Kafka
batch row (about a minute more), ``--nats`` the NATS request/response row
and ``--pulsar`` the Pulsar enqueue row (about a minute more each).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks import _library as library
from benchmarks._common import rate, run_concurrently
from benchmarks._library import PAYLOAD
from benchmarks.inprocess import (
    kombu_put_get_ack,
    ours_consume,
    ours_put_get_ack,
    raw_sqlite_batched_insert,
    raw_sqlite_consume,
)
from transport import WorkRequest
from transport._spi.codec import decode_request, encode
from transport._spi.models import replace_fields, utcnow
from transport_inprocess.sqlite._schema import SCHEMA

_QUEUE = "floor"
_TOKEN_MASK = (1 << 62) - 1


def codec_floor(n: int) -> float:
    """Requests per second through build + stamp + encode + decode alone."""
    start = time.perf_counter()
    for _ in range(n):
        request = replace_fields(WorkRequest(task="work", payload=PAYLOAD), enqueued_at=utcnow())
        decode_request(encode(request), "memory", _QUEUE, 0)
    return n / (time.perf_counter() - start)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    return conn


def enqueue_floor(path: Path, n: int, batch: int = 64) -> float:
    """This backend's 64-row INSERTs, one fsynced commit each, stamping and
    encoding inside the clock (as ``enqueue`` and the raw baseline do)."""
    requests = library.requests(n)
    sql = "INSERT INTO messages(queue, seq, request_id, body, available_at) VALUES " + ", ".join(
        ["(?, ?, ?, ?, 0.0)"] * batch
    )
    conn = _connect(path)
    try:
        start = time.perf_counter()
        for i in range(0, n, batch):
            params: list[object] = []
            conn.execute("BEGIN IMMEDIATE")
            (seq,) = conn.execute(
                "SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE queue = ?", (_QUEUE,)
            ).fetchone()
            for j, request in enumerate(requests[i : i + batch]):
                stamped = replace_fields(request, enqueued_at=utcnow())
                params += (_QUEUE, seq + j, stamped.request_id, encode(stamped))
            conn.execute(sql, params)
            conn.execute("COMMIT")
        return n / (time.perf_counter() - start)
    finally:
        conn.close()


def consume_floor(path: Path, n: int, batch: int) -> float:
    """Lease ``batch`` rows (unsynced commit), decode them, delete them
    (fsynced commit), until ``n`` are done; the backlog is written first,
    outside the clock."""
    conn = _connect(path)
    try:
        conn.execute("DELETE FROM messages")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages(queue, seq, request_id, body, available_at)"
            " VALUES (?, ?, ?, ?, 0)",
            [
                (_QUEUE, i, r.request_id, encode(replace_fields(r, enqueued_at=utcnow())))
                for i, r in enumerate(library.requests(n))
            ],
        )
        conn.execute("COMMIT")
        start = time.perf_counter()
        done = 0
        while done < n:
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            rows = conn.execute(
                "SELECT id, request_id, body, attempts, last_error FROM messages"
                " WHERE queue = ? AND available_at <= ? ORDER BY seq LIMIT ?",
                (_QUEUE, now, batch + 1),
            ).fetchall()[:batch]
            ids = [row[0] for row in rows]
            marks = ", ".join("?" * len(ids))
            conn.execute(
                "UPDATE messages SET available_at = ?, token = (? + id) & ?,"
                f" attempts = attempts + 1 WHERE id IN ({marks})",
                (now + 30, 7, _TOKEN_MASK, *ids),
            )
            conn.execute("COMMIT")
            conn.execute("PRAGMA synchronous=FULL")
            for row in rows:
                decode_request(row[2], "sqlite", _QUEUE, row[0])
            conn.execute("BEGIN IMMEDIATE")
            deleted = conn.execute(
                f"DELETE FROM messages WHERE id IN ({marks}) AND token = (? + id) & ? RETURNING id",
                (*ids, 7, _TOKEN_MASK),
            ).fetchall()
            conn.execute("COMMIT")
            if len(deleted) != len(ids):
                raise RuntimeError("floor: a leased row was not deleted")
            done += len(rows)
        return n / (time.perf_counter() - start)
    finally:
        conn.close()


Measure = Callable[[], Awaitable[float]]


def kafka_batch_floor(bootstrap: str, topic: str, n: int) -> float:
    """Requests per second through the durable steps of the Kafka batch path
    in one thread (see the module docstring): ``n`` records of ``topic``
    (filled by the caller), timed as the raw loop is, from the first record
    received to the last."""
    from confluent_kafka import TopicPartition

    from benchmarks import kafka

    state = f"floorstate{uuid.uuid4().hex[:8]}"
    kafka._create_topic(bootstrap, state)
    producer = kafka._producer(bootstrap)
    producer.produce(state, b"warmup")
    producer.flush(15)
    consumer = kafka._consumer(bootstrap, f"g{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic])
    clock = kafka._Clock()
    done = 0
    deadline = time.monotonic() + 600
    try:
        while done < n and time.monotonic() < deadline:
            msgs = [m for m in consumer.consume(kafka.BATCH, 0.5) if not m.error()]
            if not msgs:
                continue
            clock.tick()  # received: the count write below is timed
            last: dict[int, int] = {}
            for msg in msgs:
                last[msg.partition()] = msg.offset()
            # The batch's delivery counts, durable before it is handed out.
            counts = json.dumps([[m.partition(), m.offset(), 1] for m in msgs]).encode()
            producer.produce(state, key=b"round", value=counts)
            if producer.flush(15):
                raise RuntimeError("floor: a delivery-count record was not written")
            for msg in msgs:
                clock.tick()
                if msg.value() != b"warmup":
                    WorkRequest.model_validate_json(msg.value())  # as the raw loop
                done += 1
            # Acks durable on return: a synchronous commit of the batch.
            consumer.commit(
                offsets=[TopicPartition(topic, p, o + 1) for p, o in last.items()],
                asynchronous=False,
            )
    finally:
        consumer.close()
    if done < n:
        raise RuntimeError(f"floor: stopped at {done} of {n}")
    return clock.rate(n)


async def kafka_floor(bootstrap: str, n: int) -> float:
    """:func:`kafka_batch_floor` over a backlog the raw producer fills, as
    for the raw loop of the row."""
    from benchmarks import kafka

    topic = f"floor{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(kafka._create_topic, bootstrap, topic)
    await asyncio.to_thread(kafka._produce_many, bootstrap, topic, n - 1, 256)
    return await asyncio.to_thread(kafka_batch_floor, bootstrap, topic, n)


async def nats_ensemble_floor(
    url: str,
    n: int,
    *,
    concurrency: int = 16,
    callers: int = library.CALLERS,
    inspect: Callable[[Any, str, str], Awaitable[None]] | None = None,
) -> float:
    """Requests per second answered through the durable steps of an
    ``Ensemble`` request on ``nats://`` (module docstring), ``callers`` in
    flight and ``concurrency`` handled at a time, timed as
    :func:`benchmarks._library.ensemble` is (after one warm-up request).
    ``inspect(js, stream, bucket)`` runs before the stream and bucket are
    deleted (the test checks what was kept there)."""
    import nats
    from nats.js.api import KeyValueConfig, StorageType

    from benchmarks import nats as bench

    tag = uuid.uuid4().hex[:8]
    stream = bucket = f"floor{tag}"
    nc = await nats.connect(url)
    js = nc.jetstream()
    tasks: set[asyncio.Task[None]] = set()
    try:
        subject = await bench._raw_stream(js, stream)  # work queue, durable "w"
        kv = await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE)
        )
        answers: dict[str, asyncio.Future[bytes]] = {}
        watcher = await kv.watch("c.>")
        pulled = await js.pull_subscribe(subject, durable="w", stream=stream)
        slots = asyncio.Semaphore(concurrency)

        async def watch() -> None:
            async for entry in watcher:
                if entry is None or entry.value is None or entry.operation not in (None, "PUT"):
                    continue  # the end of the initial values, a delete
                future = answers.pop(entry.key[2:], None)
                if future is not None and not future.done():
                    future.set_result(entry.value)

        async def handle(msg: Any) -> None:
            try:
                request = WorkRequest.model_validate_json(msg.data)
                await kv.put(f"c.{request.request_id}", b'{"result":1}')
                await msg.ack_sync()
            finally:
                slots.release()

        async def work() -> None:
            while True:
                await slots.acquire()
                free = 1
                while not slots.locked() and free < concurrency:
                    await slots.acquire()
                    free += 1
                try:
                    msgs = await pulled.fetch(batch=free, timeout=1)
                except nats.errors.TimeoutError:
                    msgs = []
                for _ in range(free - len(msgs)):
                    slots.release()
                for msg in msgs:
                    task = asyncio.create_task(handle(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

        async def one(i: int) -> None:
            request = WorkRequest(task="work", payload=PAYLOAD)
            rid = request.request_id
            answer = asyncio.get_running_loop().create_future()
            answers[rid] = answer
            await kv.put(f"p.{rid}", b'{"pending":1}')
            await js.publish(
                subject, request.model_dump_json().encode(), headers={"Nats-Msg-Id": rid}
            )
            await answer
            await asyncio.gather(kv.delete(f"c.{rid}"), kv.delete(f"p.{rid}"))

        loops = [asyncio.create_task(watch()), asyncio.create_task(work())]
        try:
            await one(-1)  # warm up
            result = await rate(n, lambda: run_concurrently(n, callers, one))
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, *tasks, return_exceptions=True)
            await watcher.stop()
        if inspect is not None:
            await inspect(js, stream, bucket)
        return result
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
        with contextlib.suppress(Exception):
            await js.delete_key_value(bucket)
        await nc.close()


async def pulsar_enqueue_floor(
    url: str, n: int, concurrency: int = 64, *, topic: str | None = None
) -> float:
    """Durable enqueues per second through the least an asyncio ``enqueue``
    does with pulsar-client (module docstring), ``concurrency`` in flight,
    timed after one warm-up send, to ``topic`` (a new one by default)."""
    import collections
    import threading

    import pulsar

    from benchmarks import pulsar as bench

    client = await asyncio.to_thread(bench._raw_client, url)
    try:
        producer = await asyncio.to_thread(
            client.create_producer, topic or bench._topic("floor"), batching_enabled=False
        )
        loop = asyncio.get_running_loop()
        received: collections.deque[tuple[asyncio.Future[None], Any]] = collections.deque()
        lock = threading.Lock()

        def run_receipts() -> None:
            while received:
                future, result = received.popleft()
                if future.done():
                    continue
                if result == pulsar.Result.Ok:
                    future.set_result(None)
                else:
                    future.set_exception(RuntimeError(f"send failed: {result}"))

        def receipt_for(future: asyncio.Future[None]) -> Callable[[Any, Any], None]:
            def receipt(result: Any, _message_id: Any) -> None:  # a client thread
                with lock:
                    wake = not received
                    received.append((future, result))
                if wake:
                    loop.call_soon_threadsafe(run_receipts)

            return receipt

        batch = library.requests(n + 1)

        async def one(i: int) -> None:
            future: asyncio.Future[None] = loop.create_future()
            body = encode(replace_fields(batch[i], enqueued_at=utcnow()))
            producer.send_async(body, receipt_for(future))
            await future

        await one(n)  # warm up
        return await rate(n, lambda: run_concurrently(n, concurrency, one))
    finally:
        await asyncio.to_thread(client.close)


def _pulsar_case(url: str, n: int) -> tuple[str, float | None, Measure, Measure, Measure]:
    from benchmarks import pulsar as bench

    return (
        "pulsar enqueue, 64 in flight",
        0.8,
        lambda: bench.raw_enqueue(url, n, 64),
        lambda: pulsar_enqueue_floor(url, n, 64),
        lambda: library.enqueue(bench._config(url), n, 64),
    )


def _nats_case(url: str, n: int) -> tuple[str, float | None, Measure, Measure, Measure]:
    from benchmarks import nats as bench

    n = max(200, n // 5)
    return (
        "nats ensemble request/response (vs FastStream)",
        1.0,
        lambda: bench.faststream_request_reply(url, n),
        lambda: nats_ensemble_floor(url, n),
        lambda: library.ensemble(bench._config(url), n),
    )


def _kafka_case(bootstrap: str, n: int) -> tuple[str, float | None, Measure, Measure, Measure]:
    from benchmarks import kafka

    # Whole batches: a raw consume(500) with fewer records left waits out
    # its timeout (0.5 s), which would be timed on the raw and floor sides.
    n = max(kafka.BATCH, n - n % kafka.BATCH)
    return (
        f"kafka poll_many({kafka.BATCH})+ack_many",
        0.5,
        lambda: kafka.raw_consume(bootstrap, n),
        lambda: kafka_floor(bootstrap, n),
        lambda: kafka.ours_consume_batches(bootstrap, n),
    )


async def _rows(
    n: int,
    rounds: int,
    say: Callable[[str], None],
    *,
    kafka_bootstrap: str | None = None,
    nats_url: str | None = None,
    pulsar_url: str | None = None,
) -> list[tuple[str, ...]]:
    # Its databases hold every request of every round (hundreds of MB).
    with tempfile.TemporaryDirectory(prefix="floors-", ignore_cleanup_errors=True) as tmp:
        return await _measure(
            Path(tmp),
            n,
            rounds,
            say,
            kafka_bootstrap=kafka_bootstrap,
            nats_url=nats_url,
            pulsar_url=pulsar_url,
        )


async def _measure(
    tmp: Path,
    n: int,
    rounds: int,
    say: Callable[[str], None],
    *,
    kafka_bootstrap: str | None,
    nats_url: str | None,
    pulsar_url: str | None,
) -> list[tuple[str, ...]]:
    count = 0

    def fresh(name: str) -> Path:
        nonlocal count
        count += 1
        return tmp / f"{name}-{count}.db"

    cases: list[tuple[str, float | None, Measure, Measure, Measure]] = [
        (
            "memory put+get+ack (vs kombu)",
            5.0,
            lambda: kombu_put_get_ack(n),
            lambda: asyncio.to_thread(codec_floor, n),
            lambda: ours_put_get_ack("memory://floors", n),
        ),
        (
            "sqlite enqueue, 64 in flight",
            0.8,
            lambda: raw_sqlite_batched_insert(fresh("raw"), n),
            lambda: asyncio.to_thread(enqueue_floor, fresh("floor"), n),
            lambda: library.enqueue(f"sqlite:///{fresh('ours')}", n, 64, warm_up=False),
        ),
        (
            "sqlite poll+ack, 32 pollers",
            0.5,
            lambda: raw_sqlite_consume(fresh("raw"), n),
            lambda: asyncio.to_thread(consume_floor, fresh("floor"), n, 32),
            lambda: ours_consume(f"sqlite:///{fresh('ours')}", n, 32),
        ),
        (
            "sqlite poll_many(64)+ack_many",
            0.5,
            lambda: raw_sqlite_consume(fresh("raw"), n),
            lambda: asyncio.to_thread(consume_floor, fresh("floor"), n, 64),
            lambda: library.batch_poll_ack(f"sqlite:///{fresh('ours')}", n),
        ),
    ]
    if kafka_bootstrap is not None:
        cases.append(_kafka_case(kafka_bootstrap, n))
    if nats_url is not None:
        cases.append(_nats_case(nats_url, n))
    if pulsar_url is not None:
        cases.append(_pulsar_case(pulsar_url, n))
    out = []
    for name, target, base, floor, ours in cases:
        say(name)
        results: dict[str, list[float]] = {"base": [], "floor": [], "ours": []}
        for i in range(rounds):
            order = [("base", base), ("floor", floor), ("ours", ours)]
            for key, measure in order if i % 2 == 0 else order[::-1]:
                results[key].append(await measure())
        b, f, o = (statistics.median(results[k]) for k in ("base", "floor", "ours"))
        out.append(
            (
                name,
                f"{b:,.0f}",
                f"{f:,.0f}",
                f"{f / b:.2f}",
                f"{o:,.0f}",
                f"{o / b:.2f}",
                "" if target is None else f"{target:g}",
            )
        )
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floors")
    parser.add_argument("--n", type=int, default=20_480, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--kafka",
        action="store_true",
        help="also the Kafka batch row, on a Tansu broker started for it",
    )
    parser.add_argument(
        "--nats",
        action="store_true",
        help="also the NATS request/response row, on a nats-server started for it",
    )
    parser.add_argument(
        "--pulsar",
        action="store_true",
        help="also the Pulsar enqueue row, on a pulsar-lite broker started for it",
    )
    args = parser.parse_args()
    n = max(64, args.n - args.n % 64)  # whole batches of 64
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    broker = None
    if args.kafka:
        from transport.testing.brokers import TansuBroker

        say("starting a Tansu broker")
        broker = TansuBroker()
        broker.start()
    nats_server = None
    if args.nats:
        from benchmarks.nats import _server

        say("starting a nats-server")
        nats_server = _server()
    pulsar_broker = None
    if args.pulsar:
        from benchmarks.pulsar import _broker

        say("starting a pulsar-lite broker")
        pulsar_broker = _broker()
    try:
        rows = await _rows(
            n,
            args.rounds,
            say,
            kafka_bootstrap=None if broker is None else broker.bootstrap,
            nats_url=None if nats_server is None else nats_server.url,
            pulsar_url=None if pulsar_broker is None else pulsar_broker.url,
        )
    finally:
        if broker is not None:
            broker.close()
        if nats_server is not None:
            nats_server.close()
        if pulsar_broker is not None:
            pulsar_broker.close()
    head = ("row", "baseline/s", "floor/s", "floor ×", "ours/s", "ours ×", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    sizes = ""
    if args.kafka:
        from benchmarks.kafka import BATCH

        sizes = f" (the Kafka row: {max(BATCH, n - n % BATCH):,}, whole batches)"
    if args.nats:
        sizes += f" (the NATS row: {max(200, n // 5):,})"
    print(f"\n{n:,} requests per measurement{sizes}, median of {args.rounds} alternating rounds")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
