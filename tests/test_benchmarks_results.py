"""``python -m benchmarks --backends X`` replaces only X's rows of
``benchmarks/results.json`` and says which run measured each row."""

from __future__ import annotations

from benchmarks.__main__ import merge


def _run(at: str, rows: list[dict[str, object]]) -> dict[str, object]:
    return {"generated_at": at, "mode": "quick", "rounds": 3, "rows": rows}


def test_a_run_of_one_backend_keeps_the_rows_of_the_others() -> None:
    previous = _run(
        "2026-12-01T00:00:00Z",
        [
            {"backend": "memory", "operation": "enqueue"},
            {"backend": "redis", "operation": "old"},
            {"backend": "kafka", "operation": "enqueue", "measured": {"generated_at": "k"}},
        ],
    )
    run = _run("2026-12-03T05:00:00Z", [{"backend": "redis", "operation": "new"}])
    rows = merge(previous, run, {"redis"})
    assert [(r["backend"], r["operation"]) for r in rows] == [
        ("memory", "enqueue"),
        ("kafka", "enqueue"),
        ("redis", "new"),
    ]
    by_backend = {r["backend"]: r["measured"] for r in rows}
    assert by_backend["redis"]["generated_at"] == "2026-12-03T05:00:00Z"  # type: ignore[index]
    assert by_backend["redis"]["command"] == "python -m benchmarks --backends redis"  # type: ignore[index]
    assert by_backend["memory"]["generated_at"] == "2026-12-01T00:00:00Z"  # type: ignore[index]
    assert by_backend["kafka"] == {"generated_at": "k"}  # its own stamp is kept


def test_a_full_run_replaces_everything() -> None:
    previous = _run("old", [{"backend": "nats", "operation": "x"}])
    every = {"memory", "sqlite", "nats", "kafka", "pulsar", "redis"}
    rows = merge(previous, _run("new", [{"backend": "sqlite", "operation": "y"}]), every)
    assert rows == [
        {
            "backend": "sqlite",
            "operation": "y",
            "measured": {
                "generated_at": "new",
                "mode": "quick",
                "rounds": 3,
                "command": "python -m benchmarks",
            },
        }
    ]
    assert merge(None, _run("new", []), {"redis"}) == []


def test_the_stamp_gives_the_command_that_measured_the_rows() -> None:
    run = {"generated_at": "new", "mode": "full", "rounds": 5, "rows": [{"backend": "nats"}]}
    (row,) = merge(None, run, {"nats", "kafka"})
    assert row["measured"]["command"] == (  # type: ignore[index]
        "python -m benchmarks --full --rounds 5 --backends nats,kafka"
    )
    run = {"generated_at": "new", "mode": "full", "rounds": 3, "rows": [{"backend": "nats"}]}
    (row,) = merge(None, run, {"nats"})
    assert row["measured"]["command"] == "python -m benchmarks --full --backends nats"  # type: ignore[index]
