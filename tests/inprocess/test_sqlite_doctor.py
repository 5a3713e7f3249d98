"""``doctor`` and ``provision`` on ``sqlite://``: the durability settings of
the store's own connections, read back with PRAGMA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from transport import ProvisionPlan, connect
from transport.cli import main


@pytest.mark.parametrize(
    ("level", "ok", "voided"),
    [
        ("FULL", True, None),
        ("EXTRA", True, None),
        ("NORMAL", False, "power loss"),
        ("OFF", False, "power loss"),  # SQLite: OFF survives a crash of the process
    ],
)
async def test_doctor_flags_a_synchronous_level_below_full(
    tmp_path: Path, level: str, ok: bool, voided: str | None
) -> None:
    transport = await connect(f"sqlite:///{tmp_path / 'q.db'}?synchronous={level}")
    try:
        report = await transport.doctor()
    finally:
        await transport.aclose()
    assert report.ok is ok, report
    errors = [f for f in report.findings if f.severity == "error"]
    if voided is None:
        assert errors == []
        assert any("journal_mode=wal" in f.finding for f in report.findings)
    else:
        [error] = errors
        assert f"synchronous={level}" in error.finding
        assert voided in error.guarantee and "FULL" in error.fix
    assert any("free on its file system" in f.finding for f in report.findings)


async def test_doctor_flags_an_in_memory_database() -> None:
    transport = await connect("sqlite:///:memory:")
    try:
        report = await transport.doctor()
    finally:
        await transport.aclose()
    assert not report.ok
    [error] = [f for f in report.findings if f.severity == "error"]
    assert "memory" in error.finding and "crash" in error.guarantee


def test_cli_doctor_exit_code_and_provision_on_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    safe = f"sqlite:///{tmp_path / 'safe.db'}"
    unsafe = f"sqlite:///{tmp_path / 'unsafe.db'}?synchronous=NORMAL"
    assert main(["--url", safe, "doctor"]) == 0
    assert "no guarantee is void" in capsys.readouterr().out
    assert main(["--url", unsafe, "--json", "doctor"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    # One shared schema: nothing to create per object; every step exists.
    assert main(["--url", safe, "--json", "provision", "--queue", "q:2", "--stream", "s"]) == 0
    steps = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["status"]) for s in steps] == [
        ("q__p0", "exists"),
        ("q__p1", "exists"),
        ("s", "exists"),
    ]


def test_cli_reads_a_plan_file_and_refuses_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'delivery_registries = ["inbox"]\ncapability_registry = true\n[queues]\norders = 2\n',
        encoding="utf-8",
    )
    assert main(["--url", url, "--json", "provision", "--plan", str(plan), "--stream", "s"]) == 0
    assert [(s["kind"], s["name"]) for s in json.loads(capsys.readouterr().out)] == [
        ("queue", "orders__p0"),
        ("queue", "orders__p1"),
        ("delivery_registry", "inbox"),
        ("capability_registry", "capabilities"),
        ("event_stream", "s"),
    ]
    plan.write_text("typo = 1\n", encoding="utf-8")
    assert main(["--url", url, "provision", "--plan", str(plan)]) == 2
    assert "typo" in capsys.readouterr().err
    assert main(["--url", url, "provision", "--plan", str(tmp_path / "none.toml")]) == 2
    assert "cannot read the plan" in capsys.readouterr().err
    plan.write_text("queues = {orders = \n", encoding="utf-8")  # not TOML: the file is named
    assert main(["--url", url, "provision", "--plan", str(plan)]) == 2
    assert f"the plan {str(plan)!r} is not valid TOML" in capsys.readouterr().err
    assert main(["--url", url, "provision", "--queue", "bad name"]) == 2


def test_a_plan_validates_its_names() -> None:
    with pytest.raises(ValueError, match="queue name"):
        ProvisionPlan(queues={"bad name": 1})
    with pytest.raises(ValueError, match="levels"):
        ProvisionPlan(queues={"q": 0})
    assert ProvisionPlan(queues={"q": 2}, capability_registry=True).objects() == [
        ("queue", "q__p0"),
        ("queue", "q__p1"),
        ("capability_registry", "capabilities"),
    ]
