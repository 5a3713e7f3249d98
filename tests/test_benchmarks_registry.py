"""The registry-restart benchmark's harness at a tiny size
(``benchmarks/registry.py``) on ``sqlite://``: the fill leaves only
collected responses (a fresh caller finds nothing live and nothing of them
in the file), and the rows carry both restarts. Not a timed assertion."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from benchmarks import registry

pytestmark = [pytest.mark.timeout(180)]


async def test_a_filled_registry_restarts_with_nothing_live(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    said: list[str] = []
    rows = await registry.registry_rows("sqlite", f"sqlite:///{db}", {}, True, said.append, n=300)
    assert [r.operation for r in rows] == [
        "caller restart, 300 collected responses",
        "caller RSS, 300 collected responses",
    ]
    assert all(r.unit in ("s", "MB") and r.ours >= 0 for r in rows)
    assert any("the view saw 1,200 changes" in line for line in said)
    conn = sqlite3.connect(db)
    try:
        left = conn.execute("SELECT COUNT(*) FROM kv WHERE log LIKE '%delivery:caller'").fetchone()
    finally:
        conn.close()
    assert left == (0,), "collected responses left records behind"


async def test_a_view_that_never_settles_gives_rows_without_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry stage whose view does not report the fill applied gives up
    after ``SETTLE_TIMEOUT`` with "n/a" rows saying why, instead of holding
    up the whole benchmark run."""
    from transport._spi import registries

    async def never(self: object, changes: int) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(registries._LogView, "settled", never)
    monkeypatch.setattr(registry, "SETTLE_TIMEOUT", 0.2)
    said: list[str] = []
    db = tmp_path / "registry.db"
    rows = await registry.registry_rows("sqlite", f"sqlite:///{db}", {}, True, said.append, n=50)
    assert [(r.operation, r.ours) for r in rows] == [
        ("caller restart, 50 collected responses", 0.0),
        ("caller RSS, 50 collected responses", 0.0),
    ]
    assert all("of the fill's 200 changes" in r.missing for r in rows)
    assert all(r.json()["ours"] is None for r in rows)
    assert any("registry stage given up" in line for line in said)
