"""The Redis benchmark's quick path at a tiny size (``benchmarks/redis.py``).

Not a timed assertion: it checks that every row is produced with positive
rates, raw redis-py, Celery, Dramatiq, RQ and taskiq
alike, and that the SIGKILL
check reports for each. Ours runs on ``sqlite://`` here (the rows' code
through the public API, until a ``redis`` backend is registered), whose
leases bring a killed worker's request back.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import redis as bench
from benchmarks.__main__ import table
from benchmarks._common import Row, Sizes

pytestmark = [pytest.mark.broker, pytest.mark.crash, pytest.mark.timeout(600)]

THROUGHPUT = {
    "enqueue (8 in flight)",
    "enqueue (one at a time)",
    "poll+ack (64 pollers)",
    "poll_many(64)+ack_many",
    "sequential poll+ack",
    "jobs: enqueue",
    "jobs: 1 worker process",
}


async def test_every_redis_row_has_positive_rates_and_a_sigkill_verdict(tmp_path: Path) -> None:
    sizes = Sizes(quick=True, enqueue=40, consume=40, round_trips=5, concurrency=8, rounds=1)
    seen: list[str] = []
    rows = await bench.run(
        sizes,
        seen.append,
        jobs_n=10,
        crash_bound=20.0,
        ours_target=f"sqlite:///{tmp_path}/bench.db",
        scale_out=False,  # tests/test_benchmarks_scaleout.py covers those rows' harness
    )

    assert {r.operation for r in rows} == THROUGHPUT | {"survives SIGKILLed worker"}
    for r in rows:
        assert r.backend == "redis" and not r.missing, r
        if r.operation in THROUGHPUT:
            assert r.ours > 0 and r.baseline > 0 and r.ratio > 0, r
            assert "appendfsync always" in r.baseline_name, r
    survived = [r.baseline_name for r in rows if r.operation == "survives SIGKILLed worker"]
    assert [name.split()[0] for name in survived] == ["Celery", "Dramatiq", "RQ", "taskiq-redis"]
    for name in survived:
        assert re.search(r": (yes after [\d.]+ s|no within \d+ s)", name), name
        assert "ours: yes after" in name, name
    jobs_rows = [
        r.baseline_name.split()[0] for r in rows if r.operation == "jobs: 1 worker process"
    ]
    assert jobs_rows == ["Celery", "Dramatiq", "RQ", "taskiq-redis"]


def test_a_row_without_our_figure_prints_na_and_keeps_its_target() -> None:
    row = Row(
        "redis", "enqueue", 0.0, 1234.5, "raw", "msg/s", 0.0, 0.8, missing="backend not installed"
    )
    printed = table([row]).splitlines()[-1]
    assert " n/a " in printed and "1,234.5" in printed and " 0.8 " in printed
    assert "ours: n/a (backend not installed)" in printed
    assert row.json()["ours"] is None and row.json()["met"] is None
    assert "missing" not in Row("redis", "x", 1.0, 1.0, "raw", "msg/s", 1.0).json()
