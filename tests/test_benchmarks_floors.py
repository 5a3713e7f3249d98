"""The floors of ``python -m benchmarks.floors`` at a tiny size: every
measurement runs to the end (the consume floor checks that each leased row
is deleted), and every rate is positive. Not a timed assertion."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from benchmarks import floors
from tests._tmpdirs import record_mkdtemp

pytestmark = [pytest.mark.timeout(120)]


async def test_every_row_has_positive_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    made = record_mkdtemp(monkeypatch, "floors-")
    rows = await floors._rows(128, 1, lambda _: None)
    # The databases of every round (hundreds of MB at the default size) go.
    assert made and not any(path.exists() for path in made), made
    assert [row[0] for row in rows] == [
        "memory put+get+ack (vs kombu)",
        "sqlite enqueue, 64 in flight",
        "sqlite poll+ack, 32 pollers",
        "sqlite poll_many(64)+ack_many",
    ]
    for name, base, floor, _, ours, _, _ in rows:
        for figure in (base, floor, ours):
            assert float(figure.replace(",", "")) > 0, (name, figure)


def test_the_consume_floor_leaves_an_empty_queue(tmp_path: Path) -> None:
    path = tmp_path / "floor.db"
    assert floors.consume_floor(path, 192, 64) > 0
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)


def test_the_enqueue_floor_stores_every_request_in_order(tmp_path: Path) -> None:
    path = tmp_path / "floor.db"
    assert floors.enqueue_floor(path, 192) > 0
    seqs = [s for (s,) in sqlite3.connect(path).execute("SELECT seq FROM messages ORDER BY id")]
    assert seqs == list(range(192))
