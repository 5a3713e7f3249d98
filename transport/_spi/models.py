"""Wire models. JSON on the wire only (never pickle); unknown fields are
ignored so that older readers accept records from newer writers."""

from __future__ import annotations

import base64
import contextlib
import copy
import difflib
import hashlib
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from transport._spi.jsonvalue import json_value_problem
from transport._spi.naming import (
    HEADER_NAME_PATTERN,
    NAME_PATTERN,
    REQUEST_ID_PATTERN,
    validate_header,
    validate_name,
    validate_ordering_key,
    validate_request_id,
)
from transport.errors import InvalidMessageError, TransportError

__all__ = [
    "Capability",
    "CapabilityChange",
    "DeadLetter",
    "HealthStatus",
    "QueueStats",
    "WorkRequest",
    "WorkResponse",
    "utcnow",
]


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        # A naive timestamp is taken as UTC: the wire format is always UTC.
        return value.replace(tzinfo=UTC)
    return value


_M = TypeVar("_M", bound=BaseModel)


_setattr = object.__setattr__
_FIELD_NAMES: dict[type[BaseModel], frozenset[str]] = {}


def replace_fields(model: _M, **changes: Any) -> _M:
    """``model.model_copy(update=changes)`` (shallow, unvalidated, known
    fields only) without pydantic's generic copy machinery, which costs more
    than encoding a request: backends stamp ``enqueued_at``/``attempt`` on
    every message."""
    cls = type(model)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(cls.__pydantic_fields__)
    if model.__pydantic_private__ is not None or not names.issuperset(changes):
        return model.model_copy(update=changes)
    new = object.__new__(cls)
    values = model.__dict__.copy()
    values.update(changes)
    extra = model.__pydantic_extra__
    _setattr(new, "__dict__", values)
    _setattr(new, "__pydantic_extra__", None if extra is None else extra.copy())
    _setattr(new, "__pydantic_fields_set__", model.__pydantic_fields_set__.union(changes))
    _setattr(new, "__pydantic_private__", None)
    return new


def _new_request_id() -> str:
    # uuid.uuid4().hex without building a UUID object (its __init__ is most
    # of the cost of a new request): the same random bits, version and variant.
    value = int.from_bytes(os.urandom(16))
    value = (value & _UUID4_CLEAR) | _UUID4_SET
    return f"{value:032x}"


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (4 << 76) | (0x8000 << 48)


def derived_request_id(*identity: object) -> str:
    """The request id of a message that carries none (written by another
    program), derived from the broker's identity of the message (topic,
    partition and offset; stream and sequence; message id; row id): the same
    on every delivery of that message, so a redelivery is recognised as the
    same request. 32 hex digits, like a generated id."""
    text = "\x1f".join(str(part) for part in identity)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@contextlib.contextmanager
def _library_errors(what: str) -> Iterator[None]:
    """pydantic's ValidationError as :func:`library_error` makes it."""
    try:
        yield
    except ValidationError as exc:
        raise library_error(exc, what) from exc


