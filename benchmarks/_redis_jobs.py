"""The no-op job every Redis task queue runs in ``benchmarks/redis.py``, and
this library's worker process for the same job.

A job records itself in Redis (keys under ``bench:<run>``) so that the
harness, in another process, can time the workers and see which jobs ran:

- throughput jobs ``INCR`` a counter; the first stores its wall-clock time,
  the last stores its own and pushes to a list the harness waits on;
- of the crash jobs, the first to begin takes ``hang`` (``SET NX``), then
  pushes its number to ``started`` (the harness waits on it, so a kill comes
  after ``hang`` is taken: a copy delivered again does not hang) and sleeps
  until its worker is killed; every job that finishes adds its number to
  ``done`` (a set: a job run twice counts once) and pushes it to
  ``done-list`` (waited on).

``python -m benchmarks._redis_jobs URL REDIS_URL QUEUE RUN TOTAL CRASH LEASE``
runs this library's worker: one ``poll -> job -> ack`` loop (concurrency 1)
on ``request_queue(QUEUE)`` of ``URL``, until killed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

HANG_SECONDS = 600.0


def keys(run: str) -> dict[str, str]:
    """The Redis keys of one measurement."""
    prefix = f"bench:{run}"
    return {
        name: f"{prefix}:{name}"
        for name in ("count", "first", "last", "finished", "started", "hang", "done", "done-list")
    }


def job(client: Any, run: str, i: int, total: int, crash: bool) -> None:
    """The job body on a synchronous redis-py client (see the module doc)."""
    k = keys(run)
    if not crash:
        count = client.incr(k["count"])
        if count == 1:
            client.set(k["first"], repr(time.time()))
        if count == total:
            client.set(k["last"], repr(time.time()))
            client.rpush(k["finished"], 1)
        return
    if client.set(k["hang"], i, nx=True):
        client.rpush(k["started"], i)
        time.sleep(HANG_SECONDS)  # the harness SIGKILLs the worker here
    client.sadd(k["done"], i)
    client.rpush(k["done-list"], i)


async def ajob(client: Any, run: str, i: int, total: int, crash: bool) -> None:
    """:func:`job` on an asyncio redis-py client."""
    k = keys(run)
    if not crash:
        count = await client.incr(k["count"])
        if count == 1:
            await client.set(k["first"], repr(time.time()))
        if count == total:
            await client.set(k["last"], repr(time.time()))
            await client.rpush(k["finished"], 1)
        return
    if await client.set(k["hang"], i, nx=True):
        await client.rpush(k["started"], i)
        await asyncio.sleep(HANG_SECONDS)
    await client.sadd(k["done"], i)
    await client.rpush(k["done-list"], i)


_clients: dict[tuple[int, str], Any] = {}


def client(url: str) -> Any:
    """One synchronous redis-py client per process and URL (fork-safe: a
    forked child makes its own)."""
    key = (os.getpid(), url)
    if key not in _clients:
        import redis

        _clients[key] = redis.Redis.from_url(url)
    return _clients[key]


def dramatiq_noop(run: str, i: int, total: int, crash: bool) -> None:
    """Dramatiq's actor function (the broker URL is the worker's
    ``BENCH_REDIS_URL``)."""
    job(client(os.environ["BENCH_REDIS_URL"]), run, i, total, crash)


def rq_noop(run: str, i: int, total: int, crash: bool) -> None:
    """RQ's job function, on the job's own connection."""
    from rq import get_current_job

    current = get_current_job()
    assert current is not None
    job(current.connection, run, i, total, crash)


async def ours_worker(
    url: str, redis_url: str, queue_name: str, run: str, total: int, crash: bool, lease: float
) -> None:
    """One ``poll -> job -> ack`` loop through the public API, forever."""
    import redis.asyncio as aredis

    from transport import TransportConfig, connect

    transport = await connect(TransportConfig(url=url, namespace="bench", lease_seconds=lease))
    counter = aredis.Redis.from_url(redis_url)
    queue = transport.request_queue(queue_name)
    while True:
        delivery = await queue.poll(1.0)
        if delivery is None:
            continue
        payload = delivery.request.payload
        await ajob(counter, run, int(payload["i"]), total, crash)
        await delivery.ack()


if __name__ == "__main__":
    url, redis_url, queue_name, run, total, crash, lease = sys.argv[1:8]
    asyncio.run(
        ours_worker(url, redis_url, queue_name, run, int(total), crash == "1", float(lease))
    )
