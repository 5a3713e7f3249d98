"""The shortened reliability run inside ``make test``; ``make reliability``
runs the full one and writes RELIABILITY.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability._scenarios import Sizes, run_all
from tests.reliability.targets import sqlite_target

pytestmark = [pytest.mark.crash, pytest.mark.timeout(600)]

SHORT = Sizes(requests=300, kills=2, outage_seconds=2.0, churn_seconds=3.0)


async def test_sqlite_survives_every_fault(tmp_path: Path) -> None:
    async with sqlite_target() as harness:
        rows = await run_all("sqlite", harness, SHORT, tmp_path)
    failed = [r for r in rows if r.get("ok") is False]
    assert not failed, failed
    assert all(r.get("lost", 0) == 0 for r in rows)
    assert sum(r.get("ok") is True for r in rows) >= 6
