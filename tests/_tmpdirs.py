"""Recording the temporary directories code makes, to check it removes them."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest


def record_mkdtemp(monkeypatch: pytest.MonkeyPatch, prefix: str | None = None) -> list[Path]:
    """The directories ``tempfile.mkdtemp`` makes from now on in this test
    (``tempfile.TemporaryDirectory`` included; with ``prefix``, only those
    whose name starts with it), in order."""
    made: list[Path] = []
    mkdtemp = tempfile.mkdtemp

    def recorded(*args: Any, **kwargs: Any) -> str:
        path = mkdtemp(*args, **kwargs)
        if prefix is None or Path(path).name.startswith(prefix):
            made.append(Path(path))
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", recorded)
    return made
