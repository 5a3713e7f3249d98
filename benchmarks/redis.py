"""redis:// against raw redis-py (asyncio) and the task queues people run on
Redis -- Celery, Dramatiq, RQ and taskiq -- on the same redis-server (started here on
a free loopback port: append-only file on, ``appendfsync always``, the
launcher's default and what a ``kill -9`` of the server loses nothing under;
every row says so).

Raw rows: enqueue against ``XADD`` (64 in flight on a connection pool, a
pipeline of 64 per round trip, and one at a time); poll+ack against one
consumer reading ``XREADGROUP COUNT 64`` and acking each batch with one
``XACK``, and a single ``XREADGROUP COUNT 1`` -> ``XACK`` loop. Each raw
consumer decodes the request as ours does.

"Ours" rows go through the public API (``transport.connect``) and are
"n/a (backend not installed)" until a ``redis`` backend is registered; the
raw and task-queue rows run either way.

Task queues (one round each): ``N`` no-op jobs (each one ``INCR`` of a counter, the same for
every library and ours), enqueued by a plain loop in this process (the rate
is the "enqueue" row), then processed by ONE worker process at concurrency 1
(Celery ``-c 1`` prefork, ``worker_prefetch_multiplier=1``,
``task_acks_late``; Dramatiq ``--processes 1 --threads 1``; RQ's default
forking worker; taskiq-redis's ``RedisStreamBroker`` with ``--workers 1
--max-async-tasks 1``; ours: one ``poll -> ack`` loop), timed from the first job's
end to the last's (worker start-up not counted). Then "survives a SIGKILLed
worker": three jobs, the first hangs, the harness waits for its start marker,
SIGKILLs the worker's process group, starts a new worker and waits (bounded)
for every job to finish; the redelivery settings used are in the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis

from benchmarks import _library as library
from benchmarks import _redis_jobs as jobs
from benchmarks._common import (
    Row,
    Sizes,
    alternate,
    percentile,
    rate,
    run_concurrently,
    throughput_row,
)
from benchmarks._library import PAYLOAD
from benchmarks.registry import registry_rows
from benchmarks.scaleout import scaleout_rows
from transport import TransportConfig, WorkRequest, available_backends, connect
from transport.testing.brokers import RedisServer

BACKEND = "redis"
FSYNC = "appendfsync always"
#: Raw reads this many entries per XREADGROUP; ours runs as many pollers
#: (their polls share one lease script) or takes them with poll_many.
BATCH = 64
CONSUMERS = BATCH
CRASH_JOBS = 3
OURS_CRASH_LEASE = 5.0
ROOT = Path(__file__).resolve().parent.parent
NOT_INSTALLED = "backend not installed"


def ours_missing() -> str:
    """Why the "ours" rows cannot run ("" when a ``redis`` backend is
    registered and importable)."""
    target = available_backends().get(BACKEND)
    if target is None:
        return NOT_INSTALLED
    try:
        __import__(target.partition(":")[0])
    except ImportError:
        return NOT_INSTALLED
    return ""


def _server() -> RedisServer:
    server = RedisServer()  # appendonly yes, appendfsync always
    server.start()
    return server


def _body() -> bytes:
    return WorkRequest(task="work", payload=PAYLOAD).model_dump_json().encode()


def _config(url: str, lease: float | None = None) -> TransportConfig:
    if lease is None:
        return TransportConfig(url=url, namespace="bench")
    return TransportConfig(url=url, namespace="bench", lease_seconds=lease)


# -- ours ----------------------------------------------------------------------
async def ours_consume(target: str | TransportConfig, n: int) -> float:
    """``CONSUMERS`` pollers looping ``poll -> ack`` (defaults) over a
    backlog of ``n``."""
    transport = await connect(target)
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


async def ours_consume_batches(target: str | TransportConfig, n: int) -> float:
    """One loop: ``poll_many(BATCH)`` -> ``ack_many`` (the batch path) over
    a backlog of ``n`` (the loop every backend's batch row runs)."""
    return await library.batch_poll_ack(target, n, BATCH)


async def _until(finished: asyncio.Event, consumers: list[Any]) -> None:
    """Run the consumers until one has seen the last message; the others,
    still waiting in a poll, are cancelled (not timed)."""
    tasks = [asyncio.ensure_future(c) for c in consumers]
    waiter = asyncio.ensure_future(finished.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    waiter.cancel()
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, Exception):
            raise result


# -- raw redis-py ----------------------------------------------------------------
async def raw_enqueue(url: str, n: int, concurrency: int) -> float:
    """``XADD`` with ``concurrency`` calls in flight (one pooled connection
    each); each returns once the entry is in the AOF (fsynced)."""
    client = aredis.Redis.from_url(url)
    try:
        stream = f"rawe{uuid.uuid4().hex[:8]}"
        body = _body()
        # Warm up: one connection per caller in the pool.
        await asyncio.gather(*(client.xadd(stream, {"body": body}) for _ in range(concurrency)))
        return await rate(
            n,
            lambda: run_concurrently(n, concurrency, lambda i: client.xadd(stream, {"body": body})),
        )
    finally:
        await client.aclose()


async def raw_enqueue_pipelined(url: str, n: int, batch: int) -> float:
    """``XADD`` in pipelines of ``batch`` (one round trip and, with
    ``appendfsync always``, about one fsync per pipeline)."""
    client = aredis.Redis.from_url(url)
    try:
        stream = f"rawp{uuid.uuid4().hex[:8]}"
        body = _body()
        await client.xadd(stream, {"body": body})

        async def body_loop() -> None:
            for start in range(0, n, batch):
                async with client.pipeline(transaction=False) as pipe:
                    for _ in range(min(batch, n - start)):
                        pipe.xadd(stream, {"body": body})
                    await pipe.execute()

        return await rate(n, body_loop)
    finally:
        await client.aclose()


async def _raw_backlog(client: Any, n: int) -> str:
    stream = f"rawc{uuid.uuid4().hex[:8]}"
    body = _body()
    for start in range(0, n, 500):
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(min(500, n - start)):
                pipe.xadd(stream, {"body": body})
            await pipe.execute()
    await client.xgroup_create(stream, "w", id="0")
    return stream


async def raw_consume(url: str, n: int, batch: int) -> float:
    """One consumer: ``XREADGROUP COUNT batch`` -> decode each -> one
    ``XACK`` of the batch, on a backlog of ``n``."""
    client = aredis.Redis.from_url(url)
    try:
        stream = await _raw_backlog(client, n)

        async def body_loop() -> None:
            done = 0
            while done < n:
                reply = await client.xreadgroup("w", "c", {stream: ">"}, count=batch, block=1000)
                if not reply:
                    raise RuntimeError(f"raw poll+ack stopped after {done} of {n}")
                ids = []
                for entry_id, fields in reply[0][1]:
                    WorkRequest.model_validate_json(fields[b"body"])
                    ids.append(entry_id)
                await client.xack(stream, "w", *ids)
                done += len(ids)

        return await rate(n, body_loop)
    finally:
        await client.aclose()


async def raw_sequential(url: str, n: int) -> float:
    """One loop: ``XREADGROUP COUNT 1`` -> decode -> ``XACK``, one entry at
    a time (each ``XACK`` returns once it is in the AOF)."""
    client = aredis.Redis.from_url(url)
    try:
        stream = await _raw_backlog(client, n + 1)

        async def one() -> None:
            reply = await client.xreadgroup("w", "c", {stream: ">"}, count=1, block=1000)
            if not reply:
                raise RuntimeError("raw sequential poll+ack: the backlog ran dry")
            [(entry_id, fields)] = reply[0][1]
            WorkRequest.model_validate_json(fields[b"body"])
            await client.xack(stream, "w", entry_id)

        await one()  # warm up, as ours

        async def body_loop() -> None:
            for _ in range(n):
                await one()

        return await rate(n, body_loop)
    finally:
        await client.aclose()


async def raw_round_trip(url: str, n: int) -> list[float]:
    """``XADD`` a request, a worker reads it (``XREADGROUP COUNT 1``),
    decodes it, ``RPUSH``es the reply and ``XACK``s; the caller waits for the
    reply with ``BLPOP``. Every write is in the AOF (``appendfsync always``)
    before it returns, as ours are."""
    caller = aredis.Redis.from_url(url)
    worker_client = aredis.Redis.from_url(url)
    stream = f"rawr{uuid.uuid4().hex[:8]}"
    replies = f"{stream}-replies"
    stop = asyncio.Event()
    try:
        await caller.xgroup_create(stream, "w", id="0", mkstream=True)

        async def worker() -> None:
            while not stop.is_set():
                reply = await worker_client.xreadgroup("w", "c", {stream: ">"}, count=1, block=200)
                if not reply:
                    continue
                [(entry_id, fields)] = reply[0][1]
                request = WorkRequest.model_validate_json(fields[b"body"])
                await worker_client.rpush(replies, request.request_id)
                await worker_client.xack(stream, "w", entry_id)

        task = asyncio.create_task(worker())
        try:
            samples = []
            for _ in range(n):
                start = time.perf_counter()
                await caller.xadd(stream, {"body": _body()})
                if await caller.blpop([replies], timeout=10) is None:
                    raise RuntimeError("raw round trip: no reply within 10 s")
                samples.append((time.perf_counter() - start) * 1000)
            return samples
        finally:
            stop.set()
            await task
    finally:
        await caller.aclose()
        await worker_client.aclose()


async def raw_bus_latency(url: str, n: int) -> list[float]:
    """The same with redis-py: ``PUBLISH`` of the same JSON, a subscriber
    that parses it."""
    publisher = aredis.Redis.from_url(url)
    pubsub = publisher.pubsub()
    try:
        channel = f"bench.lat.{uuid.uuid4().hex[:8]}"
        await pubsub.subscribe(channel)
        while (await pubsub.get_message(timeout=5)) is None:  # the subscribe confirmation
            pass
        samples = []
        for i in range(n):
            start = time.perf_counter()
            body = json.dumps({"subject": channel, "data": i, "headers": {}}).encode()
            await publisher.publish(channel, body)
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            if message is None:
                raise RuntimeError("raw bus latency: no message within 5 s")
            assert json.loads(message["data"])["data"] == i
            samples.append((time.perf_counter() - start) * 1000)
        return samples
    finally:
        await pubsub.aclose()
        await publisher.aclose()


async def faststream_request_reply(url: str, n: int) -> float:
    """FastStream's Redis request/reply (a channel, a reply channel per
    request) against a subscriber that answers in the same process,
    ``CALLERS`` in flight."""
    from faststream.redis import RedisBroker

    channel = f"fs.rr.{uuid.uuid4().hex[:8]}"
    broker = RedisBroker(url, logger=None)

    @broker.subscriber(channel)
    async def handle(body: dict[str, Any]) -> int:
        return 1

    await broker.start()
    try:
        await broker.request(PAYLOAD, channel, timeout=10)  # warm up

        async def one(i: int) -> None:
            await broker.request(PAYLOAD, channel, timeout=10)

        return await rate(n, lambda: run_concurrently(n, library.CALLERS, one))
    finally:
        await broker.stop()


def _latency_rows(
    operation: str, ours: list[float], raw: list[float], baseline: str, target: Any
) -> list[Row]:
    """p50 and p99 rows; ``target(raw_p50)`` gives the p50 target as a
    ratio raw/ours (None: informational)."""
    rows = []
    for q in (0.5, 0.99):
        o, b = percentile(ours, q), percentile(raw, q)
        rows.append(
            Row(
                BACKEND,
                f"{operation} p{int(q * 100)}",
                round(o, 3),
                round(b, 3),
                baseline,
                "ms",
                round(b / o, 3),
                target(b) if q == 0.5 and target is not None else None,
            )
        )
    return rows


# -- task queues and worker processes ---------------------------------------------
@dataclass
class Contender:
    """A task queue (or ours) measured with one worker process."""

    name: str
    #: what the throughput worker runs with
    settings: str
    #: the redelivery settings of the SIGKILL check
    crash_settings: str
    #: enqueue ``n`` jobs (numbered from 0) of ``run``, a plain loop
    enqueue: Callable[[str, int, int, bool], Awaitable[None]]
    #: the worker command line and extra environment
    worker: Callable[[bool, str, int], tuple[list[str], dict[str, str]]]
    #: release the producer's resources
    close: Callable[[], Awaitable[None]] | None = None


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def celery_contender(url: str) -> Contender:
    from benchmarks import _redis_celery

    # The producer's side needs no redelivery settings (the workers have them).
    task = _redis_celery.make_app(url, False).tasks["noop"]

    async def enqueue(run: str, n: int, total: int, crash: bool) -> None:

        def loop() -> None:
            for i in range(n):
                task.apply_async((run, i, total, crash))

        await asyncio.to_thread(loop)

    def worker(crash: bool, run: str, total: int) -> tuple[list[str], dict[str, str]]:
        cmd = [_bin("celery"), "-A", "benchmarks._redis_celery", "worker", "-c", "1"]
        cmd += ["-Q", _redis_celery.QUEUE, "--loglevel=WARNING", "--without-mingle"]
        cmd += ["--without-gossip"]
        return cmd, {"BENCH_CRASH": "1" if crash else "0"}

    opts = ", ".join(f"{k}={v}" for k, v in _redis_celery.CRASH_OPTIONS.items())
    return Contender(
        f"Celery {version('celery')}",
        "-c 1 prefork, task_acks_late, worker_prefetch_multiplier=1",
        f"{opts} (defaults 3600, 10, 10)",
        enqueue,
        worker,
    )


def dramatiq_contender(url: str) -> Contender:
    from benchmarks import _redis_dramatiq

    actors = {crash: _redis_dramatiq.make_actor(url, crash) for crash in (False, True)}

    async def enqueue(run: str, n: int, total: int, crash: bool) -> None:
        actor = actors[crash]

        def loop() -> None:
            for i in range(n):
                actor.send(run, i, total, crash)

        await asyncio.to_thread(loop)

    def worker(crash: bool, run: str, total: int) -> tuple[list[str], dict[str, str]]:
        cmd = [_bin("dramatiq"), "benchmarks._redis_dramatiq", "--processes", "1"]
        cmd += ["--threads", "1", "--queues", _redis_dramatiq.QUEUE]
        return cmd, {"BENCH_CRASH": "1" if crash else "0"}

    return Contender(
        f"Dramatiq {version('dramatiq')}",
        "--processes 1 --threads 1",
        "heartbeat_timeout=5000 ms, maintenance_chance=1,000,000/1,000,000 (defaults 60000 ms, 1,000)",
        enqueue,
        worker,
    )


def rq_contender(url: str) -> Contender:
    from rq import Queue, Retry

    connection = redis.Redis.from_url(url)
    queue = Queue("bench", connection=connection)

    async def enqueue(run: str, n: int, total: int, crash: bool) -> None:
        def loop() -> None:
            for i in range(n):
                if crash:
                    queue.enqueue(jobs.rq_noop, run, i, total, crash, retry=Retry(max=1))
                else:
                    queue.enqueue(jobs.rq_noop, run, i, total, crash)

        await asyncio.to_thread(loop)

    def worker(crash: bool, run: str, total: int) -> tuple[list[str], dict[str, str]]:
        cmd = [_bin("rq"), "worker", "--url", url, "--logging_level", "WARNING"]
        if crash:
            # An idle worker cleans its registries only between dequeue
            # timeouts (worker_ttl - 15 s): 5 s here instead of 405 s.
            cmd += ["--maintenance-interval", "1", "--worker-ttl", "20"]
        return [*cmd, "bench"], {}

    return Contender(
        f"RQ {version('rq')}",
        "default forking Worker (one job at a time)",
        "enqueued with Retry(max=1), --maintenance-interval 1, --worker-ttl 20 (defaults: no"
        " retry, 600 s, 420 s); an abandoned job is retried once its execution heartbeat (≥ 60 s)"
        " has expired",
        enqueue,
        worker,
    )


def taskiq_contender(url: str) -> Contender:
    from benchmarks import _redis_taskiq

    broker = _redis_taskiq.make_broker(url, False)
    started = False

    async def enqueue(run: str, n: int, total: int, crash: bool) -> None:
        nonlocal started
        if not started:  # creates the consumer group (at "$": later messages only)
            await broker.startup()
            started = True
        task = broker.find_task("noop")
        for i in range(n):
            await task.kiq(run, i, total, crash)

    def worker(crash: bool, run: str, total: int) -> tuple[list[str], dict[str, str]]:
        cmd = [_bin("taskiq"), "worker", "benchmarks._redis_taskiq:broker", "--workers", "1"]
        cmd += ["--max-async-tasks", "1", "--log-level", "WARNING", "--no-configure-logging"]
        return cmd, {"BENCH_CRASH": "1" if crash else "0"}

    opts = ", ".join(f"{k}={v:,} ms" for k, v in _redis_taskiq.CRASH_OPTIONS.items())
    return Contender(
        f"taskiq-redis {version('taskiq-redis')}",
        "RedisStreamBroker, --workers 1 --max-async-tasks 1",
        f"{opts} (default 600,000 ms); it reclaims a dead worker's messages only after a read"
        " that returned new ones, and its reads take up to 100 (xread_count)",
        enqueue,
        worker,
        broker.shutdown,
    )


def ours_contender(target: str, redis_url: str) -> Contender:
    """Ours through the public API on ``target`` (``redis_url`` holds the
    jobs' counters)."""
    queues: dict[str, str] = {}

    def queue_name(run: str) -> str:
        return queues.setdefault(run, f"j{uuid.uuid4().hex[:8]}")

    async def enqueue(run: str, n: int, total: int, crash: bool) -> None:
        transport = await connect(_config(target))
        try:
            queue = transport.request_queue(queue_name(run))
            for i in range(n):
                await queue.enqueue(WorkRequest(task="job", payload={"i": i}))
        finally:
            await transport.aclose()

    def worker(crash: bool, run: str, total: int) -> tuple[list[str], dict[str, str]]:
        lease = OURS_CRASH_LEASE if crash else 30.0
        cmd = [sys.executable, "-m", "benchmarks._redis_jobs", target, redis_url]
        cmd += [queue_name(run), run, str(total), "1" if crash else "0", str(lease)]
        return cmd, {}

    return Contender(
        "ours",
        "one poll→ack loop, defaults",
        f"lease_seconds={OURS_CRASH_LEASE:g} (default 30)",
        enqueue,
        worker,
    )


def _session_members(sid: int) -> list[int]:
    """PIDs of the processes in session ``sid`` (Linux ``/proc``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may hold spaces
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid:
            found.append(int(entry))
    return found


class Worker:
    """A worker process in its own session (so that a SIGKILL of its group
    takes its children too), output to a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], url: str, log: Path) -> None:
        self.log = log
        full_env = {**os.environ, **env, "BENCH_REDIS_URL": url}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL every process of the worker's session -- its process
        group, and children that moved to a group of their own (RQ's work
        horse does: a SIGKILL of the worker's group leaves it running the
        job) -- and reap the worker."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in _session_members(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the worker (each library's warm shutdown: the job in hand
        finishes and is acked), SIGKILL its group after ``grace`` seconds."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        self.kill()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:]


