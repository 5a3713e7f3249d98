"""Client-library log lines: capped at INFO, repeats collapsed, and nothing
on stderr while the application has not configured logging."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transport import connect
from transport._ops.logging import ClientLog


def test_repeated_lines_are_collapsed_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="transport.test.client")
    client = ClientLog("test", window=0.2)
    for attempt in range(50):
        client.log(logging.ERROR, "Connect to 127.0.0.1:%d failed (after %dms)", 1, attempt)
    client.log(logging.ERROR, "another problem")
    records = [r for r in caplog.records if r.name == "transport.test.client"]
    assert [r.getMessage() for r in records] == [
        "Connect to 127.0.0.1:1 failed (after 0ms)",
        "another problem",
    ]
    assert all(r.levelno == logging.INFO for r in records), "client lines are capped at INFO"
    time.sleep(0.25)  # the collapse window itself is what is under test
    client.log(logging.ERROR, "Connect to 127.0.0.1:1 failed (after 9ms)")
    last = [r for r in caplog.records if r.name == "transport.test.client"][-1]
    assert last.getMessage() == (
        "Connect to 127.0.0.1:1 failed (after 9ms) (and 49 more like it since it was last logged)"
    )


def test_debug_lines_stay_debug_and_disabled_levels_cost_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="transport.test2.client")
    client = ClientLog("test2")
    client.log("DEBUG", "a debug line")  # pulsar-client passes level names
    client.log("INFO", "an info line")
    assert [r.getMessage() for r in caplog.records if r.name == "transport.test2.client"] == [
        "an info line"
    ]


def test_library_warnings_are_silent_without_logging_configuration() -> None:
    code = (
        "import logging, transport\n"
        "logging.getLogger('transport.kafka').warning('must not reach stderr')\n"
        "logging.getLogger('transport').error('nor this')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"printed on stderr without logging configured: {result.stderr!r}"


async def test_verify_on_an_embedded_backend(tmp_path: Path) -> None:
    transport = await connect(f"sqlite:///{tmp_path / 'x.db'}", verify=True)
    try:
        await transport.verify(["persistent"])
        assert transport.operation_timeout <= 30
    finally:
        await transport.aclose()


def test_the_last_problem_is_kept_for_the_error_of_a_timed_out_operation() -> None:
    """Even with logging not configured (the line is not emitted), the last
    warning-or-worse line is kept, so a timeout can name its cause."""
    client = ClientLog("problem")
    assert client.last_problem(within=60) is None
    client.log(logging.ERROR, "Connect to 127.0.0.1:%d failed: Connection refused", 1)
    client.log(logging.INFO, "a routine line")  # not a problem: does not replace it
    assert client.last_problem(within=60) == "Connect to 127.0.0.1:1 failed: Connection refused"
    client._problem = (time.monotonic() - 120, "old")  # a line from two minutes ago
    assert client.last_problem(within=60) is None


def test_an_outage_is_logged_at_its_start_every_interval_and_at_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from transport.kit import OutageLog

    caplog.set_level(logging.DEBUG, logger="transport.test.outage")
    now = [100.0]
    outage = OutageLog(
        logging.getLogger("transport.test.outage"),
        "worker: poll",
        interval=30,
        clock=lambda: now[0],
    )
    outage.recovered()  # nothing was failing: says nothing
    assert outage.failing_for is None
    for _ in range(70):  # one failure a second for 70 s
        outage.failed(ConnectionError("refused"), "retrying", queue="q")
        now[0] += 1.0
    assert outage.failures == 70 and outage.failing_for == 70.0
    outage.recovered()
    assert outage.failures == 0 and outage.failing_for is None
    records = [r for r in caplog.records if r.name == "transport.test.outage"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warnings == [
        "worker: poll failed (refused); retrying",
        "worker: poll still failing after 30 s and 31 tries (refused); retrying",
        "worker: poll still failing after 60 s and 61 tries (refused); retrying",
        "worker: poll works again after 70.0 s (70 failed tries)",
    ]
    assert sum(r.levelno == logging.DEBUG for r in records) == 67
    assert all(getattr(r, "queue", None) == "q" for r in records if r.levelno == logging.DEBUG)
    outage.failed(ConnectionError("again"))  # a new outage starts its own clock
    assert caplog.records[-1].getMessage() == "worker: poll failed (again); retrying"
