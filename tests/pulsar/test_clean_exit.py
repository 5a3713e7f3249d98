"""A process that closes its transport and exits must exit cleanly.

pulsar-client finishes ``close`` on a detached C++ thread that drops the
Python callback after calling it; if the interpreter is already finalizing,
that thread is torn down inside a destructor and the process aborts
("terminate called without an active exception"). ``aclose()`` waits for the
release, so a short-lived program never dies at exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import make_config

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]

PROGRAM = """
import asyncio, os
from transport import WorkRequest, connect

async def main():
    transport = await connect()
    queue = transport.request_queue("exit-check")
    registry = transport.delivery_registry("exit-check")
    await registry.register("r-1")
    await queue.enqueue(WorkRequest(task="t", payload={}))
    delivery = await queue.poll(5)
    assert delivery is not None
    await delivery.ack()
    await transport.aclose()
    print("CLOSED", flush=True)

asyncio.run(main())
"""

RUNS = 8


def test_processes_exit_cleanly_after_aclose(pulsar_url: str) -> None:
    failures = []
    for _ in range(RUNS):
        config = make_config(pulsar_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSPORT_")}
        env.update(
            TRANSPORT_URL=pulsar_url,
            TRANSPORT_NAMESPACE=config.namespace,
            TRANSPORT_OPTIONS=json.dumps(config.options),
        )
        result = subprocess.run(
            [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0 or "CLOSED" not in result.stdout:
            failures.append((result.returncode, result.stderr[-1500:]))
    assert not failures, failures
