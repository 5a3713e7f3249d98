"""The in-process backends report how long the head of a queue has waited."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._head import check_head_is_the_next_in_line
from transport import connect


@pytest.mark.parametrize("scheme", ["memory", "sqlite"])
async def test_stats_report_the_head_of_the_queue(scheme: str, tmp_path: Path) -> None:
    url = "memory://head" if scheme == "memory" else f"sqlite:///{tmp_path / 'head.db'}"
    async with await connect(url) as transport:
        await check_head_is_the_next_in_line(transport, "orders")


async def test_a_priority_queue_reports_its_oldest_head(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from transport import WorkRequest

    async with await connect(f"sqlite:///{tmp_path / 'p.db'}") as transport:
        queue = transport.priority_queue("orders", levels=3)
        old = datetime.now(UTC) - timedelta(hours=1)
        await queue.enqueue(WorkRequest(task="t", enqueued_at=old + timedelta(minutes=30)), 0)
        await queue.enqueue(WorkRequest(task="t", enqueued_at=old), 2)
        assert (await queue.stats()).head_enqueued_at == old
        await queue.aclose()
