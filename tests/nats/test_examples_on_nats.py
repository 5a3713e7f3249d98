"""The examples run unchanged on NATS: only ``TRANSPORT_URL`` differs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._examples import DONE, EXAMPLES, run_example

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_on_nats(example: Path, nats_url: str, namespace: str, tmp_path: Path) -> None:
    result = run_example(example, tmp_path, url=nats_url, namespace=namespace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert DONE in result.stdout
