"""Provisioning, read-only commands and ``doctor`` on real nats-servers:
one started safely (``sync_interval: always``) and one with JetStream's
default two-minute fsync. Streams are read back with raw nats-py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from transport import WorkRequest, connect
from transport.cli import main
from transport.testing.brokers import NatsServer, free_port


def _server(root: Path, *, sync_always: bool) -> Iterator[tuple[NatsServer, str]]:
    monitor = free_port()
    server = NatsServer(root, extra_config=f"http: 127.0.0.1:{monitor}", sync_always=sync_always)
    server.start()
    try:
        yield server, f"http://127.0.0.1:{monitor}"
    finally:
        server.stop()


@pytest.fixture
def safe_server(tmp_path: Path) -> Iterator[tuple[NatsServer, str]]:
    yield from _server(tmp_path / "safe", sync_always=True)


@pytest.fixture
def unsafe_server(tmp_path: Path) -> Iterator[tuple[NatsServer, str]]:
    yield from _server(tmp_path / "unsafe", sync_always=False)


def _use(monkeypatch: pytest.MonkeyPatch, server: NatsServer, monitor: str | None) -> None:
    monkeypatch.setenv("TRANSPORT_URL", server.url)
    monkeypatch.setenv("TRANSPORT_NAMESPACE", "prod")
    options = {"stream_max_age": {"short": 3600.0}}
    if monitor is not None:
        options["monitor_url"] = monitor  # type: ignore[assignment]
    monkeypatch.setenv("TRANSPORT_OPTIONS", json.dumps(options))


async def _streams(url: str) -> dict[str, object]:
    nc = await nats.connect(url)
    try:
        return {s.config.name: s.config for s in await nc.jetstream().streams_info()}
    finally:
        await nc.close()


_PLAN = [
    "--queue",
    "orders:2",
    "--registry",
    "inbox",
    "--capabilities",
    "--stream",
    "audit",
    "--stream",
    "short",
]
_WANTED = {
    "prod__orders__p0",
    "prod__orders__p0__dlq",
    "prod__orders__p1",
    "prod__orders__p1__dlq",
    "KV_prod__delivery__inbox",
    "KV_prod__capability__capabilities",
    "prod__log__audit",
    "prod__log__short",
}


def _value(x: object) -> object:
    return getattr(x, "value", x)


async def _run(argv: list[str]) -> int:
    # main() runs its own event loop: keep it off this test's loop.
    import asyncio

    return await asyncio.to_thread(main, argv)


async def test_read_only_commands_leave_an_empty_server_empty_and_provision_creates_idempotently(
    safe_server: tuple[NatsServer, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, monitor = safe_server
    _use(monkeypatch, server, monitor)
    for argv, what in [
        (["stats", "typo"], "queue 'typo' does not exist"),
        (["dead-letters", "list", "typo", "--levels", "2"], "queue 'typo__p0' does not exist"),
        (["pending", "inbox"], "delivery registry 'inbox' does not exist"),
        (["capabilities"], "capability registry 'capabilities' does not exist"),
    ]:
        assert await _run(argv) == 1, argv
        assert what in capsys.readouterr().err, argv
    # top: a typo'd queue or registry is shown as missing, not created
    # (it created both streams and the registry's bucket).
    top = ["--json", "top", "typo", "--registry", "inbox", "--count", "1"]
    assert await _run([*top, "--interval", "0.1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["missing"] == ["queue 'typo'", "delivery registry 'inbox'"], shown
    assert shown["queues"] == [] and shown["registries"] == []
    assert await _run(["--json", "top", "--count", "1"]) == 0  # advertised queues: none
    assert json.loads(capsys.readouterr().out)["queues"] == []
    assert await _run(["health"]) == 0
    capsys.readouterr()
    assert await _run(["--json", "provision", "--dry-run", *_PLAN]) == 0
    steps = json.loads(capsys.readouterr().out)
    assert {s["status"] for s in steps} == {"missing"}
    assert {o for s in steps for o in s["broker_objects"]} == _WANTED
    assert await _streams(server.url) == {}, "a read-only command or a dry run created streams"

    assert await _run(["--json", "provision", *_PLAN]) == 0
    assert {s["status"] for s in json.loads(capsys.readouterr().out)} == {"created"}
    assert await _run(["--json", "provision", *_PLAN]) == 0
    assert {s["status"] for s in json.loads(capsys.readouterr().out)} == {"exists"}

    # A priority queue whose ensemble does not run (nothing advertises its
    # levels), just provisioned with `--queue orders:2`: no plain queue of
    # that name exists, its levels do, so the read commands read those (they
    # said it did not exist and that provisioning would create it).
    for argv in (["stats", "orders"], ["dead-letters", "list", "orders"]):
        assert await _run(["--json", *argv]) == 0, argv
        out = capsys.readouterr()
        shown = json.loads(out.out)
        if argv[0] == "stats":
            [stats] = shown
            assert (stats["queue"], stats["depth"], stats["dead_lettered"]) == ("orders", 0, 0)
        else:
            assert shown == [], shown
        assert "read 'orders' as a priority queue of 2 levels" in out.err, out.err
    async with await connect() as transport:
        orders = transport.priority_queue("orders", levels=2)
        await orders.enqueue(WorkRequest(task="t"), priority=1)
        await orders.aclose()
    assert await _run(["--json", "stats", "orders"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["depth"] == 1
    assert await _run(["--json", "stats", "orders", "--levels", "2"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["depth"] == 1
    # A name with neither: still reported as missing.
    assert await _run(["stats", "orderz"]) == 1
    assert "queue 'orderz' does not exist" in capsys.readouterr().err

    streams = await _streams(server.url)
    assert set(streams) == _WANTED
    for name, config in streams.items():
        assert _value(config.storage) == "file", name  # type: ignore[attr-defined]
        wanted_age = 3600.0 if name == "prod__log__short" else 0
        assert (config.max_age or 0) == wanted_age, (name, config.max_age)  # type: ignore[attr-defined]
        assert (config.max_msgs or -1) == -1 and (config.max_bytes or -1) == -1, name  # type: ignore[attr-defined]
    assert _value(streams["prod__orders__p0"].retention) == "workqueue"  # type: ignore[attr-defined]
    nc = await nats.connect(server.url)
    try:
        consumer = await nc.jetstream().consumer_info("prod__orders__p0", "workers")
        assert consumer.config.durable_name == "workers"
    finally:
        await nc.close()

    assert await _run(["--json", "doctor", *_PLAN]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    sync = [f for f in report["findings"] if "sync_interval" in f["finding"]]
    assert [f["severity"] for f in sync] == ["ok"], sync

    # One stream of the queue gone: a dry run names what it would create,
    # not every stream of the queue (it listed those that exist too).
    nc = await nats.connect(server.url)
    try:
        await nc.jetstream().delete_stream("prod__orders__p1__dlq")
    finally:
        await nc.close()
    assert await _run(["provision", "--dry-run", "--queue", "orders:2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (line,) = [x for x in lines if "queue orders__p1" in x]
    assert line.split()[2:] == ["would", "create", "prod__orders__p1__dlq"], line


async def test_doctor_flags_a_server_with_the_default_fsync_interval(
    unsafe_server: tuple[NatsServer, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, monitor = unsafe_server
    _use(monkeypatch, server, monitor)
    assert await _run(["--json", "doctor"]) == 1
    report = json.loads(capsys.readouterr().out)
    [finding] = [f for f in report["findings"] if f["severity"] == "error"]
    assert "fsyncs every 120 s" in finding["finding"], finding
    assert "sync_interval: always" in finding["fix"]
    assert finding["guarantee"]


async def test_doctor_without_monitor_url_says_sync_interval_was_not_checked(
    unsafe_server: tuple[NatsServer, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, _ = unsafe_server
    _use(monkeypatch, server, None)
    assert await _run(["--json", "doctor"]) == 0
    report = json.loads(capsys.readouterr().out)
    [finding] = [f for f in report["findings"] if "sync_interval" in f["finding"]]
    assert finding["severity"] == "warning" and "not checked" in finding["finding"]


@pytest.mark.parametrize("wrong", ["closed port", "client port"])
async def test_doctor_with_an_unreachable_monitor_url_names_it_and_checks_the_rest(
    safe_server: tuple[NatsServer, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    wrong: str,
) -> None:
    # The broker is fine and the monitoring URL is wrong: doctor said it
    # "could not check the deployment", every guarantee void, and named
    # neither the option nor the URL. The client port (a common mistake)
    # answers with INFO, not HTTP.
    server, _ = safe_server
    port = free_port() if wrong == "closed port" else server.port
    _use(monkeypatch, server, f"http://127.0.0.1:{port}")
    assert await _run(["--json", "doctor", "--queue", "orders"]) == 1
    report = json.loads(capsys.readouterr().out)
    [error] = [f for f in report["findings"] if f["severity"] == "error"]
    assert "monitor_url='http://127.0.0.1:" in error["finding"], error
    assert "sync_interval not checked" in error["finding"]
    assert "could not check the deployment" not in json.dumps(report)
    # The rest was still checked (here: the queue's stream does not exist yet).
    assert any("stream does not exist" in f["finding"] for f in report["findings"]), report
