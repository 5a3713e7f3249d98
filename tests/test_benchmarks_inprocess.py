"""``benchmarks/inprocess.py`` (the memory and sqlite rows of ``make
bench``) removes the directory of its databases when it ends, also when a
measurement fails: at full size they hold the 1,000,000-request backlog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import inprocess
from benchmarks._common import Sizes
from tests._tmpdirs import record_mkdtemp

SIZES = Sizes(quick=True, enqueue=10, consume=10, round_trips=1, concurrency=1, rounds=1)


async def test_the_databases_go_when_the_run_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    made = record_mkdtemp(monkeypatch, "bench-")

    async def measured(tmp: Path, sizes: Sizes, progress: object) -> list[Any]:
        (tmp / "bench.db").write_bytes(b"x" * 1024)
        return []

    monkeypatch.setattr(inprocess, "_run", measured)
    assert await inprocess.run(SIZES, print) == []
    assert len(made) == 1 and not made[0].exists()


async def test_the_databases_go_when_a_measurement_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    made = record_mkdtemp(monkeypatch, "bench-")

    async def failing(tmp: Path, sizes: Sizes, progress: object) -> list[Any]:
        (tmp / "bench.db").write_bytes(b"x" * 1024)
        raise RuntimeError("a measurement failed")

    monkeypatch.setattr(inprocess, "_run", failing)
    with pytest.raises(RuntimeError, match="a measurement failed"):
        await inprocess.run(SIZES, print)
    assert len(made) == 1 and not made[0].exists()