def library_error(exc: ValidationError, what: str) -> TransportError:
    """The library's own error for a failed validation of ``what``: the
    :class:`TransportError` a validator raised (``InvalidNameError`` …), else
    an :class:`InvalidMessageError` with one readable line."""
    errors = exc.errors()
    for error in errors:
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, TransportError):
            return cause
    first = errors[0] if errors else None
    if first is None:
        return InvalidMessageError(f"invalid {what}: {exc}")
    field = ".".join(str(part) for part in first["loc"]) or what
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first.get("type") == "missing":
        # Its "input" is the whole set of arguments, payload included.
        return InvalidMessageError(f"invalid {what}: field {field} is required{more}")
    shown = repr(first.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if not first["loc"]:  # the whole input (not JSON, not an object)
        return InvalidMessageError(f"invalid {what} {shown}: {first['msg']}{more}")
    return InvalidMessageError(f"invalid {what} field {field}={shown}: {first['msg']}{more}")


# JSON Schema keywords for the rules the validators enforce (docs/schemas/);
# schema only: validation stays with the validators and their errors.
NAME_SCHEMA: dict[str, Any] = {"pattern": NAME_PATTERN}
REQUEST_ID_SCHEMA: dict[str, Any] = {"pattern": REQUEST_ID_PATTERN}
HEADERS_SCHEMA: dict[str, Any] = {"propertyNames": {"pattern": HEADER_NAME_PATTERN}}


def check_json_value(value: Any, info: ValidationInfo) -> Any:
    """Field validator body: refuse what JSON would not carry as sent.
    Skipped when parsing JSON, which can only hold JSON values."""
    if info.mode == "json":
        return value
    problem = json_value_problem(value, info.field_name or "value")
    if problem is not None:
        raise InvalidMessageError(problem)
    return value


#: The major version of the wire format this library writes (every record's
#: ``schema_version``). Additions an older reader can ignore (a new optional
#: field) keep it; anything else raises it. A reader accepts records of this
#: version and earlier (a record without the field is version 1, as another
#: program may write it) and refuses later ones, so a request from a newer
#: writer is dead-lettered with a reason instead of being half understood.
WIRE_SCHEMA_VERSION = 1


class _WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, ser_json_timedelta="float")

    schema_version: int = Field(
        default=WIRE_SCHEMA_VERSION,
        ge=1,
        description="Major version of the wire format the record was written in.",
    )

    @field_validator("schema_version")
    @classmethod
    def _check_schema_version(cls, value: int) -> int:
        if value > WIRE_SCHEMA_VERSION:
            raise InvalidMessageError(
                f"written in wire schema version {value}; this reader understands version "
                f"{WIRE_SCHEMA_VERSION} and earlier (upgrade it to read such records)"
            )
        return value

    def __init__(self, /, **data: Any) -> None:
        # Direct construction only (decoding ignores unknown fields: records
        # of a newer writer): a misspelt argument was dropped without a word
        # (WorkRequest(task=..., reply_too=...) never got its response).
        fields = type(self).model_fields
        unknown = [name for name in data if name not in fields]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, list(fields), n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword argument(s) {', '.join(hints)}"
            )
        # Validators raise the library's errors (InvalidNameError …); pydantic
        # wraps them in its ValidationError. Give the caller the documented one.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise library_error(exc, type(self).__name__) from exc

    # pydantic's own parsing classmethods raise the library's errors too (the
    # README: never pydantic's ValidationError): an InvalidMessageError, or
    # the TransportError a validator raised. ``decode`` maps its own.
    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        with _library_errors(cls.__name__):
            return super().model_validate(obj, *args, **kwargs)

    @classmethod
    def model_validate_json(
        cls, json_data: str | bytes | bytearray, *args: Any, **kwargs: Any
    ) -> Self:
        with _library_errors(cls.__name__):
            return super().model_validate_json(json_data, *args, **kwargs)

    @classmethod
    def model_validate_strings(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        with _library_errors(cls.__name__):
            return super().model_validate_strings(obj, *args, **kwargs)

    # Pydantic calls a model's own ``__init__`` from ``model_validate_json``
    # too, which would validate every decoded message twice (JSON, then the
    # Python values again: 4x the cost of one pass). Marked as a base
    # ``__init__``, it runs only for direct construction; ``decode`` maps
    # validation errors itself.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


class WorkRequest(_WireModel):
    """A unit of work sent to an ensemble's queue.

    ``request_id`` is generated by the caller, unique, and doubles as the
    idempotency key. ``enqueued_at`` is stamped once, at the first enqueue, and
    kept across redelivery and priority promotion (aging is computed from it).
    ``attempt`` is filled in by the backend on delivery (1 = first delivery).
    ``ordering_key`` optionally groups requests that must stay in order.
    """

    request_id: str = Field(default_factory=_new_request_id, json_schema_extra=REQUEST_ID_SCHEMA)
    task: str = Field(json_schema_extra=NAME_SCHEMA)
    payload: Any = None
    reply_to: str | None = Field(default=None, json_schema_extra=NAME_SCHEMA)
    priority: int = Field(default=0, ge=0, le=255)
    enqueued_at: datetime | None = None
    deadline: datetime | None = None
    headers: dict[str, str] = Field(default_factory=dict, json_schema_extra=HEADERS_SCHEMA)
    attempt: int = Field(default=1, ge=1)
    ordering_key: str | None = None
    """Requests with the same ordering key go to the same partition (Kafka) /
    key (Pulsar Key_Shared), so they are delivered in order relative to each
    other on backends that preserve order. 1-256 characters, no control
    characters; unset, the request id is the message key (requests spread
    over partitions). It orders deliveries, not completions: concurrent
    handlers may still work on two requests of one key at once, and a nacked
    request goes to the back of its partition."""

    @field_validator("request_id")
    @classmethod
    def _check_request_id(cls, value: str) -> str:
        return validate_request_id(value)

    @field_validator("payload")
    @classmethod
    def _check_payload(cls, value: Any, info: ValidationInfo) -> Any:
        return check_json_value(value, info)

    @field_validator("ordering_key")
    @classmethod
    def _check_ordering_key(cls, value: str | None) -> str | None:
        return None if value is None else validate_ordering_key(value)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """As pydantic's, but a copy with ``update`` is validated like a new
        request: pydantic does not validate updates, so a bad task name, a
        set payload (sent as a list) or a header with a newline reached the
        broker. (The library's own copies use :func:`replace_fields`.)

        Raises: InvalidNameError, InvalidMessageError."""
        copy = super().model_copy(update=update, deep=deep)
        if not update:
            return copy
        checked = type(copy)(**{name: getattr(copy, name) for name in type(copy).model_fields})
        object.__setattr__(checked, "__pydantic_fields_set__", set(copy.model_fields_set))
        return checked

    def __init__(self, /, **data: Any) -> None:
        # The common construction -- a task and a payload, maybe a reply_to
        # and a request id, all of the exact types -- is checked here by the
        # same validators without pydantic's generic pass (more than half of
        # the cost of a new request); anything else takes the full path,
        # whose result and errors these match (tests/test_models_fast.py).
        # Not for a subclass, whose own fields and validators would be skipped.
        if type(self) is WorkRequest and data.keys() <= _FAST_FIELDS:
            task = data.get("task")
            reply_to = data.get("reply_to")
            request_id = data.get("request_id")
            if (
                task.__class__ is str
                and (reply_to is None or reply_to.__class__ is str)
                and ("request_id" not in data or request_id.__class__ is str)
            ):
                payload = data.get("payload")
                # In pydantic's field order: the first error is the one raised.
                if request_id is None:
                    request_id = _new_request_id()
                else:
                    validate_request_id(request_id)
                validate_name(task, "task name")
                if payload is not None:
                    problem = json_value_problem(payload, "payload")
                    if problem is not None:
                        raise InvalidMessageError(problem)
                if reply_to is not None:
                    validate_name(reply_to, "reply_to registry name")
                _setattr(
                    self,
                    "__dict__",
                    {
                        "schema_version": WIRE_SCHEMA_VERSION,
                        "request_id": request_id,
                        "task": task,
                        "payload": payload,
                        "reply_to": reply_to,
                        "priority": 0,
                        "enqueued_at": None,
                        "deadline": None,
                        "headers": {},
                        "attempt": 1,
                        "ordering_key": None,
                    },
                )
                _setattr(self, "__pydantic_extra__", None)
                _setattr(self, "__pydantic_fields_set__", set(data))
                _setattr(self, "__pydantic_private__", None)
                return
        super().__init__(**data)

    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @property
    def message_key(self) -> str:
        """The broker message key: ``ordering_key`` if set, else ``request_id``."""
        return self.ordering_key if self.ordering_key is not None else self.request_id

    @field_validator("task")
    @classmethod
    def _check_task(cls, value: str) -> str:
        return validate_name(value, "task name")

    @field_validator("reply_to")
    @classmethod
    def _check_reply_to(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "reply_to registry name")

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            validate_header(key, item)
        return value

    @field_validator("enqueued_at", "deadline")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _aware(value)


#: The arguments :meth:`WorkRequest.__init__` can check without pydantic.
_FAST_FIELDS = frozenset({"task", "payload", "reply_to", "request_id"})


def _natively_checked(model: type[BaseModel], patterns: dict[str, str]) -> type[BaseModel]:
    """``model``'s fields (the same annotations, defaults and bounds, so the
    same JSON is accepted and coerced alike) with no Python validator, and
    the ``patterns`` pydantic checks natively: the decoding fast path of
    :func:`fast_work_request`. Built from ``model`` so that a field added
    there is never dropped here."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation: Any = info.annotation
        pattern = patterns.get(name)
        if pattern is not None:
            checked = Annotated[str, StringConstraints(pattern=pattern)]
            annotation = checked | None if annotation == (str | None) else checked
        fields[name] = (annotation, copy.copy(info))
    fields["schema_version"] = (
        Annotated[int, Field(ge=1, le=WIRE_SCHEMA_VERSION)],
        WIRE_SCHEMA_VERSION,
    )
    config = ConfigDict(extra="ignore", frozen=True)
    fast: type[BaseModel] = create_model(f"_{model.__name__}Fields", __config__=config, **fields)
    return fast


_NAME_NATIVE = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$"  # NAME_PATTERN without the "__" look-ahead
_WorkRequestFields = _natively_checked(
    WorkRequest,
    {"request_id": r"^[A-Za-z0-9_-]{1,128}$", "task": _NAME_NATIVE, "reply_to": _NAME_NATIVE},
)

_fast_validate_json = _WorkRequestFields.__pydantic_validator__.validate_json


def fast_work_request(data: bytes | str) -> WorkRequest | None:
    """``WorkRequest.model_validate_json(data)`` for the common body -- one
    with a request id, no headers, no ordering key, timestamps with a zone --
    validated by pydantic alone (about 40 % less work per delivery than with
    the Python validators); ``None`` for anything else, which the caller
    decodes the full way (the same result, or the full way's error). The
    checks no pattern expresses (no ``__`` in a name) are made here."""
    try:
        fields = _fast_validate_json(data)
    except (ValidationError, ValueError, TypeError):
        return None
    values = fields.__dict__
    if (
        "__" in values["task"]
        or values["headers"]
        or values["ordering_key"] is not None
        or "request_id" not in fields.__pydantic_fields_set__
    ):
        return None
    reply_to = values["reply_to"]
    if reply_to is not None and "__" in reply_to:
        return None
    enqueued_at = values["enqueued_at"]
    if enqueued_at is not None and enqueued_at.tzinfo is None:
        return None
    deadline = values["deadline"]
    if deadline is not None and deadline.tzinfo is None:
        return None
    request = object.__new__(WorkRequest)
    _setattr(request, "__dict__", values)
    _setattr(request, "__pydantic_extra__", None)
    _setattr(request, "__pydantic_fields_set__", fields.__pydantic_fields_set__)
    _setattr(request, "__pydantic_private__", None)
    return request


class WorkResponse(_WireModel):
    """The answer to a :class:`WorkRequest`, routed back through a delivery registry."""

    request_id: str = Field(json_schema_extra=REQUEST_ID_SCHEMA)
    status: Literal["completed", "failed", "rejected"] = "completed"
    result: Any = None
    error: str | None = None
    completed_at: datetime = Field(default_factory=utcnow)
    duration_ms: float | None = None

    @field_validator("request_id")
    @classmethod
    def _check_request_id(cls, value: str) -> str:
        return validate_request_id(value)

    @field_validator("result")
    @classmethod
    def _check_result(cls, value: Any, info: ValidationInfo) -> Any:
        return check_json_value(value, info)

    @field_validator("completed_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return _aware(value) or value


class Capability(_WireModel):
    """A task or tool an ensemble offers. ``expires_at`` is its liveness lease."""

    name: str = Field(json_schema_extra=NAME_SCHEMA)
    kind: Literal["task", "tool"] = "task"
    ensemble: str = Field(json_schema_extra=NAME_SCHEMA)
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    input_schema: dict[str, Any] | None = None
    queue: str | None = Field(default=None, json_schema_extra=NAME_SCHEMA)
    priority_levels: int = Field(
        default=1, ge=1, le=16, description="levels of the queue (1: plain)"
    )
    expires_at: datetime | None = None
    instance: str | None = Field(
        default=None,
        max_length=128,
        description=(
            "the running ensemble (one id per replica and run) that wrote the record: a"
            " replica that stops leaves an advertisement another replica keeps refreshing"
        ),
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return validate_name(value, "capability name")

    @field_validator("ensemble")
    @classmethod
    def _check_ensemble(cls, value: str) -> str:
        return validate_name(value, "ensemble name")

    @field_validator("queue")
    @classmethod
    def _check_queue(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "queue name")

    @field_validator("expires_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _aware(value)

    @property
    def key(self) -> str:
        """Registry key: one record per (ensemble, name)."""
        return f"{self.ensemble}.{self.name}"

    def expired(self, now: datetime | None = None) -> bool:
        """True once the lease has run out (``expires_at`` at or before
        ``now``, default: the current UTC time); never for an advertisement
        without a lease.

        Raises: TypeError if ``now`` is a naive datetime.
        """
        return self.expires_at is not None and self.expires_at <= (now or utcnow())


class CapabilityChange(_WireModel):
    """One change seen by :meth:`CapabilityRegistry.watch`."""

    kind: Literal["advertised", "withdrawn", "expired"]
    ensemble: str
    name: str
    capability: Capability | None = None


class QueueStats(_WireModel):
    """A point-in-time view of a queue. ``None`` means the backend cannot tell."""

    queue: str
    depth: int | None = Field(
        description="requests waiting to be delivered, those delayed by a nack included (lag "
        "on Kafka; on NATS a delayed one counts as in flight); None if the broker cannot tell"
    )
    in_flight: int | None = Field(default=None, description="leased, not yet acked")
    delayed: int | None = Field(
        default=None, description="nacked with a delay, not yet due (also counted in depth)"
    )
    dead_lettered: int = 0
    head_enqueued_at: datetime | None = Field(
        default=None,
        description="first enqueue time of the request next in line (how long the head "
        "of the queue has waited); None if nothing waits or the backend cannot tell",
    )
    partition_lag: dict[str, int] | None = Field(
        default=None,
        description="consumer lag per partition (Kafka: high watermark minus the group's "
        "position, by partition number); None where the backend has no partitions",
    )


class DeadLetter(_WireModel):
    """A request that exhausted ``max_attempts``, was dead-lettered by its
    handler, or could not be decoded (then ``request`` is None and ``raw``
    holds the exact body: as text if it was UTF-8, else base64, as
    ``raw_encoding`` says; :meth:`raw_bytes` gives the bytes back, so an
    operator can repair and enqueue them). Backends pass the body as bytes
    (``raw=body``); the model picks the encoding."""

    queue: str
    request_id: str | None
    request: WorkRequest | None
    raw: str | None = None
    raw_encoding: Literal["utf-8", "base64"] = "utf-8"
    error: str
    attempts: int
    dead_lettered_at: datetime = Field(default_factory=utcnow)
    dead_letter_id: str | None = Field(
        default=None,
        description="the backend's id of this dead letter, for "
        "RequestQueue.replace_dead_letter (set when listed by dead_letters())",
    )

    @model_validator(mode="before")
    @classmethod
    def _raw_from_bytes(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("raw"), bytes | bytearray | memoryview):
            body = bytes(data["raw"])
            try:
                raw, encoding = body.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                raw, encoding = base64.b64encode(body).decode("ascii"), "base64"
            data = {**data, "raw": raw, "raw_encoding": encoding}
        return data

    def raw_bytes(self) -> bytes | None:
        """The exact body of an undecodable request (None if there is none)."""
        if self.raw is None:
            return None
        if self.raw_encoding == "base64":
            return base64.b64decode(self.raw)
        return self.raw.encode("utf-8")


class HealthStatus(_WireModel):
    """Result of :meth:`Transport.health`."""

    ok: bool
    backend: str
    detail: str = ""
    latency_ms: float | None = None


def lease_deadline(seconds: float, now: datetime | None = None) -> datetime:
    """``now + seconds`` as an aware datetime."""
    return (now or utcnow()) + timedelta(seconds=seconds)
