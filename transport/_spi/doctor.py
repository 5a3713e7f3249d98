"""Provisioning and checking a deployment: what a config needs on the
broker (:class:`ProvisionPlan`), what exists (:class:`ProvisionStep`), and
what the live deployment voids of the library's guarantees
(:class:`DoctorFinding`).

``Transport.provision(plan)`` creates, idempotently, every broker object
the plan names; ``Transport.missing(plan)`` only looks (read-only commands
use it so that they never create anything); ``Transport.doctor(plan)``
checks the broker's and the objects' settings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from transport._spi.models import library_error
from transport._spi.naming import validate_name

__all__ = [
    "DoctorFinding",
    "DoctorReport",
    "ObjectKind",
    "ProvisionPlan",
    "ProvisionStatus",
    "ProvisionStep",
    "Severity",
]

#: What a plan names: a queue (with its priority levels), a delivery
#: registry, the capability registry, an event-log stream.
ObjectKind = Literal["queue", "delivery_registry", "capability_registry", "event_stream"]

#: ``error``: a guarantee is void (``doctor`` exits 1); ``warning``: a
#: guarantee is weaker than it could be, or could not be checked; ``ok``:
#: checked and fine.
Severity = Literal["ok", "warning", "error"]


#: ``exists``: every broker object exists. ``missing``: some do not (dry
#: run, read-only look). ``created``: the missing ones were created.
#: ``unknown`` / ``ensured``: the backend cannot look without creating
#: (dry run / real run that created what was missing, idempotently).
ProvisionStatus = Literal["exists", "missing", "created", "unknown", "ensured"]


class ProvisionPlan(BaseModel):
    """What a deployment uses. ``queues`` maps a queue name to its number of
    priority levels (1 = a plain queue; ``n`` > 1 = the levels
    ``name__p0`` … ``name__p{n-1}``, each with its dead letters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queues: dict[str, int] = Field(default_factory=dict)
    delivery_registries: list[str] = Field(default_factory=list)
    capability_registry: bool = False
    event_streams: list[str] = Field(default_factory=list)

    def __init__(self, /, **data: Any) -> None:
        # The library's errors (InvalidNameError for an unsafe name), not
        # pydantic's multi-line ValidationError.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise library_error(exc, "provision plan") from exc

    @field_validator("queues")
    @classmethod
    def _check_queues(cls, value: dict[str, int]) -> dict[str, int]:
        for name, levels in value.items():
            validate_name(name, "queue name")
            if levels < 1:
                raise ValueError(f"queue {name!r}: levels must be at least 1")
        return value

    @field_validator("delivery_registries")
    @classmethod
    def _check_registries(cls, value: list[str]) -> list[str]:
        for name in value:
            validate_name(name, "delivery registry name")
        return value

    @field_validator("event_streams")
    @classmethod
    def _check_streams(cls, value: list[str]) -> list[str]:
        for name in value:
            validate_name(name, "stream name")
        return value

    def objects(self) -> list[tuple[ObjectKind, str]]:
        """Every object, priority levels expanded to their queues."""
        out: list[tuple[ObjectKind, str]] = []
        for name, levels in self.queues.items():
            if levels == 1:
                out.append(("queue", name))
            else:
                out += [("queue", f"{name}__p{level}") for level in range(levels)]
        out += [("delivery_registry", name) for name in self.delivery_registries]
        if self.capability_registry:
            out.append(("capability_registry", "capabilities"))
        out += [("event_stream", name) for name in self.event_streams]
        return out


class ProvisionStep(BaseModel):
    """One object of a plan and its broker objects (topics, streams,
    buckets), with its :data:`ProvisionStatus`. ``missing_objects`` lists
    what was (or is) missing."""

    model_config = ConfigDict(frozen=True)

    kind: ObjectKind
    name: str
    broker_objects: list[str]
    missing_objects: list[str] = Field(default_factory=list)
    status: ProvisionStatus


class DoctorFinding(BaseModel):
    """One check of the live deployment. ``guarantee`` names what the
    library promises and this setting voids (or weakens); ``fix`` says what
    to change."""

    model_config = ConfigDict(frozen=True)

    severity: Severity
    subject: str
    finding: str
    fix: str = ""
    guarantee: str = ""


class DoctorReport(BaseModel):
    """Every finding of one ``doctor`` run. ``ok`` is false when a guarantee
    is void (a finding of severity ``error``)."""

    model_config = ConfigDict(frozen=True)

    backend: str
    findings: list[DoctorFinding]

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)
