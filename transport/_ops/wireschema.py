"""JSON Schemas of every JSON record the library writes, generated from the
models (``transport schema``, ``make schemas``; described in docs/wire.md).

The schemas are generated in pydantic's *serialization* mode, the mode that
describes what a reader finds on the wire: every field is listed as required,
because the library always writes every field (``null`` where unset). A
program writing records for the library may leave out fields that have a
default (docs/wire.md lists what is accepted); the validation rules the
models enforce beyond types (name and id patterns) are carried as
``pattern`` / ``propertyNames`` keywords.

Records a backend keeps for itself (delivery counts, log records without
position) are described by the small models below, which mirror what the
backend writes; tests compare them with the backend's own code.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from transport._spi.events import Event, LogEvent
from transport._spi.models import Capability, DeadLetter, WorkRequest, WorkResponse, _WireModel
from transport._spi.registries import DeliveryRecord

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "RECORDS",
    "KafkaDeliveryCount",
    "KafkaDeliveryRound",
    "KafkaSettledMarker",
    "NatsLogRecord",
    "PulsarHandoutCount",
    "check_schemas",
    "render_schemas",
    "write_schemas",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _BackendRecord(BaseModel):
    # Unknown fields are ignored by the readers, as in every record.
    model_config = ConfigDict(extra="ignore", frozen=True)


class KafkaDeliveryCount(_BackendRecord):
    """Value of a ``"<partition>:<offset>"`` key of a Kafka queue's state topic
    ``NS.Q.state``: deliveries of that request record so far."""

    d: int = Field(ge=0, description="deliveries of the record so far")


class KafkaSettledMarker(_BackendRecord):
    """Value of a ``"<partition>:<offset>"`` key of ``NS.Q.state``: the record
    is settled (acked, nacked-and-copied or dead-lettered) though no commit
    covers it yet. Written as exactly ``{"s":1}``."""

    s: int = Field(ge=1, le=1, description="always 1")


class KafkaDeliveryRound(_BackendRecord):
    """Value of a ``"<partition>:r<low>-<high>.<id>"`` key of ``NS.Q.state``:
    the delivery counts of several records of one partition, written in one
    round. ``ds`` holds ``[offset, deliveries]`` pairs."""

    ds: list[tuple[int, int]] = Field(description="[offset, deliveries] pairs")


class PulsarHandoutCount(_BackendRecord):
    """Value of a Pulsar queue's ``<queue>__attempts`` keyed topic (key: the
    request message's id): how often the message was handed to a poll."""

    n: int = Field(ge=0, description="hand-outs of the message so far")
    by: str | None = Field(
        default=None,
        description="an opaque token of the queue handle that wrote the count",
    )
    set: int | None = Field(
        default=None,
        description="1: the count is set to n (a count withdrawn or lowered); "
        "absent: n is a hand-out claimed, and readers keep the larger of it and "
        "the count they hold",
    )


class NatsLogRecord(_WireModel):
    """Body of a NATS event-log message (stream ``<ns>__log__<stream>``): the
    stream name, position (stream sequence) and ``appended_at`` (the
    server's timestamp) are the message's, not the body's. A wire model like
    the records of the SPI: it carries ``schema_version``."""

    data: Any = None
    key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


#: File stem -> model, for every JSON record on the wire. Order is the order
#: of docs/wire.md.
RECORDS: dict[str, type[BaseModel]] = {
    "WorkRequest": WorkRequest,
    "WorkResponse": WorkResponse,
    "DeliveryRecord": DeliveryRecord,
    "Capability": Capability,
    "DeadLetter": DeadLetter,
    "Event": Event,
    "LogEvent": LogEvent,
    "NatsLogRecord": NatsLogRecord,
    "KafkaDeliveryCount": KafkaDeliveryCount,
    "KafkaSettledMarker": KafkaSettledMarker,
    "KafkaDeliveryRound": KafkaDeliveryRound,
    "PulsarHandoutCount": PulsarHandoutCount,
}


class _WireSchema(GenerateJsonSchema):
    """Serialization-mode schemas in which every field is required: the
    library's encoder writes every field, defaults included."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        if self.mode == "serialization":
            return True
        return super().field_is_required(field, total)


def _schema(stem: str, model: type[BaseModel]) -> dict[str, Any]:
    # A backend's own records are written by hand, optional fields left out:
    # what a reader accepts (validation mode) is their contract.
    mode: Literal["validation", "serialization"] = (
        "validation" if issubclass(model, _BackendRecord) else "serialization"
    )
    schema = model.model_json_schema(mode=mode, schema_generator=_WireSchema)
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": f"{stem}.schema.json", **schema}


def render_schemas() -> dict[str, str]:
    """File name -> file text of every schema: JSON with sorted keys, two-space
    indent and a trailing newline, so the output is byte-for-byte stable."""
    return {
        f"{stem}.schema.json": json.dumps(
            _schema(stem, model), indent=2, sort_keys=True, ensure_ascii=False
        )
        + "\n"
        for stem, model in RECORDS.items()
    }


def write_schemas(out: Path) -> list[str]:
    """Write every schema into ``out`` (created if missing); returns the
    names of the files whose content changed.

    Raises: OSError.
    """
    out.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, text in render_schemas().items():
        path = out / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(name)
    return changed


def check_schemas(out: Path) -> dict[str, str]:
    """Compare ``out`` with the schemas the models generate. Returns file
    name -> what differs (a unified diff, "missing" or "not generated by
    the models") for every file that does not match; empty if all match.

    Raises: OSError (other than a missing file).
    """
    expected = render_schemas()
    problems: dict[str, str] = {}
    for name, text in expected.items():
        path = out / name
        if not path.exists():
            problems[name] = "missing"
            continue
        found = path.read_text(encoding="utf-8")
        if found != text:
            diff = difflib.unified_diff(
                found.splitlines(keepends=True),
                text.splitlines(keepends=True),
                f"{name} (on disk)",
                f"{name} (from the models)",
            )
            problems[name] = "".join(diff)
    if out.is_dir():
        for path in sorted(out.glob("*.schema.json")):
            if path.name not in expected:
                problems[path.name] = "not generated by the models (a record that was removed?)"
    return problems