async def _wait_list(client: Any, key: str, deadline: float) -> bool:
    """``BLPOP key`` until ``deadline`` (monotonic): True if an item came."""
    while (left := deadline - time.monotonic()) > 0:
        if await client.blpop([key], timeout=min(left, 1.0)) is not None:
            return True
    return False


async def contender_throughput(
    c: Contender, url: str, n: int, logs: Path, timeout: float
) -> tuple[float, float]:
    """(enqueue rate, processing rate) of ``n`` jobs with one worker."""
    client = aredis.Redis.from_url(url)
    run = uuid.uuid4().hex[:8]
    k = jobs.keys(run)
    try:
        start = time.perf_counter()
        await c.enqueue(run, n, n, False)
        enqueue_rate = n / (time.perf_counter() - start)
        cmd, env = c.worker(False, run, n)
        worker = Worker(cmd, env, url, logs / f"{run}.log")
        try:
            if not await _wait_list(client, k["finished"], time.monotonic() + timeout):
                done = int(await client.get(k["count"]) or 0)
                raise RuntimeError(
                    f"{c.name}: {done} of {n} jobs in {timeout:.0f} s; worker log:\n{worker.tail()}"
                )
        finally:
            await asyncio.to_thread(worker.stop)
        first, last = (float(v) for v in await client.mget(k["first"], k["last"]))
        return enqueue_rate, (n - 1) / max(last - first, 1e-9)
    finally:
        await client.delete(*k.values())
        await client.aclose()


