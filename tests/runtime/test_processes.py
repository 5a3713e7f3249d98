"""Process-level behaviour: a caller killed with SIGKILL and restarted gets
every response; an ensemble stopped with SIGTERM finishes in-flight work."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from transport import TransportConfig
from transport.testing._crash_suite import WorkerProcess
from transport.testing.harness import BackendHarness
from transport_inprocess import SqliteTransport

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def harness(tmp_path: Path) -> BackendHarness:
    config = TransportConfig(
        url=f"sqlite:///{tmp_path / 'procs.db'}", options={"poll_interval": 0.02}
    )
    return BackendHarness(config, SqliteTransport.capabilities)


async def start(harness: BackendHarness, *args: str) -> WorkerProcess:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.runtime._procs",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=harness.subprocess_env(),
        cwd=ROOT,
    )
    return WorkerProcess(proc)


async def test_caller_killed_with_pending_requests_gets_every_response_after_restart(
    harness: BackendHarness,
) -> None:
    caller = await start(harness, "send", "5")
    try:
        await caller.wait_for("READY", 60)
    finally:
        await caller.reap()  # SIGKILL with five requests pending
    sent = {
        line.split()[1]: int(line.split()[2]) for line in caller.lines if line.startswith("SENT")
    }
    assert len(sent) == 5
    kitchen = await start(harness, "ensemble", "0.01")
    collector = await start(harness, "collect")
    try:
        await kitchen.wait_for("SERVING", 60)
        await collector.wait_for("COLLECTED", 60)
    finally:
        await kitchen.reap()
        await collector.reap()
    got = {
        line.split()[1]: int(line.split()[2]) for line in collector.lines if line.startswith("GOT")
    }
    assert got == {rid: i * 2 for rid, i in sent.items()}


async def test_sigterm_finishes_in_flight_work_and_exits_cleanly(harness: BackendHarness) -> None:
    kitchen = await start(harness, "ensemble", "1.0")
    caller = await start(harness, "send", "1")
    try:
        await kitchen.wait_for("SERVING", 60)
        await caller.wait_for("READY", 60)
        started = await kitchen.wait_for("STARTED", 60)
        os.kill(kitchen.proc.pid, signal.SIGTERM)
        await kitchen.wait_for("EXITED", 30)
        assert await asyncio.wait_for(kitchen.proc.wait(), 30) == 0
    finally:
        await caller.reap()
        await kitchen.reap()
    request_id = started.split()[1]
    assert f"DONE {request_id}" in kitchen.lines
    collector = await start(harness, "collect")
    try:
        await collector.wait_for("COLLECTED", 60)
    finally:
        await collector.reap()
    assert f"GOT {request_id} 0" in collector.lines
