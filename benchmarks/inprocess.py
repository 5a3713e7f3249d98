"""memory:// against asyncio.Queue and kombu's memory transport; sqlite://
against raw SQLite with the same ``synchronous`` setting."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path

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
from transport import WorkRequest, connect


async def ours_consume(url: str, n: int, consumers: int) -> float:
    transport = await connect(url)
    try:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        queue = transport.request_queue(name)
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
                if done == n:
                    finished.set()

        # The clock stops at the n-th ack: consumers still waiting in
        # poll(0.5) for work that will never come are cancelled afterwards
        # (the raw baseline has no such idle tail).
        tasks = [asyncio.create_task(consume()) for _ in range(consumers)]
        try:
            return await rate(n, finished.wait)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await transport.aclose()


# -- baselines ---------------------------------------------------------------
async def asyncio_queue_put(n: int, concurrency: int) -> float:
    queue: asyncio.Queue[WorkRequest] = asyncio.Queue()
    requests = library.requests(n)
    return await rate(n, lambda: run_concurrently(n, concurrency, lambda i: queue.put(requests[i])))


async def asyncio_queue_consume(n: int) -> float:
    queue: asyncio.Queue[WorkRequest] = asyncio.Queue()
    for r in library.requests(n):
        queue.put_nowait(r)

    async def consume() -> None:
        for _ in range(n):
            await queue.get()
            queue.task_done()

    return await rate(n, consume)


async def kombu_put_get_ack(n: int) -> float:
    from kombu import Connection

    def run() -> float:
        with Connection("memory://") as conn:
            q = conn.SimpleQueue(f"bench-{uuid.uuid4().hex[:8]}")
            start = time.perf_counter()
            for _ in range(n):
                q.put(PAYLOAD)
            for _ in range(n):
                msg = q.get(timeout=1)
                msg.ack()
            q.close()
            return n / (time.perf_counter() - start)

    return await asyncio.to_thread(run)


async def ours_put_get_ack(url: str, n: int) -> float:
    transport = await connect(url)
    try:
        queue = transport.request_queue(f"bench-{uuid.uuid4().hex[:8]}")

        async def body() -> None:
            for _ in range(n):
                await queue.enqueue(WorkRequest(task="work", payload=PAYLOAD))
            for _ in range(n):
                delivery = await queue.poll(1)
                assert delivery is not None
                await delivery.ack()

        return await rate(n, body)
    finally:
        await transport.aclose()


async def asyncio_queue_latency(n: int) -> list[float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    samples = []
    for i in range(n):
        start = time.perf_counter()
        queue.put_nowait(i)
        assert await queue.get() == i
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _raw_db(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY, body BLOB)")
    return conn


async def raw_sqlite_batched_insert(path: Path, n: int, batch: int = 64) -> float:
    """Best case for raw SQLite: ``batch`` rows per fsynced transaction, on a
    thread. Like ``enqueue`` (and like ``raw_sqlite_consume``, which decodes
    inside the clock) it turns each request into bytes inside the clock."""
    requests = library.requests(n)

    def run() -> float:
        conn = _raw_db(path, "FULL")
        start = time.perf_counter()
        for i in range(0, n, batch):
            rows = [(r.model_dump_json().encode(),) for r in requests[i : i + batch]]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO q(body) VALUES (?)", rows)
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        conn.close()
        return n / elapsed

    return await asyncio.to_thread(run)


async def raw_sqlite_consume(path: Path, n: int, batch: int = 64) -> float:
    """Raw at-least-once consume: read a batch, 'process', delete it in one commit."""

    def run() -> float:
        conn = _raw_db(path, "FULL")
        conn.execute("DELETE FROM q")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO q(body) VALUES (?)",
            [(r.model_dump_json().encode(),) for r in library.requests(n)],
        )
        conn.execute("COMMIT")
        start = time.perf_counter()
        done = 0
        while done < n:
            rows = conn.execute("SELECT id, body FROM q ORDER BY id LIMIT ?", (batch,)).fetchall()
            for _, body in rows:
                WorkRequest.model_validate_json(body)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("DELETE FROM q WHERE id = ?", [(r[0],) for r in rows])
            conn.execute("COMMIT")
            done += len(rows)
        elapsed = time.perf_counter() - start
        conn.close()
        return n / elapsed

    return await asyncio.to_thread(run)


async def raw_sqlite_sequential(path: Path, n: int) -> float:
    """Raw at-least-once loop, one row at a time: read the oldest row,
    'process' it, delete it in its own fsynced commit."""

    def run() -> float:
        conn = _raw_db(path, "FULL")
        conn.execute("DELETE FROM q")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO q(body) VALUES (?)",
            [(r.model_dump_json().encode(),) for r in library.requests(n)],
        )
        conn.execute("COMMIT")
        start = time.perf_counter()
        for _ in range(n):
            row_id, body = conn.execute("SELECT id, body FROM q ORDER BY id LIMIT 1").fetchone()
            WorkRequest.model_validate_json(body)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM q WHERE id = ?", (row_id,))
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        conn.close()
        return n / elapsed

    return await asyncio.to_thread(run)


async def backlog_memory(url: str, n: int) -> tuple[float, float, float, float]:
    """Fill an ``n`` request backlog, then drain it with one worker (one
    process, 16 handlers): (RSS before the fill, after it, peak while
    draining) in MB, and the drain rate."""
    transport = await connect(url)
    try:
        queue = transport.request_queue(f"backlog-{uuid.uuid4().hex[:8]}")
        before = rss_mb()
        await run_concurrently(n, 64, lambda i: queue.enqueue(WorkRequest(task="w", payload=i)))
        filled = peak = rss_mb()
        done = 0
        start = time.perf_counter()

        async def handler() -> None:
            nonlocal done, peak
            while done < n:
                delivery = await queue.poll(1)
                if delivery is None:
                    if (await queue.stats()).depth == 0:
                        return
                    continue
                await delivery.ack()
                done += 1
                if done % 10_000 == 0:
                    peak = max(peak, rss_mb())

        await asyncio.gather(*(handler() for _ in range(16)))
        if done < n:
            raise RuntimeError(f"backlog drain stopped at {done} of {n}")
        return before, filled, max(peak, rss_mb()), n / (time.perf_counter() - start)
    finally:
        await transport.aclose()


async def run(sizes: Sizes, progress: object) -> list[Row]:
    # Its databases hold every request of every round, the 1,000,000-request
    # backlog's included: removed at the end, whatever happened.
    with tempfile.TemporaryDirectory(prefix="bench-", ignore_cleanup_errors=True) as tmp:
        return await _run(Path(tmp), sizes, progress)


async def _run(tmp: Path, sizes: Sizes, progress: object) -> list[Row]:
    say = progress  # callable
    rows: list[Row] = []
    mem = f"memory://bench-{uuid.uuid4().hex[:6]}"
    sqlite_url = f"sqlite:///{tmp / 'bench.db'}"
    r = sizes.rounds

    say("memory: enqueue")  # type: ignore[operator]
    a, b = await alternate(
        lambda: library.enqueue(mem, sizes.enqueue, sizes.concurrency, warm_up=False),
        lambda: asyncio_queue_put(sizes.enqueue, sizes.concurrency),
        r,
    )
    rows.append(throughput_row("memory", "enqueue", a, b, "asyncio.Queue.put", None))
    say("memory: poll+ack")  # type: ignore[operator]
    a, b = await alternate(
        lambda: ours_consume(mem, sizes.consume, 1), lambda: asyncio_queue_consume(sizes.consume), r
    )
    rows.append(throughput_row("memory", "poll+ack", a, b, "asyncio.Queue.get+task_done", None))
    say("memory: put+get+ack vs kombu")  # type: ignore[operator]
    a, b = await alternate(
        lambda: ours_put_get_ack(mem, sizes.consume), lambda: kombu_put_get_ack(sizes.consume), r
    )
    rows.append(throughput_row("memory", "put+get+ack", a, b, "kombu memory://", 5.0))

    say("sqlite: enqueue (group commit)")  # type: ignore[operator]
    a, b = await alternate(
        lambda: library.enqueue(sqlite_url, sizes.enqueue, sizes.concurrency, warm_up=False),
        lambda: raw_sqlite_batched_insert(tmp / "raw.db", sizes.enqueue),
        r,
    )
    rows.append(
        throughput_row(
            "sqlite", "enqueue", a, b, "raw sqlite3 batched inserts (synchronous=FULL)", 0.8
        )
    )
    say("sqlite: enqueue_many(64)")  # type: ignore[operator]
    a, b = await alternate(
        lambda: library.enqueue_many(sqlite_url, sizes.enqueue, 64),
        lambda: raw_sqlite_batched_insert(tmp / "raw.db", sizes.enqueue),
        r,
    )
    rows.append(
        throughput_row(
            "sqlite",
            "enqueue_many(64)",
            a,
            b,
            "raw sqlite3 batched inserts of 64 (synchronous=FULL; ours: one call per 64, informational)",
            None,
        )
    )
    say("sqlite: poll+ack")  # type: ignore[operator]
    a, b = await alternate(
        lambda: ours_consume(sqlite_url, sizes.consume, 32),
        lambda: raw_sqlite_consume(tmp / "raw.db", sizes.consume),
        r,
    )
    rows.append(
        throughput_row(
            "sqlite", "poll+ack", a, b, "raw sqlite3 batch select+delete (synchronous=FULL)", 0.5
        )
    )

    say("memory, sqlite: poll_many(64)+ack_many")  # type: ignore[operator]
    a, b = await alternate(
        lambda: library.batch_poll_ack(mem, sizes.consume),
        lambda: asyncio_queue_consume(sizes.consume),
        r,
    )
    rows.append(
        throughput_row(
            "memory",
            "poll_many(64)+ack_many",
            a,
            b,
            "asyncio.Queue.get+task_done (ours: one batch loop)",
            None,
        )
    )
    a, b = await alternate(
        lambda: library.batch_poll_ack(sqlite_url, sizes.consume),
        lambda: raw_sqlite_consume(tmp / "raw.db", sizes.consume),
        r,
    )
    rows.append(
        throughput_row(
            "sqlite",
            "poll_many(64)+ack_many",
            a,
            b,
            "raw sqlite3 batch select+delete of 64, one commit (synchronous=FULL)",
            0.5,
        )
    )

    sequential = max(sizes.consume // 4, 2000)
    say(f"memory: sequential poll+ack ({sequential:,})")  # type: ignore[operator]
    a, b = await alternate(
        lambda: library.sequential_poll_ack(mem, sequential),
        lambda: asyncio_queue_consume(sequential),
        r,
    )
    rows.append(
        throughput_row(
            "memory",
            "sequential poll+ack",
            a,
            b,
            "one asyncio.Queue.get+task_done loop (ours: one poll→ack loop)",
            None,
        )
    )
    # Two fsynced commits per request (lease, ack) at ~100/s: fewer requests.
    sequential = max(sizes.consume // 40, 500)
    say(f"sqlite: sequential poll+ack ({sequential:,})")  # type: ignore[operator]
    a, b = await alternate(
        lambda: library.sequential_poll_ack(sqlite_url, sequential),
        lambda: raw_sqlite_sequential(tmp / "raw.db", sequential),
        r,
    )
    rows.append(
        throughput_row(
            "sqlite",
            "sequential poll+ack",
            a,
            b,
            "one raw sqlite3 select+delete loop, a commit per row (synchronous=FULL)",
            None,
        )
    )

    for name, url, raw in (
        ("memory", mem, asyncio_round_trip),
        ("sqlite", sqlite_url, lambda n: raw_sqlite_round_trip(tmp / "rt.db", n)),
    ):
        say(f"{name}: round trip")  # type: ignore[operator]
        ours_samples: list[float] = []
        raw_samples: list[float] = []
        for _ in range(r):
            ours_samples += await library.round_trip(url, sizes.round_trips, warm_ups=0)
            raw_samples += await raw(sizes.round_trips)
        for q in (0.5, 0.99):
            o, b = percentile(ours_samples, q), percentile(raw_samples, q)
            target = (b * 2 + 0.5) if q == 0.5 else None
            rows.append(
                Row(
                    name,
                    f"round trip p{int(q * 100)}",
                    round(o, 3),
                    round(b, 3),
                    "raw publish→consume round trip",
                    "ms",
                    round(b / o, 3),
                    None if target is None else round(b / target, 3),
                )
            )
        say(f"{name}: ensemble end to end")  # type: ignore[operator]
        thr = await library.ensemble(url, sizes.round_trips * 2)
        rows.append(library.ensemble_row(name, thr))
    say("memory: event bus publish→receive")  # type: ignore[operator]
    ours_bus: list[float] = []
    raw_bus: list[float] = []
    for _ in range(r):
        ours_bus += await library.bus_latency(mem, sizes.round_trips)
        raw_bus += await asyncio_queue_latency(sizes.round_trips)
    for q in (0.5, 0.99):
        o, b = percentile(ours_bus, q), percentile(raw_bus, q)
        rows.append(
            Row(
                "memory",
                f"bus publish→receive p{int(q * 100)}",
                round(o, 3),
                round(b, 3),
                "asyncio.Queue put→get (informational: no encoding, no routing)",
                "ms",
                round(b / o, 3),
                None,
            )
        )
    backlog = 50_000 if sizes.quick else 1_000_000
    say(f"sqlite: backlog of {backlog:,} drained by one worker")  # type: ignore[operator]
    before, filled, peak, drain = await backlog_memory(sqlite_url, backlog)
    rows.append(
        Row(
            "sqlite",
            f"RSS growth, {backlog // 1000}k backlog",
            round(peak - filled, 1),
            0,
            f"RSS {before:.0f} MB before fill, {filled:.0f} after, peak {peak:.0f}; "
            f"drained at {drain:,.0f}/s",
            "MB",
            0,
        )
    )
    rows += await scaleout_rows("sqlite", f"sqlite:///{tmp / 'scale.db'}", {}, sizes.quick, say)  # type: ignore[arg-type]
    rows += await registry_rows("sqlite", f"sqlite:///{tmp / 'registry.db'}", {}, sizes.quick, say)  # type: ignore[arg-type]
    return rows


async def asyncio_round_trip(n: int) -> list[float]:
    queue: asyncio.Queue[tuple[WorkRequest, asyncio.Future[None]]] = asyncio.Queue()

    async def worker() -> None:
        while True:
            _, done = await queue.get()
            done.set_result(None)

    task = asyncio.create_task(worker())
    samples = []
    loop = asyncio.get_running_loop()
    for _ in range(n):
        start = time.perf_counter()
        future = loop.create_future()
        await queue.put((WorkRequest(task="work", payload=PAYLOAD), future))
        await future
        samples.append((time.perf_counter() - start) * 1000)
    task.cancel()
    return samples


async def raw_sqlite_round_trip(path: Path, n: int) -> list[float]:
    """Producer commits a row; a consumer thread polls, deletes it (commit)
    and signals back: the raw publish→consume round trip."""
    conn = _raw_db(path, "FULL")
    conn.close()
    done = threading.Event()
    stop = threading.Event()

    def consumer() -> None:
        c = _raw_db(path, "FULL")
        while not stop.is_set():
            row = c.execute("SELECT id, body FROM q ORDER BY id LIMIT 1").fetchone()
            if row is None:
                time.sleep(0.0005)
                continue
            c.execute("BEGIN IMMEDIATE")
            c.execute("DELETE FROM q WHERE id = ?", (row[0],))
            c.execute("COMMIT")
            done.set()
        c.close()

    thread = threading.Thread(target=consumer)
    thread.start()
    producer = _raw_db(path, "FULL")
    body = WorkRequest(task="work", payload=PAYLOAD).model_dump_json().encode()
    samples = []
    try:
        for _ in range(n):
            done.clear()
            start = time.perf_counter()
            await asyncio.to_thread(_insert_one, producer, body)
            await asyncio.to_thread(done.wait, 10)
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        stop.set()
        thread.join()
        producer.close()
    return samples


def _insert_one(conn: sqlite3.Connection, body: bytes) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO q(body) VALUES (?)", (body,))
    conn.execute("COMMIT")
