"""Every example runs as a subprocess, as a user would run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._examples import DONE, EXAMPLES, run_example


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("url", [None, "memory://"])
def test_example_runs(example: Path, url: str | None, tmp_path: Path) -> None:
    result = run_example(example, tmp_path, **({"url": url} if url else {}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert DONE in result.stdout
