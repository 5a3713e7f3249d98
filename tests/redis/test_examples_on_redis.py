"""The examples run unchanged on Redis: only ``TRANSPORT_URL`` differs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._examples import (
    DONE,
    EXAMPLES,
    ROOT,
    doc_blocks,
    run_doc_blocks,
    run_example,
    top_on,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_on_redis(
    example: Path, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    result = run_example(example, tmp_path, url=redis_url, namespace=namespace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert DONE in result.stdout


def test_the_guides_local_blocks_run_on_redis(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    blocks = [b for b in doc_blocks(ROOT / "docs/backends/redis.md") if b.broker]
    assert blocks, "the guide's 'Run it locally' block is missing"
    outputs = run_doc_blocks(blocks, tmp_path, url=redis_url, namespace=namespace)
    assert "{'dish': 'soup'}" in "".join(outputs)


def test_cli_top_on_redis(redis_url: str, namespace: str) -> None:
    snapshots = top_on("orders", 3, url=redis_url, namespace=namespace)
    assert [s["error"] for s in snapshots] == [None, None]
    row = snapshots[-1]["queues"][0]
    assert (row["queue"], row["depth"], row["dead_lettered"]) == ("orders", 3, 0)
