"""The published wire schemas (docs/schemas/, described in docs/wire.md):
they are what the models generate, and what the library writes validates
against them."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from transport import Capability, DeadLetter, WorkRequest, WorkResponse, connect, encode, utcnow
from transport._ops.wireschema import RECORDS, check_schemas, render_schemas, write_schemas
from transport.cli import main
from transport.kit import make_event

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "docs" / "schemas"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _validator(stem: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{stem}.schema.json").read_text(encoding="utf-8"))
    return Draft202012Validator(schema)


def _errors(stem: str, body: bytes | str) -> list[str]:
    instance = json.loads(body)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(record)'}: {e.message}"
        for e in _validator(stem).iter_errors(instance)
    ]


# -- the files are what the models generate --------------------------------------


def test_docs_schemas_match_the_models(tmp_path: Path) -> None:
    write_schemas(tmp_path)
    generated = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.iterdir()}
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in SCHEMAS.glob("*.schema.json")}
    stale = sorted(name for name in generated if on_disk.get(name) != generated[name])
    extra = sorted(set(on_disk) - set(generated))
    assert not stale and not extra, (
        f"docs/schemas/ is out of date: {', '.join(stale)} differ from the models"
        + (f"; {', '.join(extra)} are no longer generated" if extra else "")
        + " - run `make schemas` and commit the result"
    )


def test_one_schema_per_record_and_each_is_valid_json_schema() -> None:
    rendered = render_schemas()
    assert sorted(rendered) == sorted(f"{stem}.schema.json" for stem in RECORDS)
    for name, text in rendered.items():
        assert text.endswith("}\n"), name
        Draft202012Validator.check_schema(json.loads(text))


def test_generation_is_deterministic(tmp_path: Path) -> None:
    assert render_schemas() == render_schemas()
    assert sorted(write_schemas(tmp_path)) == sorted(render_schemas())
    assert write_schemas(tmp_path) == []  # nothing changes the second time
    assert check_schemas(tmp_path) == {}


def test_check_names_a_changed_a_missing_and_a_foreign_file(tmp_path: Path) -> None:
    write_schemas(tmp_path)
    path = tmp_path / "WorkRequest.schema.json"
    path.write_text(path.read_text(encoding="utf-8").replace('"task"', '"job"'), encoding="utf-8")
    (tmp_path / "Capability.schema.json").unlink()
    (tmp_path / "Gone.schema.json").write_text("{}\n", encoding="utf-8")
    problems = check_schemas(tmp_path)
    assert sorted(problems) == [
        "Capability.schema.json",
        "Gone.schema.json",
        "WorkRequest.schema.json",
    ]
    assert problems["Capability.schema.json"] == "missing"
    assert '-    "job"' in problems["WorkRequest.schema.json"]


# -- the CLI ------------------------------------------------------------------------


def test_cli_schema_writes_then_check_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "schemas"
    assert main(["schema", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(render_schemas())
    assert main(["schema", "--out", str(out), "--check"]) == 0
    assert "every schema matches" in capsys.readouterr().out


def test_cli_schema_check_fails_and_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", "--out", str(tmp_path)]) == 0
    path = tmp_path / "DeliveryRecord.schema.json"
    path.write_text(path.read_text(encoding="utf-8") + " ", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert main(["schema", "--out", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{path}: differs from the models" in err
    assert "make schemas" in err
    assert "WorkRequest.schema.json" not in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # --check writes nothing


def test_cli_schema_check_of_a_missing_directory_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Run outside the repository (the default --out is relative), it listed
    # every schema as "differs from the models".
    assert main(["schema", "--out", str(tmp_path / "nowhere"), "--check"]) == 1
    err = capsys.readouterr().err
    assert "is not a directory" in err and "repository root" in err, err
    assert "differs" not in err


# -- what the library writes validates ----------------------------------------------


async def test_records_stored_by_sqlite_validate(tmp_path: Path) -> None:
    """Bodies as the sqlite:// backend stores them (the same encoder every
    backend uses): requests (plain and priority), delivery records in all
    three states, a capability, an event-log event."""
    db = tmp_path / "wire.db"
    async with await connect(f"sqlite:///{db}") as transport:
        queue = transport.request_queue("orders")
        await queue.enqueue(
            WorkRequest(
                task="cook",
                payload={"dish": "soup", "n": [1, 2.5, None, True]},
                reply_to="front-desk",
                deadline=utcnow() + timedelta(minutes=5),
                headers={"traceparent": TRACEPARENT},
                ordering_key="table 7 ✓",
            )
        )
        await queue.enqueue(WorkRequest(task="wash"))
        levels = transport.priority_queue("prio", levels=3)
        await levels.enqueue(WorkRequest(task="cook"), priority=2)
        registry = transport.delivery_registry("front-desk")
        pending = await registry.register("req-1")
        await registry.register("req-2")
        await registry.complete(
            "req-1", WorkResponse(request_id="req-1", result={"ok": 1}, duration_ms=12.5)
        )
        await registry.complete(
            "req-2", WorkResponse(request_id="req-2", status="failed", error="burnt")
        )
        assert (await pending.result(timeout=10)).result == {"ok": 1}
        await transport.capability_registry().advertise(
            Capability(
                name="cook",
                ensemble="kitchen",
                tags=["hot"],
                input_schema={"type": "object"},
                queue="orders",
                priority_levels=3,
            )
        )
        log = transport.event_log()
        await log.append("audit", {"what": "cooked"}, key="k", headers={"traceparent": TRACEPARENT})
        await log.append("audit")
        await registry.aclose()

    conn = sqlite3.connect(db)
    try:
        requests = [row[0] for row in conn.execute("SELECT body FROM messages")]
        changes = conn.execute("SELECT log, key, value FROM kv_changes WHERE value IS NOT NULL")
        records = [(log_, value) for log_, _, value in changes]
        left = conn.execute("SELECT key FROM kv WHERE log LIKE '%/delivery:front-desk'")
        kept = sorted(key for (key,) in left)
        events = [row[0] for row in conn.execute("SELECT body FROM events")]
    finally:
        conn.close()

    assert len(requests) == 3
    for body in requests:
        assert _errors("WorkRequest", body) == []
    deliveries = [v for log_, v in records if log_.endswith("/delivery:front-desk")]
    states = sorted(json.loads(v)["state"] for v in deliveries)
    # Two requests registered and answered; the one collected left nothing.
    assert states == ["completed", "completed", "pending", "pending"]
    assert len(kept) == 2 and kept[0].startswith("c.") and kept[1].startswith("p.")
    for value in deliveries:
        assert _errors("DeliveryRecord", value) == []
    capabilities = [v for log_, v in records if log_.endswith("capability:capabilities")]
    assert len(capabilities) == 1
    assert _errors("Capability", capabilities[0]) == []
    assert len(events) == 2
    for body in events:
        assert _errors("LogEvent", body) == []


def test_dead_letters_and_bus_events_validate() -> None:
    request = WorkRequest(task="cook", payload=[1, "two"], headers={"traceparent": TRACEPARENT})
    decodable = DeadLetter(
        queue="orders",
        request_id=request.request_id,
        request=request,
        error="boom",
        attempts=3,
    )
    raw = DeadLetter(
        queue="orders", request_id=None, request=None, raw="{not json", error="x", attempts=1
    )
    assert _errors("DeadLetter", encode(decodable)) == []
    assert _errors("DeadLetter", encode(raw)) == []
    event = make_event("agent.events.kitchen", {"n": 1}, {"traceparent": TRACEPARENT}, "_INBOX.x")
    assert _errors("Event", encode(event)) == []
    assert _errors("Event", encode(make_event("a.b", None, None))) == []


@pytest.mark.parametrize(
    ("stem", "record", "why"),
    [
        ("WorkRequest", {"task": "a.b"}, "task"),
        ("WorkRequest", {"task": "cook", "priority": 256}, "priority"),
        ("WorkRequest", {"task": "cook", "headers": {"bad name": "v"}}, "headers"),
        ("DeliveryRecord", {"request_id": "r", "state": "done"}, "state"),
        ("WorkResponse", {"request_id": "r/1"}, "request_id"),
        ("Capability", {"name": "cook", "ensemble": "a__b"}, "ensemble"),
        ("KafkaDeliveryRound", {"ds": [[1, 2, 3]]}, "ds/0"),
    ],
)
def test_schemas_refuse_what_the_library_refuses(
    stem: str, record: dict[str, Any], why: str
) -> None:
    # Complete the record from a valid one, so the only fault is the one named.
    base = {
        "WorkRequest": json.loads(encode(WorkRequest(task="cook"))),
        "WorkResponse": json.loads(encode(WorkResponse(request_id="r"))),
        "DeliveryRecord": {
            "schema_version": 1,
            "response": None,
            "created_at": "2026-01-01T00:00:00Z",
            "expires_at": "2026-01-02T00:00:00Z",
        },
        "Capability": json.loads(encode(Capability(name="cook", ensemble="kitchen"))),
        "KafkaDeliveryRound": {},
    }[stem]
    errors = _errors(stem, json.dumps({**base, **record}))
    assert errors and all(e.startswith(why) for e in errors), errors


# -- records backends keep for themselves ------------------------------------------


def test_kafka_state_values_validate_and_read_back() -> None:
    pytest.importorskip("confluent_kafka")
    from transport_kafka import _records as kafka_records

    assert _errors("KafkaSettledMarker", kafka_records._SETTLED) == []

    class Rec:
        def __init__(self, key: bytes, value: bytes) -> None:
            self.key, self.value = key, value

    count = b'{"d":%d}' % 2  # the withdrawal write (transport_kafka._counts)
    rounds = json.dumps({"ds": [[5, 1], [6, 3]]}, separators=(",", ":")).encode()
    assert _errors("KafkaDeliveryCount", count) == []
    assert _errors("KafkaDeliveryRound", rounds) == []
    markers, individual, _ = kafka_records._replay_markers(
        [Rec(b"0:4", count), Rec(b"0:r5-6.ab1", rounds), Rec(b"0:7", kafka_records._SETTLED)],
        {0},
        {},
    )
    assert markers == {(0, 4): {"d": 2}, (0, 5): {"d": 1}, (0, 6): {"d": 3}, (0, 7): {"s": 1}}
    assert individual == {(0, 4), (0, 7)}


def test_pulsar_handout_count_validates_and_reads_back() -> None:
    pytest.importorskip("pulsar")
    from transport_pulsar import _queue as pulsar_queue

    queue = pulsar_queue.PulsarRequestQueue.__new__(pulsar_queue.PulsarRequestQueue)
    queue._token = b"0a1b2c3d4e5f"
    value = queue._count_value(3)
    assert _errors("PulsarHandoutCount", value) == []
    assert pulsar_queue._parse_count(value) == 3
    assert pulsar_queue._parse_count(b'{"n":2}') == 2  # written by an earlier release


def test_nats_log_record_is_what_the_backend_writes() -> None:
    pytest.importorskip("nats")
    from transport._ops.wireschema import NatsLogRecord
    from transport_nats import _events as nats_events

    def fields(model: type[Any]) -> Any:
        schema = model.model_json_schema(mode="serialization")
        return schema["properties"], schema.get("required")

    assert fields(nats_events._Record) == fields(NatsLogRecord)
    body = encode(nats_events._Record(data={"x": 1}, key="k", headers={"a": "b"}))
    assert _errors("NatsLogRecord", body) == []
