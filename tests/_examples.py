"""Run the shipped examples as a user would: a subprocess, configured only by
``TRANSPORT_*`` environment variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
DONE = "all 9 orders answered; pending now: 0"


def run_example(example: Path, cwd: Path, **settings: Any) -> subprocess.CompletedProcess[str]:
    """Run ``example`` with ``TRANSPORT_<NAME>`` set from ``settings`` (and
    no other ``TRANSPORT_*`` variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSPORT_")}
    for key, value in settings.items():
        env[f"TRANSPORT_{key.upper()}"] = (
            json.dumps(value) if isinstance(value, dict) else str(value)
        )
    return subprocess.run(
        [sys.executable, str(example)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=150,
    )
