"""The CLI behaves like the tools people know (kubectl, nats, kcat): global
options anywhere, --version, help for every argument, id prefixes, JSON
whatever happens, and a live ``top`` view."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transport import Capability, TransportConfig, WorkRequest, connect
from transport.cli import _GIVES_UP, _noticed, _Output, _parser, _still_waiting
from transport.cli import main as cli


def _db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


async def _seed(url: str, ids: list[str]) -> None:
    """Dead-letter a request of each id on queue ``kitchen``; one pending
    request in registry ``front-desk``."""
    async with await connect(url) as transport:
        queue = transport.request_queue("kitchen", max_attempts=1)
        for request_id in ids:
            await queue.enqueue(WorkRequest(request_id=request_id, task="cook"))
            delivery = await queue.poll(5)
            assert delivery is not None
            await delivery.dead_letter("oven on fire")
        await queue.enqueue(WorkRequest(request_id="waiting-a", task="cook"))
        await transport.delivery_registry("front-desk").register("pending-1")
        await queue.aclose()


def test_global_options_are_accepted_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _db(tmp_path)
    asyncio.run(_seed(url, ["5f1c77aa"]))
    assert cli(["dead-letters", "list", "kitchen", "--json", "--url", url]) == 0
    [dead] = json.loads(capsys.readouterr().out)
    assert dead["request_id"] == "5f1c77aa"
    # Before the command still works, and is not reset by the subcommand.
    assert cli(["--json", "--url", url, "stats", "kitchen"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["dead_lettered"] == 1


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("transport 0.")


def _actions(parser: argparse.ArgumentParser, path: str = "transport"):  # type: ignore[no-untyped-def]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _actions(child, f"{path} {name}")
        else:
            yield path, action


def test_every_argument_has_help() -> None:
    missing = [
        f"{path} {action.dest}"
        for path, action in _actions(_parser())
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", "kitchen", "--levels", "0"],
        ["dead-letters", "list", "kitchen", "--levels", "-1"],
        ["dead-letters", "list", "kitchen", "--limit", "0"],
        ["top", "--interval", "0"],
    ],
)
def test_non_positive_numbers_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli(argv)
    assert info.value.code == 2


def test_requeue_by_unique_id_prefix_prints_what_it_requeued(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _db(tmp_path)
    asyncio.run(_seed(url, ["5f1c77aa", "5f1d0000", "9abc1234"]))
    # Ambiguous: invalid input, nothing moved.
    assert cli(["--url", url, "dead-letters", "requeue", "kitchen", "--id", "5f1"]) == 2
    assert "matches 2 dead letters" in capsys.readouterr().err
    # Nothing matches: a failure, said so.
    assert cli(["--url", url, "dead-letters", "requeue", "kitchen", "--id", "zz"]) == 1
    assert "no dead letter of kitchen has an id starting with 'zz'" in capsys.readouterr().err
    assert cli(["--url", url, "dead-letters", "requeue", "kitchen", "--id", "5f1c"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("requeued 1 of 1 dead letter(s) of kitchen\n"), out
    assert "5f1c77aa" in out and "cook" in out and "5f1d0000" not in out
    assert cli(["--url", url, "--json", "dead-letters", "requeue", "kitchen", "--id", "9ab"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "queue": "kitchen",
        "requeued": 1,
        "of": 1,
        "request_ids": ["9abc1234"],
    }
    assert cli(["--url", url, "--json", "dead-letters", "list", "kitchen"]) == 0
    assert [d["request_id"] for d in json.loads(capsys.readouterr().out)] == ["5f1d0000"]


def test_requeue_of_a_request_dead_lettered_twice_moves_both_and_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One request enqueued twice (an at-least-once enqueue retried) and
    # dead-lettered twice: both went back, and the command said "requeued 2
    # of 1" and exited 1, so scripts retried a requeue that had worked.
    url = _db(tmp_path)
    asyncio.run(_seed(url, ["twice-1", "twice-1"]))
    assert cli(["--url", url, "dead-letters", "requeue", "kitchen", "--id", "twice"]) == 0
    assert capsys.readouterr().out.startswith("requeued 2 of 2 dead letter(s) of kitchen\n")
    assert cli(["--url", url, "--json", "stats", "kitchen"]) == 0
    [stats] = json.loads(capsys.readouterr().out)
    assert (stats["depth"], stats["dead_lettered"]) == (3, 0)  # with "waiting-a"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nobody listens


@pytest.mark.parametrize("scheme", ["nats", "kafka", "pulsar"])
def test_json_health_of_a_stopped_broker_is_json(
    scheme: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{scheme}://127.0.0.1:{_closed_port()}"
    assert cli(["health", "--json", "--url", url, "--timeout", "3"]) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["ok"] is False and status["backend"] == scheme
    assert status["detail"], "the reason is missing"


def test_a_command_on_a_broker_that_is_down_says_it_is_still_waiting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Kafka client retries a broker that is down until its operation
    timeout (30 s by default), and `transport stats` said nothing for that
    long. After a short while it says it is still waiting, until when and how
    to give up sooner (never showing the password); then the error."""
    monkeypatch.setattr("transport.cli._SLOW_NOTICE_S", 0.5)
    url = f"kafka://ops:hunter2@127.0.0.1:{_closed_port()}?operation_timeout_s=3"
    assert cli(["stats", "orders", "--url", url]) == 1
    err = capsys.readouterr().err
    assert "hunter2" not in err
    notice = err.index("transport: still waiting for kafka://ops:***@127.0.0.1:")
    assert "reported when its operation_timeout_s of 3 s runs out" in err, err
    assert notice < err.index("transport: error:"), err


