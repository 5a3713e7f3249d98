"""The taskiq broker and task of ``benchmarks/redis.py``, for ``taskiq
worker benchmarks._redis_taskiq:broker`` with ``BENCH_REDIS_URL`` set.

taskiq-redis's ``RedisStreamBroker`` (Redis Streams, a consumer group, the
message acked after the task ran -- the worker's default ``--ack-type
when_saved``); a message a dead worker held is claimed by another worker's
``XAUTOCLAIM`` once idle for ``idle_timeout`` (default 600,000 ms).
``BENCH_CRASH=1`` lowers it (:data:`CRASH_OPTIONS`).
"""

from __future__ import annotations

import os
from typing import Any

from taskiq_redis import RedisStreamBroker

from benchmarks import _redis_jobs as jobs

QUEUE = "bench-taskiq"
CRASH_OPTIONS = {"idle_timeout": 5000}


def make_broker(url: str, crash: bool) -> Any:
    """A broker on ``url`` with the ``noop`` task registered."""
    broker = RedisStreamBroker(url, queue_name=QUEUE, **(CRASH_OPTIONS if crash else {}))
    counters: dict[str, Any] = {}

    @broker.task(task_name="noop")
    async def noop(run: str, i: int, total: int, crash: bool) -> None:
        if "client" not in counters:
            import redis.asyncio as aredis

            counters["client"] = aredis.Redis.from_url(url)
        await jobs.ajob(counters["client"], run, i, total, crash)

    return broker


broker = (
    make_broker(os.environ["BENCH_REDIS_URL"], os.environ.get("BENCH_CRASH") == "1")
    if "BENCH_REDIS_URL" in os.environ
    else None
)
