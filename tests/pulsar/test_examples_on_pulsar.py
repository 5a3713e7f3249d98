"""The examples run unchanged on Pulsar: only the ``TRANSPORT_*`` settings differ."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._examples import DONE, EXAMPLES, run_example

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