async def contender_survives(c: Contender, url: str, logs: Path, bound: float) -> str:
    """Enqueue ``CRASH_JOBS``, SIGKILL the worker while the first is running,
    start another, wait up to ``bound`` seconds for all of them."""
    client = aredis.Redis.from_url(url)
    run = uuid.uuid4().hex[:8]
    k = jobs.keys(run)
    try:
        await c.enqueue(run, CRASH_JOBS, CRASH_JOBS, True)
        cmd, env = c.worker(True, run, CRASH_JOBS)
        first = Worker(cmd, env, url, logs / f"{run}-1.log")
        try:
            if not await _wait_list(client, k["started"], time.monotonic() + 60):
                return f"not measured: no job started in 60 s ({first.tail()[-200:]!r})"
        finally:
            await asyncio.to_thread(first.kill)
        killed = time.monotonic()
        second = Worker(cmd, env, url, logs / f"{run}-2.log")
        try:
            deadline = killed + bound
            while await client.scard(k["done"]) < CRASH_JOBS:
                if not await _wait_list(client, k["done-list"], deadline):
                    break
            elapsed = time.monotonic() - killed
        finally:
            await asyncio.to_thread(second.stop)
        done = await client.scard(k["done"])
        if done == CRASH_JOBS:
            return f"yes after {elapsed:.1f} s"
        return f"no within {bound:.0f} s: {CRASH_JOBS - done} of {CRASH_JOBS} jobs not run"
    finally:
        # "hang" stays (for an hour): a copy of the first job delivered again
        # later, in a later stage, must not hang that stage's worker.
        await client.expire(k["hang"], 3600)
        await client.delete(*(key for name, key in k.items() if name != "hang"))
        await client.aclose()


