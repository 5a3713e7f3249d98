"""The scale-out benchmark's harness at a tiny size (``benchmarks/scaleout.py``)
on ``sqlite://``: worker processes (Ensembles) drain a backlog, every request
is seen once, and the rate is positive. Not a timed assertion."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import scaleout

pytestmark = [pytest.mark.timeout(180)]


async def test_two_worker_processes_drain_the_whole_backlog(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'scale.db'}"
    rate = await scaleout.measure(url, {}, processes=2, n=60, timeout=120)
    # 2 processes x concurrency 4 / 50 ms: at most 160/s (plus rounding of
    # the 10th-90th percentile window).
    assert 0 < rate < 200


async def test_a_backlog_the_workers_cannot_finish_is_reported(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'scale.db'}"
    with pytest.raises(RuntimeError, match=r"finished \d+ of 400 requests"):
        await scaleout.measure(url, {}, processes=1, n=400, timeout=2)
