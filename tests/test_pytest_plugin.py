"""The ``pytest11`` entry point loads in every pytest run of an environment
where the library is installed, even a base install without the ``test``
extra: it must never break pytest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# pytest as a base install sees it: importing pytest-asyncio fails, its own
# plugin is therefore not loaded, our entry point is loaded as usual.
_WITHOUT_PYTEST_ASYNCIO = """
import sys


class HidePytestAsyncio:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "pytest_asyncio":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, HidePytestAsyncio())
import pytest

# (--assert=plain: the assertion-rewriting import hook would go first and find it)
sys.exit(pytest.main(["-p", "no:asyncio", "-p", "no:cacheprovider", "--assert=plain", "-q"]))
"""


def _run_plain_pytest(project: Path) -> subprocess.CompletedProcess[str]:
    (project / "pytest.ini").write_text("[pytest]\n")
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_PYTEST_ASYNCIO],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_plain_pytest_runs_without_pytest_asyncio(tmp_path: Path) -> None:
    (tmp_path / "test_unrelated.py").write_text("def test_ok():\n    assert 1 + 1 == 2\n")
    run = _run_plain_pytest(tmp_path)
    assert run.returncode == 0, f"plain pytest broke:\n{run.stdout}\n{run.stderr}"
    assert "1 passed" in run.stdout


def test_the_plugin_is_loaded_and_says_what_its_async_fixtures_need(tmp_path: Path) -> None:
    (tmp_path / "test_uses_fixture.py").write_text(
        "def test_needs_transport(transport):\n    pass\n\n"
        "def test_plain(queue_name):\n    assert queue_name.startswith('t')\n"
    )
    run = _run_plain_pytest(tmp_path)
    assert run.returncode == 1, f"expected one error:\n{run.stdout}\n{run.stderr}"
    assert "1 passed, 1 error" in run.stdout, run.stdout
    assert "pip install 'agentensemble-transport[test]'" in run.stdout, run.stdout
