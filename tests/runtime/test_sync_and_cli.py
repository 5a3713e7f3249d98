"""The blocking facade and the command line."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path

import pytest

from transport import Ensemble, TaskContext, WorkRequest, connect, sync
from transport.cli import main as cli


def test_sync_facade_enqueue_poll_ack_and_request() -> None:
    url = f"memory://sync-{uuid.uuid4().hex[:8]}"
    ready = threading.Event()
    stop = threading.Event()

    def serve() -> None:
        async def run() -> None:
            transport = await connect(url)
            ens = Ensemble("echo", transport=transport, concurrency=1)

            @ens.task("echo")
            async def echo(ctx: TaskContext) -> object:
                return ctx.payload

            async with ens:
                ready.set()
                await asyncio.to_thread(stop.wait)
            await transport.aclose()

        asyncio.run(run())

    server = threading.Thread(target=serve)
    server.start()
    try:
        assert ready.wait(10)
        with sync.connect(url) as transport:
            queue = transport.request_queue("plain")
            stored = queue.enqueue(WorkRequest(task="t", payload={"a": 1}))
            delivery = queue.poll(timeout=5)
            assert delivery is not None and delivery.request.request_id == stored.request_id
            assert delivery.ack() is True and delivery.ack() is False
            batch = queue.enqueue_many(WorkRequest(task="t", payload=i) for i in range(3))
            assert [r.payload for r in batch] == [0, 1, 2]
            for request in batch:
                delivery = queue.poll(timeout=5)
                assert delivery is not None and delivery.request.request_id == request.request_id
                assert delivery.ack() is True
            assert queue.stats().depth == 0
            response = transport.request(
                "echo", "echo", {"hello": "world"}, caller="sync-caller", timeout=10
            )
            assert response.result == {"hello": "world"}
            assert transport.health().ok
    finally:
        stop.set()
        server.join(10)


def _db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


async def _seed(url: str) -> None:
    transport = await connect(url)
    try:
        queue = transport.request_queue("kitchen", max_attempts=1)
        for i in range(3):
            await queue.enqueue(WorkRequest(request_id=f"req-{i}", task="cook", payload=i))
        delivery = await queue.poll(1)
        assert delivery is not None
        await delivery.dead_letter("oven on fire")
        await transport.delivery_registry("front-desk").register("waiting-1")
    finally:
        await transport.aclose()


def test_cli_stats_dead_letters_pending_health(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _db(tmp_path)
    asyncio.run(_seed(url))
    assert cli(["--url", url, "health"]) == 0
    assert "sqlite" in capsys.readouterr().out
    assert cli(["--url", url, "--json", "stats", "kitchen"]) == 0
    [stats] = json.loads(capsys.readouterr().out)
    assert (stats["depth"], stats["dead_lettered"]) == (2, 1)
    assert cli(["--url", url, "dead-letters", "list", "kitchen"]) == 0
    out = capsys.readouterr().out
    assert "req-0" in out and "oven on fire" in out
    assert cli(["--url", url, "dead-letters", "requeue", "kitchen"]) == 0
    captured = capsys.readouterr()
    assert "requeued 1 of 1 dead letter(s) of kitchen" in captured.out
    assert "req-0" in captured.out and "{" not in captured.out
    assert cli(["--url", url, "--json", "stats", "kitchen"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["depth"] == 3
    assert cli(["--url", url, "pending", "front-desk"]) == 0
    assert "waiting-1" in capsys.readouterr().out
    assert cli(["--url", url, "--json", "capabilities"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_failures_exit_non_zero_without_leaking_secrets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    canary = "canary-pw-91c2"
    assert cli(["--url", f"nosuch://user:{canary}@host", "health"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and canary not in err
    assert cli(["--url", "memory://x", "stats", "bad.name"]) == 2
    assert "invalid" in capsys.readouterr().err
    assert cli(["--url", "sqlite:////nonexistent-dir/x.db", "health"]) == 2
    with pytest.raises(SystemExit) as info:
        cli(["no-such-command"])
    assert info.value.code == 2


def test_cli_demo_runs_the_kitchen_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["--url", "memory://cli-demo", "demo"]) == 0
    assert "all 9 orders answered; pending now: 0" in capsys.readouterr().out


async def _dead_letter_a_broken_body(url: str, path: Path) -> None:
    """Another program writes a body that is not UTF-8; a worker's poll
    dead-letters it."""
    import sqlite3

    transport = await connect(url)  # creates the tables
    try:
        with sqlite3.connect(path) as conn:
            conn.execute(
                "INSERT INTO messages(queue, seq, request_id, body, available_at)"
                " VALUES ('agentensemble/kitchen', 1, NULL, ?, 0)",
                (b'{"request_id": "fix-1", "task": "cook", "payload": "caf\xe9"}',),
            )
        conn.close()
        assert await transport.request_queue("kitchen").poll(0.5) is None
    finally:
        await transport.aclose()


def test_cli_replaces_a_repaired_dead_letter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _db(tmp_path)
    asyncio.run(_dead_letter_a_broken_body(url, tmp_path / "cli.db"))
    assert cli(["--url", url, "--json", "dead-letters", "list", "kitchen"]) == 0
    [dead] = json.loads(capsys.readouterr().out)
    assert dead["raw_encoding"] == "base64" and dead["request"] is None
    repaired = tmp_path / "fixed.json"
    repaired.write_text('{"request_id": "fix-1", "task": "cook", "payload": "caf\u00e9"}')
    args = ["--url", url, "dead-letters", "replace", "kitchen"]
    assert cli([*args, "--dead-letter", dead["dead_letter_id"], "--body", str(repaired)]) == 0
    assert "by request fix-1" in capsys.readouterr().out
    assert cli(["--url", url, "--json", "stats", "kitchen"]) == 0
    [stats] = json.loads(capsys.readouterr().out)
    assert (stats["depth"], stats["dead_lettered"]) == (1, 0)
    assert cli([*args, "--dead-letter", dead["dead_letter_id"], "--body", str(repaired)]) == 1
    assert "no dead letter" in capsys.readouterr().err
    assert cli([*args, "--dead-letter", "1"]) == 2  # no --body: invalid input


class _Interrupted(Exception):
    pass


def test_an_interrupted_sync_poll_does_not_go_on_taking_requests(tmp_path: Path) -> None:
    # Ctrl-C (here a signal handler raising) during a sync poll left the poll
    # running on the facade's loop: it took the next request, which nobody
    # received, and it came back after its lease at attempt 2.
    import os
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted

    # SIGUSR1, not SIGALRM: pytest-timeout's alarm stays its own.
    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        with sync.connect(f"sqlite:///{tmp_path / 'i.db'}") as transport:
            queue = transport.request_queue("kitchen")
            timer.start()
            with pytest.raises(_Interrupted):
                queue.poll(timeout=5)
            sent = queue.enqueue(WorkRequest(task="cook"))
            delivery = queue.poll(timeout=5)
            assert delivery is not None and delivery.request.request_id == sent.request_id
            assert delivery.attempt == 1
            assert delivery.ack()
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)


def test_a_sync_transport_closes_twice_and_refuses_calls_after(tmp_path: Path) -> None:
    from transport.errors import ClosedResourceError

    transport = sync.connect(f"sqlite:///{tmp_path / 'c.db'}")
    queue = transport.request_queue("kitchen")
    transport.close()
    transport.close()  # RuntimeError: Event loop is closed, before
    with pytest.raises(ClosedResourceError, match="sync transport is closed"):
        queue.stats()


def test_a_sync_call_inside_a_running_loop_warns_that_it_blocks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transport.sync as sync_module

    monkeypatch.setattr(sync_module, "_warned_running_loop", False)
    with sync.connect(f"sqlite:///{tmp_path / 'w.db'}") as transport:

        async def inside() -> None:
            with pytest.warns(RuntimeWarning, match="blocks that loop"):
                transport.health()

        asyncio.run(inside())
