"""The registry-restart benchmark's harness at a tiny size
(``benchmarks/registry.py``) on ``sqlite://``: the fill leaves only
collected responses (a fresh caller finds nothing live and nothing of them
in the file), and the rows carry both restarts. Not a timed assertion."""

from __future__ import annotations

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
