"""What the interop tests share: a request body written by hand (as another
program would write it from docs/wire.md, without this library's models), the
ensemble that answers it, and the checks of what the foreign reader finds.

Each backend's test (tests/<backend>/test_<backend>_interop.py and
tests/inprocess/test_sqlite_interop.py) writes the request with a client
this library does not use, and reads the completed ``DeliveryRecord`` and
the ensemble's ``Capability`` record back with it.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from transport import Ensemble, ProvisionPlan, TaskContext, Transport

SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"

#: The ensemble (and so its queue) and the delivery registry the foreign
#: caller names in ``reply_to``. The underscore makes Kafka double it.
ENSEMBLE = "kitchen"
TASK = "cook"
REPLY_TO = "foreign_desk"
PLAN = ProvisionPlan(queues={ENSEMBLE: 1}, delivery_registries=[REPLY_TO], capability_registry=True)


def schema_errors(stem: str, body: bytes | str) -> list[str]:
    """Why ``body`` does not validate against docs/schemas/<stem>.schema.json."""
    schema = json.loads((SCHEMAS / f"{stem}.schema.json").read_text(encoding="utf-8"))
    return [e.message for e in Draft202012Validator(schema).iter_errors(json.loads(body))]


def foreign_request_id() -> str:
    """An id the foreign caller chooses (not the library's 32 hex digits)."""
    return f"ext-{uuid.uuid4().hex[:12]}"


def foreign_payload(client: str) -> dict[str, Any]:
    return {"dish": f"soup from {client}", "portions": 3}


def expected_result(payload: dict[str, Any], request_id: str) -> dict[str, Any]:
    """What :func:`kitchen`'s handler computes from a foreign request."""
    return {
        "served": payload["dish"].upper(),
        "portions": payload["portions"] * 2,
        "for": request_id,
        "origin": "foreign",  # the request's own header, read by the handler
    }


def foreign_request(request_id: str, payload: dict[str, Any]) -> bytes:
    """A ``WorkRequest`` as another program writes it by hand: only the
    fields it cares about (docs/wire.md: missing fields take their default),
    keys in its own order, plain ``json.dumps``."""
    return json.dumps(
        {
            "reply_to": REPLY_TO,
            "task": TASK,
            "request_id": request_id,
            "payload": payload,
            "headers": {"origin": "foreign"},
            "schema_version": 1,
        }
    ).encode()


def registration_key(request_id: str) -> str:
    """Where a caller registers ``request_id`` in its delivery registry."""
    return f"p.{request_id}"


def response_key(request_id: str) -> str:
    """Where the response to ``request_id`` is written."""
    return f"c.{request_id}"


def foreign_registration(request_id: str) -> bytes:
    """The ``pending`` ``DeliveryRecord`` a foreign caller writes under
    :func:`registration_key` before it sends the request (docs/wire.md: a
    request nobody registered is not run, its response could not be
    delivered), by hand, with an hour to live."""
    now = datetime.now(UTC)
    return json.dumps(
        {
            "schema_version": 1,
            "request_id": request_id,
            "state": "pending",
            "created_at": now.isoformat(),
            "expires_at": (now + timedelta(hours=1)).isoformat(),
        }
    ).encode()


def kitchen(transport: Transport) -> Ensemble:
    """The ensemble that answers the foreign requests (one level, so its
    queue is the plain queue ``kitchen``)."""
    ensemble = Ensemble(ENSEMBLE, transport=transport, concurrency=1, stats_interval=None)

    @ensemble.task(TASK, description="cooks what a foreign caller asks for")
    async def cook(ctx: TaskContext) -> dict[str, Any]:
        return {
            "served": ctx.payload["dish"].upper(),
            "portions": ctx.payload["portions"] * 2,
            "for": ctx.request_id,
            "origin": ctx.request.headers.get("origin"),
        }

    return ensemble


def check_completed(value: bytes | str, request_id: str, payload: dict[str, Any]) -> None:
    """``value`` (a registry record as the foreign reader found it) is the
    completed record of ``request_id`` holding the handler's result."""
    assert schema_errors("DeliveryRecord", value) == []
    record = json.loads(value)
    assert record["schema_version"] == 1
    assert (record["request_id"], record["state"]) == (request_id, "completed")
    response = record["response"]
    assert schema_errors("WorkResponse", json.dumps(response)) == []
    assert (response["request_id"], response["status"], response["error"]) == (
        request_id,
        "completed",
        None,
    )
    assert response["result"] == expected_result(payload, request_id)


def check_capability(value: bytes | str) -> None:
    """``value`` is the ensemble's advertisement of its task."""
    assert schema_errors("Capability", value) == []
    capability = json.loads(value)
    assert (capability["name"], capability["ensemble"], capability["kind"]) == (
        TASK,
        ENSEMBLE,
        "task",
    )
    assert capability["queue"] == ENSEMBLE
    assert capability["priority_levels"] == 1