def test_health_has_its_own_limit_and_no_still_waiting_notice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Kafka's health check gives up after min(5 s, operation_timeout_s):
    # the notice would name a limit that is not the one health waits for.
    monkeypatch.setattr("transport.cli._SLOW_NOTICE_S", 0.2)
    url = f"kafka://127.0.0.1:{_closed_port()}?operation_timeout_s=1"
    assert cli(["health", "--url", url]) == 1
    captured = capsys.readouterr()
    assert "NO" in captured.out
    assert "after 0.2 s" not in captured.err, captured.err  # no notice


async def test_no_still_waiting_notice_after_the_answer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Closing the client after the answer can take seconds (Kafka flushes
    and joins its threads): the notice is for a command without its answer,
    not for one that printed it."""
    monkeypatch.setattr("transport.cli._SLOW_NOTICE_S", 0.2)
    out = _Output(as_json=False)

    async def answer_then_close_slowly() -> int:
        out.emit("the answer")
        await asyncio.sleep(0.5)  # the client's close
        return 0

    assert (
        await _noticed(TransportConfig(url="kafka://127.0.0.1:1"), out, answer_then_close_slowly())
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out == "the answer\n"
    assert "still waiting" not in captured.err, captured.err


def test_the_still_waiting_notice_names_each_backends_own_timeout() -> None:
    from transport_kafka._config import KafkaOptions
    from transport_pulsar._config import PulsarOptions

    for scheme, model in (("kafka", KafkaOptions), ("pulsar", PulsarOptions)):
        option, default = _GIVES_UP[scheme]
        assert model.model_fields[option].default == default
        for url in (f"{scheme}://127.0.0.1:1", f"{scheme.upper()}://127.0.0.1:1"):
            said = _still_waiting(TransportConfig(url=url))
            assert f"its {option} of {default:g} s (the default)" in said, said
            assert f"?{option}=5 in the URL" in said, said
    said = _still_waiting(TransportConfig(url="pulsar+ssl://127.0.0.1:1"))
    assert "operation_timeout_seconds of 30 s" in said, said
    said = _still_waiting(TransportConfig(url="nats://127.0.0.1:1"))
    assert "reported when the backend gives up" in said, said


def test_capabilities_without_a_queue_show_a_dash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _db(tmp_path)

    async def advertise() -> None:
        async with await connect(url) as transport:
            await transport.capability_registry().advertise(
                Capability(name="search", kind="tool", ensemble="library"), lease=60
            )

    asyncio.run(advertise())
    assert cli(["--url", url, "capabilities"]) == 0
    out = capsys.readouterr().out
    assert "search" in out and "None" not in out


async def _seed_priority_kitchen(url: str, *, burnt: bool, advertised: bool) -> None:
    """A 3-level queue "kitchen" holding one request at level 2; with
    ``burnt``, request "burnt-1" dead-lettered from level 0; with
    ``advertised``, a live advertisement of its levels."""
    async with await connect(url) as transport:
        queue = transport.priority_queue("kitchen", levels=3)
        await queue.enqueue(WorkRequest(task="cook"), priority=2)
        if burnt:
            await queue.enqueue(WorkRequest(request_id="burnt-1", task="cook"), priority=0)
            delivery = await queue.poll(5)
            assert delivery is not None and delivery.request.request_id == "burnt-1"
            await delivery.dead_letter("oven on fire")
        await queue.aclose()
        if advertised:
            await transport.capability_registry().advertise(
                Capability(name="cook", ensemble="kitchen", queue="kitchen", priority_levels=3),
                lease=60,
            )


def test_stats_and_dead_letters_of_a_priority_queue_use_its_advertised_levels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without --levels they read the plain queue of that name: zeros and
    # "(none)" for a 3-level queue holding work (and "does not exist" on a
    # broker).
    url = _db(tmp_path)
    asyncio.run(_seed_priority_kitchen(url, burnt=True, advertised=True))
    assert cli(["--json", "--url", url, "stats", "kitchen"]) == 0
    [stats] = json.loads(capsys.readouterr().out)
    assert (stats["depth"], stats["dead_lettered"]) == (1, 1)
    assert cli(["--json", "--url", url, "dead-letters", "list", "kitchen"]) == 0
    assert [d["request_id"] for d in json.loads(capsys.readouterr().out)] == ["burnt-1"]
    # --levels still wins: the plain queue of that name is empty; fewer
    # levels than advertised are read, and the difference is said.
    assert cli(["--json", "--url", url, "stats", "kitchen", "--levels", "1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["depth"] == 0
    assert "queue 'kitchen' is advertised with 3 levels; --levels 1 reads 1 of them" in (
        captured.err
    )


def test_a_priority_queue_nobody_advertises_reads_empty_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its ensemble not running, nothing gives the levels: the plain queue of
    # that name read zeros and "(none)", exit 0, and nothing said why.
    url = _db(tmp_path)
    asyncio.run(_seed_priority_kitchen(url, burnt=False, advertised=False))
    hint = "'kitchen' read as a plain queue, but its priority levels hold requests"
    assert cli(["--url", url, "stats", "kitchen"]) == 0
    assert hint in capsys.readouterr().err
    assert cli(["--url", url, "dead-letters", "list", "kitchen"]) == 0
    assert hint in capsys.readouterr().err
    assert cli(["--json", "--url", url, "stats", "kitchen", "--levels", "3"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["depth"] == 1 and captured.err == ""
    # A plain queue that is empty gets no note.
    assert cli(["--url", url, "stats", "pantry"]) == 0
    assert capsys.readouterr().err == ""


def test_the_demo_lists_no_test_harness_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["--url", _db(tmp_path), "demo"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("capabilities:"))
    assert "persistent" in line and "restart_broker" not in line


# -- transport top -----------------------------------------------------------


@pytest.mark.parametrize("scheme", ["memory", "sqlite"])
async def test_top_renders_queues_and_registries(scheme: str, tmp_path: Path) -> None:
    from rich.console import Console

    from transport._ops.top import TopCollector, render

    url = "memory://top-render" if scheme == "memory" else _db(tmp_path)
    async with await connect(url) as transport:
        await transport.capability_registry().advertise(
            Capability(name="cook", ensemble="kitchen", queue="kitchen", priority_levels=1)
        )
        queue = transport.request_queue("kitchen", max_attempts=1)
        for i in range(3):
            await queue.enqueue(WorkRequest(request_id=f"r{i}", task="cook"))
        leased = await queue.poll(5)
        assert leased is not None
        await transport.delivery_registry("front-desk").register("p1")
        await transport.delivery_registry("front-desk").register("p2")
        collector = TopCollector(transport, [], ["front-desk"])  # queues from the registry
        try:
            first = await collector.snapshot()
            for i in range(3, 7):
                await queue.enqueue(WorkRequest(request_id=f"r{i}", task="cook"))
            second = await collector.snapshot()
        finally:
            await collector.aclose()
        await leased.dead_letter("burnt")
        await queue.aclose()
    assert first.error is None and first.queues[0].depth == 2
    assert second.queues[0].depth_rate is not None and second.queues[0].depth_rate > 0
    console = Console(record=True, width=120, color_system=None)
    console.print(render(second))
    text = console.export_text()
    assert text.startswith("transport top — ") and f" UTC — {scheme}:" in text.splitlines()[0]
    (row,) = [line for line in text.splitlines() if "│ kitchen" in line]
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[:6] == ["kitchen", "1", "6", "1", "0", "0"], cells
    assert cells[6].startswith("+"), cells
    assert second.queues[0].head_age_seconds is not None  # r1 waits (r0 is leased)
    assert cells[7].endswith("s"), cells
    (reg,) = [line for line in text.splitlines() if "│ front-desk" in line]
    assert [c.strip() for c in reg.strip("│ ").split("│")] == ["front-desk", "2", "0"]


def test_top_refreshes_and_stops_after_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _db(tmp_path)
    asyncio.run(_seed(url, ["d1"]))
    argv = ["top", "kitchen", "--registry", "front-desk", "--interval", "0.1", "--count", "3"]
    assert cli([*argv, "--json", "--url", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    last = json.loads(lines[-1])
    assert last["queues"][0]["depth"] == 1 and last["queues"][0]["dead_lettered"] == 1
    assert last["registries"] == [{"registry": "front-desk", "pending": 1, "completed": 0}]


def test_top_of_a_stopped_broker_shows_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"nats://127.0.0.1:{_closed_port()}"
    # connect itself fails: the usual error line, exit 1 (like health without --json).
    assert cli(["top", "--url", url, "--count", "1"]) == 1
    assert "transport: error:" in capsys.readouterr().err


def test_top_in_a_real_terminal(tmp_path: Path) -> None:
    """Run `transport top` in tmux and read the screen, as a user sees it."""
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed")
    url = _db(tmp_path)
    asyncio.run(_seed(url, ["d1"]))
    base = [tmux, "-S", str(tmp_path / "tmux.sock")]
    command = f"{sys.executable} -m transport.cli --url {url} top kitchen --interval 0.2"
    subprocess.run(
        [*base, "new-session", "-d", "-s", "top", "-x", "120", "-y", "30", command],
        check=True,
        timeout=10,
    )
    try:
        screen = ""
        deadline = time.monotonic() + 20
        while "│ kitchen" not in screen:  # no event to wait for: poll the screen
            assert time.monotonic() < deadline, f"no frame within 20 s:\n{screen}"
            time.sleep(0.1)
            screen = subprocess.run(
                [*base, "capture-pane", "-p", "-t", "top"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        assert "transport top — " in screen and " UTC — sqlite:" in screen, screen
        (row,) = [line for line in screen.splitlines() if "│ kitchen" in line]
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells[:6] == ["kitchen", "1", "1", "0", "0", "1"], screen
    finally:
        subprocess.run([*base, "kill-server"], timeout=10, check=False)


async def test_top_keeps_running_and_shows_the_error_when_the_backend_goes_away() -> None:
    from rich.console import Console

    from transport._ops.top import TopCollector, render

    transport = await connect("memory://top-gone")
    collector = TopCollector(transport, ["kitchen"], [])
    assert (await collector.snapshot()).error is None
    await transport.aclose()  # the connection is gone under the running view
    snapshot = await collector.snapshot()
    assert snapshot.error is not None and "ClosedResourceError" in snapshot.error
    console = Console(record=True, width=120, color_system=None)
    console.print(render(snapshot))
    assert "backend unreachable: ClosedResourceError" in console.export_text()


def test_top_shows_lag_by_partition_only_where_a_backend_reports_it() -> None:
    from datetime import UTC, datetime

    from rich.console import Console

    from transport._ops.top import QueueRow, Snapshot, render

    def text(rows: list[QueueRow]) -> str:
        console = Console(record=True, width=160, color_system=None)
        console.print(render(Snapshot(datetime.now(UTC), "kafka", rows)))
        return console.export_text()

    kafka = QueueRow("orders", 1, 15, 2, 0, 0, None, 3.0, {"0": 12, "1": 0, "2": 3})
    shown = text([kafka])
    assert "LAG BY PARTITION" in shown and "0:12 1:0 2:3" in shown
    plain = QueueRow("orders", 1, 15, 2, 0, 0, None, 3.0)
    assert "LAG BY PARTITION" not in text([plain])
    many = QueueRow("orders", 1, 45, 0, 0, 0, None, None, {str(p): p for p in range(10)})
    assert "9:9 8:8" in text([many]) and "+2" in text([many])


def test_a_value_the_backend_cannot_tell_is_shown_as_a_question_mark() -> None:
    # stats printed "None" (NATS delayed, Pulsar depth) where top shows "?".
    from transport.cli import _table

    text = _table([{"queue": "q", "depth": None, "delayed": 0}], ["queue", "depth", "delayed"])
    assert text.splitlines()[1].split() == ["q", "?", "0"]


def test_provision_names_the_flag_of_levels_that_are_not_a_number(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # It said "invalid literal for int() with base 10: 'abc'".
    assert cli(["--url", "memory://", "provision", "--queue", "kitchen:abc"]) == 2
    assert "--queue 'kitchen:abc': the levels after ':' must be a number" in (
        capsys.readouterr().err
    )


def test_top_into_a_pipe_shows_whole_queue_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Not a terminal: rich assumed 80 columns and cut names ("customer…").
    url = _db(tmp_path)
    name = "customer-support-escalations-of-the-night-shift"

    async def seed() -> None:
        async with await connect(url) as transport:
            queue = transport.request_queue(name)
            await queue.enqueue(WorkRequest(task="cook"))
            await queue.aclose()

    asyncio.run(seed())
    assert cli(["--url", url, "top", name, "--count", "1"]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if name in line]
    assert row.split("│")[3].strip() == "1", row  # its depth, in the same line


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """``transport ... | head -1``: the reader goes away while the command
    writes. It printed a traceback (BrokenPipeError) and exited 1; it stops
    quietly with the shell's code for SIGPIPE."""
    url = f"sqlite:///{tmp_path / 'pipe.db'}"

    async def fill() -> None:
        transport = await connect(url)
        try:
            queue = transport.request_queue("big")
            await queue.enqueue_many([WorkRequest(task="t", payload=i) for i in range(300)])
            for delivery in await queue.poll_many(300, 5):
                await delivery.dead_letter("x" * 100)
        finally:
            await transport.aclose()

    asyncio.run(fill())
    code = (
        "import sys; from transport.cli import main; "
        f"sys.exit(main(['--url', {url!r}, 'dead-letters', 'list', 'big', '--limit', '1000']))"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # the reader is gone before the output comes
        stderr = process.stderr.read().decode()
        assert process.wait(60) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_python_dash_m_transport_runs_the_command(tmp_path: Path) -> None:
    # Where the console script is not on PATH (a venv not activated).
    url = f"sqlite:///{tmp_path}/x.db"
    done = subprocess.run(
        [sys.executable, "-m", "transport", "--url", url, "--json", "health"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "usage: transport"
        in subprocess.run(
            [sys.executable, "-m", "transport", "stats"], capture_output=True, text=True, timeout=60
        ).stderr
    )
