"""The Celery app of ``benchmarks/redis.py``: Redis broker, acks after the
task ran (``task_acks_late``), one message reserved per worker process
(``worker_prefetch_multiplier=1``), no result backend.

A worker runs it as ``celery -A benchmarks._redis_celery worker`` with
``BENCH_REDIS_URL`` set; ``BENCH_CRASH=1`` lowers the redelivery settings
(:data:`CRASH_OPTIONS`) so that a message held by a killed worker comes back
within seconds instead of after ``visibility_timeout`` (one hour by default).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from benchmarks import _redis_jobs as jobs

QUEUE = "bench"
#: kombu's Redis transport: an unacked message is restored once it is older
#: than ``visibility_timeout`` (default 3600 s), by a sweep every
#: ``unacked_restore_interval`` x ``unacked_restore_throttle`` seconds
#: (defaults 10 x 10).
CRASH_OPTIONS = {
    "visibility_timeout": 5,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}


def make_app(url: str, crash: bool) -> Any:
    app = Celery("bench", broker=url)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if crash:
        app.conf.broker_transport_options = dict(CRASH_OPTIONS)

    @app.task(name="noop")
    def noop(run: str, i: int, total: int, crash: bool) -> None:
        jobs.job(jobs.client(url), run, i, total, crash)

    return app


app = (
    make_app(os.environ["BENCH_REDIS_URL"], os.environ.get("BENCH_CRASH") == "1")
    if "BENCH_REDIS_URL" in os.environ
    else None
)
