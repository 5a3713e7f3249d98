"""The examples run unchanged on Kafka: only the ``TRANSPORT_*`` settings differ."""

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

from .conftest import TEST_OPTIONS

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_on_kafka(
    example: Path, kafka_bootstrap: str, kafka_namespace: str, tmp_path: Path
) -> None:
    result = run_example(
        example,
        tmp_path,
        url=f"kafka://{kafka_bootstrap}",
        namespace=f"{kafka_namespace}ex",
        options=TEST_OPTIONS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert DONE in result.stdout


def test_the_guides_local_blocks_run_on_kafka(
    kafka_bootstrap: str, kafka_namespace: str, tmp_path: Path
) -> None:
    blocks = [b for b in doc_blocks(ROOT / "docs/backends/kafka.md") if b.broker]
    assert blocks, "the guide's 'Run it locally' block is missing"
    outputs = run_doc_blocks(
        blocks,
        tmp_path,
        url=f"kafka://{kafka_bootstrap}",
        namespace=f"{kafka_namespace}doc",
        options=TEST_OPTIONS,
    )
    assert "{'dish': 'soup'}" in "".join(outputs)


def test_cli_top_on_kafka(kafka_bootstrap: str, kafka_namespace: str) -> None:
    snapshots = top_on(
        "orders",
        3,
        url=f"kafka://{kafka_bootstrap}",
        namespace=f"{kafka_namespace}top",
        options=TEST_OPTIONS,
    )
    assert [s["error"] for s in snapshots] == [None, None]
    row = snapshots[-1]["queues"][0]
    assert (row["queue"], row["depth"], row["dead_lettered"]) == ("orders", 3, 0)
    # The oldest waiting request's age, read from the group's committed
    # offset by a client that is not a member ("?" before it was reported).
    assert row["head_age_seconds"] is not None and row["head_age_seconds"] >= 0, row
