"""The development broker launchers (``transport.testing.brokers``): loopback
only, stopped by PID, restarted on the same port, failing loudly."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from transport.testing.brokers import (
    BrokerProcess,
    NatsServer,
    PulsarLiteBroker,
    RedisServer,
    TansuBroker,
)

pytestmark = pytest.mark.broker

LAUNCHERS = [NatsServer, TansuBroker, PulsarLiteBroker, RedisServer]


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            if len(address) == 8:
                host = socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
            else:
                words = bytes.fromhex(address)
                raw = b"".join(words[i : i + 4][::-1] for i in range(0, 16, 4))
                host = socket.inet_ntop(socket.AF_INET6, raw)
            found.add((host, int(port, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc")
@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda cls: cls.__name__)
def test_listens_on_loopback_only_and_restarts_on_the_same_port(
    launcher: type[BrokerProcess], tmp_path: Path
) -> None:
    broker = launcher(tmp_path / "broker")
    broker.start()
    try:
        assert broker.process is not None
        first = broker.process.pid
        listening = _listening(first)
        assert ("127.0.0.1", broker.port) in listening
        # Nothing on another address (pulsar-lite's metrics endpoint binds
        # 0.0.0.0:8080 where its defaults enable it: the launcher disables it).
        assert {host for host, _ in listening} == {"127.0.0.1"}, listening
        broker.restart()
        assert broker.process is not None and broker.process.pid != first
        assert ("127.0.0.1", broker.port) in _listening(broker.process.pid)
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)
    finally:
        broker.stop()
    assert broker.process is None and broker.log.stat().st_size >= 0


def _redis(port: int, *command: bytes) -> bytes:
    """One RESP command over a plain socket; the raw reply."""
    request = b"*%d\r\n" % len(command) + b"".join(b"$%d\r\n%s\r\n" % (len(c), c) for c in command)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        return sock.recv(4096)


def test_redis_server_keeps_acknowledged_writes_across_a_kill(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        assert _redis(server.port, b"SET", b"k", b"v") == b"+OK\r\n"
        assert _redis(server.port, b"CONFIG", b"GET", b"appendfsync").endswith(b"always\r\n")
        server.restart()  # SIGKILL: only the fsynced append-only file survives
        assert _redis(server.port, b"GET", b"k") == b"$1\r\nv\r\n"
    finally:
        server.stop()


def test_redis_server_rejects_an_unknown_fsync_policy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        RedisServer(tmp_path / "redis", appendfsync="sometimes")


def test_nats_server_keeps_its_data_across_a_kill(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        server.restart()
        assert server.store.is_dir() and any(server.store.iterdir())
    finally:
        server.stop()


def test_a_relative_root_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``NatsServer(Path("data"))`` (as a third-party backend's test might
    write it): the broker runs in its root and was given a relative config
    path it could not find there."""
    monkeypatch.chdir(tmp_path)
    server = NatsServer(Path("relative") / "nats")
    server.start()
    try:
        assert server.root == tmp_path / "relative" / "nats"
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
    finally:
        server.stop()


def test_a_broker_that_exits_at_start_raises_with_its_log(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "bad", extra_config="this is { not a config")
    with pytest.raises(RuntimeError, match="nats-server exited"):
        server.start()
    assert server.process is None


def test_close_removes_only_a_directory_it_made(tmp_path: Path) -> None:
    given = TansuBroker(tmp_path / "given")
    with given:
        pass
    assert given.root.is_dir()
    made = TansuBroker()
    with made:
        assert made.running
    assert not made.root.exists()


async def test_redis_server_with_a_password_starts_and_takes_it(tmp_path: Path) -> None:
    # Its readiness PING was answered NOAUTH, never PONG: start() timed out
    # although the docstring offers requirepass through extra_config.
    from transport import PermanentTransportError, TransportConfig, connect

    server = RedisServer(tmp_path / "redis", extra_config="requirepass s3cret-pw")
    server.start(timeout=20)
    try:
        with pytest.raises(PermanentTransportError):
            await (await connect(server.url)).health()
        transport = await connect(TransportConfig(url=server.url, password="s3cret-pw"))
        try:
            assert (await transport.health()).ok
        finally:
            await transport.aclose()
    finally:
        server.close()
