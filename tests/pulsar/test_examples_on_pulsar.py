"""The examples run unchanged on Pulsar: only the ``TRANSPORT_*`` settings differ."""

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

from .conftest import make_config

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_on_pulsar(example: Path, pulsar_url: str, tmp_path: Path) -> None:
    config = make_config(pulsar_url)
    result = run_example(
        example, tmp_path, url=pulsar_url, namespace=config.namespace, options=config.options
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert DONE in result.stdout


def test_the_guides_local_blocks_run_on_pulsar(pulsar_url: str, tmp_path: Path) -> None:
    blocks = [b for b in doc_blocks(ROOT / "docs/backends/pulsar.md") if b.broker]
    assert blocks, "the guide's 'Run it locally' block is missing"
    config = make_config(pulsar_url)
    outputs = run_doc_blocks(
        blocks, tmp_path, url=pulsar_url, namespace=config.namespace, options=config.options
    )
    assert "{'dish': 'soup'}" in "".join(outputs)


def test_cli_top_on_pulsar(pulsar_url: str) -> None:
    config = make_config(pulsar_url)
    snapshots = top_on(
        "orders", 3, url=pulsar_url, namespace=config.namespace, options=config.options
    )
    assert [s["error"] for s in snapshots] == [None, None]
    row = snapshots[-1]["queues"][0]
    # pulsar-lite may not report a backlog (depth None: "?" in the view).
    assert row["queue"] == "orders" and row["depth"] in (3, None) and row["dead_lettered"] == 0
