"""The Redis benchmark's quick path at a tiny size (``benchmarks/redis.py``).

Not a timed assertion: it checks that every row is produced with positive
rates (latencies), raw redis-py, FastStream's request/reply, Celery,
Dramatiq, RQ and taskiq alike, and that the SIGKILL
check reports for each. Ours runs on the benchmark's own redis-server,
through the ``redis://`` backend.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import redis as bench
from benchmarks.__main__ import table
from benchmarks._common import Row, Sizes
from tests._tmpdirs import record_mkdtemp

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
LATENCY = {
    "round trip p50",
    "round trip p99",
    "bus publish→receive p50",
    "bus publish→receive p99",
}


async def test_every_redis_row_has_positive_rates_and_a_sigkill_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = Sizes(quick=True, enqueue=40, consume=40, round_trips=5, concurrency=8, rounds=1)
    seen: list[str] = []
    logs = record_mkdtemp(monkeypatch, "bench-redis-")
    rows = await bench.run(
        sizes,
        seen.append,
        jobs_n=10,
        crash_bound=20.0,
        scale_out=False,  # tests/test_benchmarks_scaleout.py covers those rows' harness
    )

    # The task-queue workers' logs are not left behind.
    assert len(logs) == 1 and not logs[0].exists(), logs
    assert {r.operation for r in rows} == THROUGHPUT | LATENCY | {
        "ensemble request/response",
        "survives SIGKILLed worker",
    }
    for r in rows:
        assert r.backend == "redis" and not r.missing, r
        if r.operation in THROUGHPUT:
            assert r.ours > 0 and r.baseline > 0 and r.ratio > 0, r
            assert "appendfsync always" in r.baseline_name, r
        if r.operation in LATENCY:
            assert r.unit == "ms" and r.ours > 0 and r.baseline > 0, r
            # ours, baseline and ratio are each shown rounded to 0.001 ms, and the
            # ratio is of the unrounded ones: it must lie in the interval that the
            # shown figures allow (at sub-millisecond latencies that interval is
            # wider than any fixed tolerance; 0.397 / 0.292 allows 1.355-1.364)
            h = 0.0005
            low, high = (r.baseline - h) / (r.ours + h), (r.baseline + h) / (r.ours - h)
            assert low - h <= r.ratio <= high + h, (r, low, high)
    [p50] = [r for r in rows if r.operation == "round trip p50"]
    assert p50.target is not None, p50
    assert abs(p50.target - p50.baseline / (2 * p50.baseline + 0.5)) < 0.002, p50
    assert "appendfsync always" in p50.baseline_name, p50
    [ensemble] = [r for r in rows if r.operation == "ensemble request/response"]
    assert ensemble.ours > 0 and ensemble.baseline > 0 and ensemble.target == 1.0, ensemble
    assert "FastStream request/reply" in ensemble.baseline_name, ensemble
    assert "not durable" in ensemble.baseline_name, ensemble
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