def _na_row(operation: str, baseline: list[float], baseline_name: str, target: float | None) -> Row:
    b = statistics.median(baseline)
    return Row(
        BACKEND,
        operation,
        0.0,
        round(b, 1),
        baseline_name,
        "msg/s",
        0.0,
        target,
        {"baseline": baseline},
        missing=NOT_INSTALLED,
    )


async def _versus(
    operation: str,
    ours: Callable[[], Awaitable[float]] | None,
    raw: Callable[[], Awaitable[float]],
    rounds: int,
    baseline_name: str,
    target: float | None,
) -> Row:
    if ours is None:
        samples = [await raw() for _ in range(rounds)]
        return _na_row(operation, samples, baseline_name, target)
    a, b = await alternate(ours, raw, rounds)
    return throughput_row(BACKEND, operation, a, b, baseline_name, target)


async def run(
    sizes: Sizes,
    progress: Callable[[str], None],
    *,
    jobs_n: int | None = None,
    crash_bound: float | None = None,
    ours_target: str | None = None,
    scale_out: bool = True,
) -> list[Row]:
    """Every Redis row (``scale_out``: with the scale-out rows). ``jobs_n`` is the task-queue job count (default 200,
    3,000 with ``--full``), ``crash_bound`` how long the SIGKILL check waits
    for the jobs after the kill (default 12 s, 120 s with ``--full``);
    ``ours_target`` is where ours runs (default: the redis-server, when a
    ``redis`` backend is registered; another URL only exercises these rows,
    as the smoke test does)."""
    if shutil.which("redis-server") is None:
        progress("redis: skipped (no redis-server on PATH: apt-get install redis-server)")
        return []
    server = await asyncio.to_thread(_server)
    r = sizes.rounds
    url = ours_target or server.url
    missing = "" if ours_target else ours_missing()
    have_ours = not missing
    if missing:
        progress(f"redis: ours n/a ({missing}); raw and task-queue rows only")
    rows: list[Row] = []
    logs = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    try:
        progress(f"redis: enqueue ({sizes.concurrency} in flight)")
        rows.append(
            await _versus(
                f"enqueue ({sizes.concurrency} in flight)",
                (lambda: library.enqueue(_config(url), sizes.enqueue, sizes.concurrency))
                if have_ours
                else None,
                lambda: raw_enqueue(server.url, sizes.enqueue, sizes.concurrency),
                r,
                f"redis-py XADD, {sizes.concurrency} in flight ({FSYNC})",
                0.8,
            )
        )
        rows.append(
            await _versus(
                f"enqueue ({sizes.concurrency} in flight)",
                (lambda: library.enqueue(_config(url), sizes.enqueue, sizes.concurrency))
                if have_ours
                else None,
                lambda: raw_enqueue_pipelined(server.url, sizes.enqueue, BATCH),
                r,
                f"redis-py XADD pipelines of {BATCH} ({FSYNC})",
                None,
            )
        )
        sequential = max(sizes.enqueue // 4, min(500, sizes.enqueue))
        progress(f"redis: enqueue one at a time ({sequential:,})")
        rows.append(
            await _versus(
                "enqueue (one at a time)",
                (lambda: library.enqueue(_config(url), sequential, 1)) if have_ours else None,
                lambda: raw_enqueue(server.url, sequential, 1),
                r,
                f"one redis-py XADD loop ({FSYNC})",
                None,
            )
        )
        # Ours with as many requests in flight as the raw reader takes per
        # call: that many pollers, and the batch path.
        for operation, ours in (
            (f"poll+ack ({CONSUMERS} pollers)", ours_consume),
            (f"poll_many({BATCH})+ack_many", ours_consume_batches),
        ):
            progress(f"redis: {operation}")
            rows.append(
                await _versus(
                    operation,
                    (lambda ours=ours: ours(_config(url), sizes.consume)) if have_ours else None,
                    lambda: raw_consume(server.url, sizes.consume, BATCH),
                    r,
                    f"redis-py XREADGROUP COUNT {BATCH} + one XACK per batch ({FSYNC})",
                    0.5,
                )
            )
        progress(f"redis: sequential poll+ack ({sequential:,})")
        rows.append(
            await _versus(
                "sequential poll+ack",
                (lambda: library.sequential_poll_ack(_config(url), sequential))
                if have_ours
                else None,
                lambda: raw_sequential(server.url, sequential),
                r,
                f"one redis-py XREADGROUP COUNT 1 + XACK loop ({FSYNC})",
                None,
            )
        )
        if have_ours:
            rows += await _latency_and_ensemble_rows(url, server.url, sizes, progress)
        if have_ours and scale_out:
            rows += await scaleout_rows(BACKEND, url, {}, sizes.quick, progress)
            rows += await registry_rows(BACKEND, url, {}, sizes.quick, progress)
        rows += await task_queues(
            server.url, url if have_ours else None, sizes, progress, logs, jobs_n, crash_bound
        )
    finally:
        await asyncio.to_thread(server.close)
        # The task-queue workers' logs: a failure quotes the tail of its log.
        shutil.rmtree(logs, ignore_errors=True)
    return rows


async def _latency_and_ensemble_rows(
    url: str, redis_url: str, sizes: Sizes, progress: Callable[[str], None]
) -> list[Row]:
    """Round trips through the delivery registry, event-bus latency, and an
    ``Ensemble`` against FastStream's request/reply (alternating rounds;
    ours on ``url``, the raw client and FastStream on ``redis_url``)."""
    r = sizes.rounds
    rows: list[Row] = []
    progress("redis: round trip")
    ours_samples: list[float] = []
    raw_samples: list[float] = []
    for _ in range(r):
        ours_samples += await library.round_trip(_config(url), sizes.round_trips, warm_ups=0)
        raw_samples += await raw_round_trip(redis_url, sizes.round_trips)
    # The p50 target is ours <= 2 x raw + 0.5 ms, as a ratio raw/ours.
    rows += _latency_rows(
        "round trip",
        ours_samples,
        raw_samples,
        f"raw XADD→XREADGROUP→RPUSH reply→XACK, caller BLPOP ({FSYNC})",
        lambda b: round(b / (2 * b + 0.5), 3),
    )
    progress("redis: event bus publish→receive")
    ours_bus: list[float] = []
    raw_bus: list[float] = []
    for _ in range(r):
        ours_bus += await library.bus_latency(_config(url), sizes.round_trips)
        raw_bus += await raw_bus_latency(redis_url, sizes.round_trips)
    rows += _latency_rows(
        "bus publish→receive",
        ours_bus,
        raw_bus,
        "redis-py PUBLISH + subscriber parsing the same JSON (informational)",
        None,
    )
    progress("redis: ensemble end to end vs FastStream request/reply")
    a, b = await alternate(
        lambda: library.ensemble(_config(url), sizes.round_trips * 2),
        lambda: faststream_request_reply(redis_url, sizes.round_trips * 2),
        r,
    )
    rows.append(library.request_reply_row(BACKEND, a, b, "Redis pub/sub reply channel"))
    return rows


async def task_queues(
    redis_url: str,
    ours_target: str | None,
    sizes: Sizes,
    progress: Callable[[str], None],
    logs: Path,
    jobs_n: int | None = None,
    crash_bound: float | None = None,
) -> list[Row]:
    """The task-queue rows: each contender's enqueue and one-worker
    processing rate against ours (target 2x), and the SIGKILL check."""
    if jobs_n is None:
        jobs_n = 200 if sizes.quick else 3000
    bound = crash_bound or (12.0 if sizes.quick else 120.0)
    timeout = 120.0 if sizes.quick else 600.0
    ours: tuple[float, float] | None = None
    ours_survives = ""
    rows: list[Row] = []
    if ours_target is not None:
        c = ours_contender(ours_target, redis_url)
        progress(f"redis: ours, {jobs_n} jobs with one worker process")
        ours = await contender_throughput(c, redis_url, jobs_n, logs, timeout)
        progress("redis: ours, SIGKILLed worker")
        ours_survives = await contender_survives(c, redis_url, logs, bound)
        progress(f"redis: ours survives a SIGKILLed worker: {ours_survives}")
    for make in (celery_contender, dramatiq_contender, rq_contender, taskiq_contender):
        try:
            c = make(redis_url)
        except ImportError as exc:
            progress(f"redis: {make.__name__} skipped ({exc})")
            continue
        try:
            progress(f"redis: {c.name}, {jobs_n} jobs with one worker process")
            enq, proc = await contender_throughput(c, redis_url, jobs_n, logs, timeout)
            progress(f"redis: {c.name}, SIGKILLed worker")
            survives = await contender_survives(c, redis_url, logs, bound)
        finally:
            if c.close is not None:
                await c.close()
        progress(f"redis: {c.name} survives a SIGKILLed worker: {survives}")
        for operation, index, extra in (
            ("jobs: enqueue", 0, "a plain enqueue loop"),
            ("jobs: 1 worker process", 1, c.settings),
        ):
            name = f"{c.name}, {extra} ({FSYNC})"
            theirs = (enq, proc)[index]
            if ours is None:
                rows.append(_na_row(operation, [theirs], name, 2.0))
            else:
                rows.append(throughput_row(BACKEND, operation, [ours[index]], [theirs], name, 2.0))
        rows.append(
            Row(
                BACKEND,
                "survives SIGKILLed worker",
                0.0,
                0.0,
                f"{c.name}: {survives} ({c.crash_settings}); "
                f"ours: {ours_survives or 'n/a (' + NOT_INSTALLED + ')'}",
                "",
                0.0,
                missing="" if ours is not None else NOT_INSTALLED,
            )
        )
    return rows
