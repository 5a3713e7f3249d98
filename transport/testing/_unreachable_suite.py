"""Conformance scenario: a broker that is not there fails fast and quietly.

For every backend that talks to a broker. Nothing listens on the address
used (a loopback port just found free), a real fault, not a mock. Each check
runs in a fresh interpreter that has not configured logging, as a user's
program would be, so that anything a client library prints on stderr is
seen. The first operation of each kind (and ``connect(..., verify=True)``)
must raise ``TransientTransportError`` within the backend's operation
timeout, and the process must print nothing on stderr; the CLI must exit
non-zero with one line.

A backend's test file subclasses :class:`UnreachableBrokerConformance` and
sets three class attributes (no broker fixture is needed)::

    class TestKafkaUnreachable(UnreachableBrokerConformance):
        transport_class = KafkaTransport
        url_template = "kafka://127.0.0.1:{port}"
        timeout_option = "operation_timeout_s"
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any, ClassVar

import pytest

from transport import TransportConfig
from transport._spi.transport import DEFAULT_OPERATION_TIMEOUT, Transport

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]

#: The operation timeout the scenarios set (seconds).
SHORT_TIMEOUT = 2.0
#: Allowed on top of it: interpreter scheduling on a loaded machine.
SLACK = 3.0


def closed_port() -> int:
    """A loopback port nothing listens on (found free, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _first_operation(config: dict[str, Any], op: str) -> dict[str, Any]:
    from transport import WorkRequest, connect

    started = time.monotonic()
    bound: float | None = None
    try:
        transport = await connect(TransportConfig(**config), verify=op == "verify")
        bound = transport.operation_timeout
        try:
            if op == "enqueue":
                await transport.request_queue("kitchen").enqueue(WorkRequest(task="cook"))
            elif op == "registry":
                await transport.capability_registry().all()
            elif op == "pending":  # a caller's first look at its delivery registry
                await transport.delivery_registry("front-desk").pending()
            elif op == "event_log" and transport.capabilities.event_log:
                await transport.event_log().append("orders", {"n": 1})
        finally:
            await transport.aclose()
    except Exception as exc:
        return {
            "op": op,
            "error": type(exc).__name__,
            "message": str(exc),
            "elapsed": time.monotonic() - started,
            "bound": bound,
        }
    return {"op": op, "error": None, "elapsed": time.monotonic() - started, "bound": bound}


def probe_main() -> None:
    """Child process: run each first operation on a transport of its own,
    concurrently, and print the outcomes as one JSON line."""
    config, ops = json.loads(sys.argv[1])

    async def run() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_first_operation(config, op) for op in ops)))

    print(json.dumps(asyncio.run(run())))


class UnreachableBrokerConformance:
    """First operations against an address where no broker listens."""

    transport_class: ClassVar[type[Transport]]
    #: The backend's URL with ``{port}`` for the port.
    url_template: ClassVar[str]
    #: The option that sets the backend's operation timeout.
    timeout_option: ClassVar[str]

    def config(self, timeout: float | None = None) -> TransportConfig:
        options = {} if timeout is None else {self.timeout_option: timeout}
        return TransportConfig(url=self.url_template.format(port=closed_port()), options=options)

    async def operation_timeout(self, config: TransportConfig) -> float:
        transport = self.transport_class(config)
        try:
            return transport.operation_timeout
        finally:
            await transport.aclose()

    async def test_documented_default_operation_timeout_is_at_most_30_s(self) -> None:
        default = await self.operation_timeout(self.config())
        assert 0 < default <= DEFAULT_OPERATION_TIMEOUT, (
            f"the default operation timeout is {default} s, over {DEFAULT_OPERATION_TIMEOUT} s"
        )
        short = await self.operation_timeout(self.config(SHORT_TIMEOUT))
        assert short < default, f"{self.timeout_option}={SHORT_TIMEOUT} did not lower the bound"

    async def test_first_operations_fail_fast_and_quietly(self) -> None:
        config = self.config(SHORT_TIMEOUT).model_dump(mode="json", exclude_none=True)
        ops = ["enqueue", "registry", "pending", "event_log", "verify"]
        code = "from transport.testing._unreachable_suite import probe_main; probe_main()"
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", code, json.dumps([config, ops])],
            capture_output=True,
            text=True,
            timeout=90,
            env={k: v for k, v in os.environ.items() if not k.startswith("TRANSPORT_")},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr == "", f"printed on stderr:\n{result.stderr[-3000:]}"
        outcomes = json.loads(result.stdout.strip().splitlines()[-1])
        bound = await self.operation_timeout(TransportConfig(**config))
        for outcome in outcomes:
            op = outcome["op"]
            assert outcome["error"] == "TransientTransportError", (
                f"{op}: expected TransientTransportError, got {outcome}"
            )
            assert outcome["elapsed"] <= bound + SLACK, (
                f"{op} failed after {outcome['elapsed']:.1f} s, over the operation timeout "
                f"of {bound:g} s (+{SLACK:g} s slack): {outcome['message']}"
            )
            address = str(config["url"]).split("://", 1)[1].split("?")[0].split("/")[0]
            assert address in outcome["message"], (
                f"{op}: the error does not name the broker it could not reach ({address}): "
                f"{outcome['message']}"
            )

    async def test_cli_against_a_down_broker_exits_nonzero_with_one_line(self) -> None:
        config = self.config(SHORT_TIMEOUT)
        bound = await self.operation_timeout(config)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSPORT_")}
        env["TRANSPORT_OPTIONS"] = json.dumps(config.options)
        cli = [sys.executable, "-m", "transport.cli", "--url", config.url]

        def run(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
            started = time.monotonic()
            done = subprocess.run(
                [*cli, *args], capture_output=True, text=True, timeout=90, env=env
            )
            return done, time.monotonic() - started

        # Interpreter start-up counts in a command's time: measured here, on
        # this machine under its present load, by a command that needs no broker.
        version, startup = await asyncio.to_thread(run, "--version")
        assert version.returncode == 0, version.stderr[-3000:]
        (stats, stats_s), (health, health_s) = await asyncio.gather(
            asyncio.to_thread(run, "stats", "kitchen"), asyncio.to_thread(run, "health")
        )
        for name, done, elapsed in (("stats", stats, stats_s), ("health", health, health_s)):
            lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
            assert done.returncode != 0, f"{name} exited 0 against a down broker: {lines}"
            # Two commands start at once (twice the start-up), plus the backend's import.
            limit = bound + SLACK + 3 * startup + 2.0
            assert elapsed <= limit, (
                f"{name} took {elapsed:.1f} s (limit {limit:.1f} s, start-up {startup:.1f} s): "
                f"{lines}"
            )
            assert len(done.stderr.strip().splitlines()) <= 1, (
                f"{name} printed more than one line on stderr:\n{done.stderr[-3000:]}"
            )
        assert len(stats.stderr.strip().splitlines()) == 1, (
            f"stats should explain the failure in one line on stderr, got {stats.stderr!r}"
        )
