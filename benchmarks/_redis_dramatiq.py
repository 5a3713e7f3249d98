"""The Dramatiq broker and actor of ``benchmarks/redis.py``, for
``dramatiq benchmarks._redis_dramatiq`` with ``BENCH_REDIS_URL`` set.

Dramatiq's Redis broker acks after the actor ran; messages a dead worker
held are requeued by another worker's maintenance once the dead one's
heartbeat is older than ``heartbeat_timeout`` (default 60 s; maintenance runs
on ``maintenance_chance`` of a million commands, default 1,000).
``BENCH_CRASH=1`` lowers both (:data:`CRASH_OPTIONS`).
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker

from benchmarks import _redis_jobs as jobs

QUEUE = "bench"
CRASH_OPTIONS: dict[str, int] = {"heartbeat_timeout": 5000, "maintenance_chance": MAINTENANCE_SCALE}


def make_actor(url: str, crash: bool) -> Any:
    """A broker on ``url`` and the ``noop`` actor declared on it."""
    broker = RedisBroker(url=url, **(CRASH_OPTIONS if crash else {}))
    return dramatiq.actor(
        jobs.dramatiq_noop, actor_name="noop", queue_name=QUEUE, max_retries=0, broker=broker
    )


if "BENCH_REDIS_URL" in os.environ:
    noop = make_actor(os.environ["BENCH_REDIS_URL"], os.environ.get("BENCH_CRASH") == "1")
    dramatiq.set_broker(noop.broker)
