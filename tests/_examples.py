"""Run the shipped examples as a user would: a subprocess, configured only by
``TRANSPORT_*`` environment variables."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
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


ROOT = Path(__file__).parent.parent
#: Every document a newcomer reads; each Python block in them must run as written.
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
#: ``# needs a Kafka broker: TRANSPORT_URL=kafka://…`` — run by that broker's
#: tests with TRANSPORT_URL pointing at their broker.
_NEEDS_BROKER = re.compile(r"^# needs (?P<what>.+?): TRANSPORT_URL=")
#: ``# kitchen_worker.py — runs until SIGTERM …`` — a background process.
_FILE = re.compile(r"^# (?P<name>[\w-]+\.py) — (?P<rest>.*)$")


@dataclass(frozen=True)
class DocBlock:
    """One Python block of a document, classified by its first line."""

    doc: Path
    line: int
    code: str

    @property
    def first_line(self) -> str:
        return self.code.split("\n", 1)[0]

    @property
    def broker(self) -> str | None:
        """What the block needs (``a Kafka broker``), or None for the embedded default."""
        match = _NEEDS_BROKER.match(self.first_line)
        return match.group("what") if match else None

    @property
    def compile_only(self) -> bool:
        """A production sketch (``# needs a cluster …`` without TRANSPORT_URL)."""
        return self.first_line.startswith("# needs ") and self.broker is None

    @property
    def file_name(self) -> str:
        match = _FILE.match(self.first_line)
        return match.group("name") if match else f"block_{self.line}.py"

    @property
    def background(self) -> bool:
        match = _FILE.match(self.first_line)
        return bool(match and "until SIGTERM" in match.group("rest"))

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def doc_blocks(doc: Path) -> list[DocBlock]:
    text = doc.read_text(encoding="utf-8")
    return [
        DocBlock(doc, text.count("\n", 0, match.start()) + 1, match.group(1))
        for match in _BLOCK.finditer(text)
    ]


def _env(settings: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSPORT_")}
    for key, value in settings.items():
        env[f"TRANSPORT_{key.upper()}"] = (
            json.dumps(value) if isinstance(value, dict) else str(value)
        )
    return env


def run_doc_blocks(blocks: list[DocBlock], cwd: Path, **settings: Any) -> list[str]:
    """Run ``blocks`` in order as scripts in ``cwd`` (so they share the default
    ``sqlite:///transport.db``): background ones (``runs until SIGTERM``) are
    started, the others run to completion; then every background process gets
    SIGTERM and must exit 0. Returns each block's stdout; fails naming the
    block that did not run."""
    env = _env(settings)
    outputs: list[str] = []
    background: list[tuple[DocBlock, subprocess.Popen[str]]] = []
    try:
        for block in blocks:
            script = cwd / block.file_name
            script.write_text(block.code, encoding="utf-8")
            if block.background:
                proc = subprocess.Popen(
                    [sys.executable, script.name],
                    cwd=cwd,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                background.append((block, proc))
                continue
            result = subprocess.run(
                [sys.executable, script.name],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, (
                f"{block.id} failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
            )
            outputs.append(result.stdout)
        for block, proc in background:
            assert proc.poll() is None, f"{block.id} exited early:\n{proc.communicate()[1][-3000:]}"
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, (
                f"{block.id} did not stop cleanly on SIGTERM (exit {proc.returncode}):\n{err[-3000:]}"
            )
            outputs.append(out)
    finally:
        for _, proc in background:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def top_on(queue: str, count: int, **settings: Any) -> list[dict[str, Any]]:
    """Enqueue ``count`` requests on ``queue``, then run ``transport top
    QUEUE --json`` (two refreshes) as a user would, configured by
    ``TRANSPORT_*`` only; returns its snapshots."""
    import asyncio

    from transport import WorkRequest, connect

    async def seed() -> None:
        async with await connect(**settings) as transport:
            handle = transport.request_queue(queue)
            for _ in range(count):
                await handle.enqueue(WorkRequest(task="cook"))
            await handle.aclose()

    asyncio.run(seed())
    argv = ["top", queue, "--json", "--count", "2", "--interval", "0.2"]
    result = subprocess.run(
        [sys.executable, "-m", "transport.cli", *argv],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]
