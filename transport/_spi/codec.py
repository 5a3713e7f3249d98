"""Encoding of models to and from wire bytes (JSON, UTF-8), with size limits."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from transport._spi.models import (
    DeadLetter,
    WorkRequest,
    derived_request_id,
    fast_work_request,
    replace_fields,
)
from transport._spi.naming import _REQUEST_ID_RE
from transport.errors import (
    ConfigurationError,
    PayloadTooLargeError,
    PermanentTransportError,
    UndecodableMessageError,
)

if TYPE_CHECKING:
    from transport._spi.config import TransportConfig

__all__ = ["RequestCodec", "decode", "decode_request", "encode", "request_codec_for"]

M = TypeVar("M", bound=BaseModel)


def encode(model: BaseModel, limit: int | None = None) -> bytes:
    """Serialise ``model`` to JSON bytes.

    Raises:
        PayloadTooLargeError: the encoded size exceeds ``limit``.
        PermanentTransportError: the payload holds a value JSON cannot carry.
    """
    try:
        data = model.__pydantic_serializer__.to_json(model)
    except Exception as exc:  # pydantic_core.PydanticSerializationError
        raise PermanentTransportError(f"payload is not JSON-serialisable: {exc}") from exc
    if limit is not None and len(data) > limit:
        raise PayloadTooLargeError(len(data), limit)
    return data


def encode_dead_letter(record: DeadLetter, limit: int | None) -> bytes:
    """A dead letter as stored: without the raw body of an undecodable
    request if the record would exceed ``limit`` with it (another program's
    body near the broker's limit grows by a third as base64); the error then
    says so. A poison message whose dead letter cannot be written would
    otherwise stay at the head of the queue for good."""
    body = encode(record)
    if limit is None or len(body) <= limit or record.raw is None:
        return body
    size = len(record.raw_bytes() or b"")
    kept = replace_fields(
        record,
        raw=None,
        raw_encoding="utf-8",
        error=f"{record.error} (its body, {size:,} bytes, was too large to keep here)",
    )
    return encode(kept)


class RequestCodec(Protocol):
    """Another program's request dialect, selected by
    ``TransportConfig.request_codec`` (see :func:`request_codec_for`)."""

    @property
    def name(self) -> str: ...

    def encode_request(self, request: WorkRequest, limit: int | None = None) -> bytes:
        """The request in this dialect. Raises: PayloadTooLargeError,
        InvalidMessageError (the dialect cannot carry it)."""
        ...

    def decode_request(self, data: bytes | str) -> WorkRequest | None:
        """The request if ``data`` is of this dialect's shape, else ``None``.
        Raises: UndecodableMessageError (of the shape, but invalid)."""
        ...


def request_codec_for(config: TransportConfig) -> RequestCodec | None:
    """The request codec ``config.request_codec`` selects; ``None`` for the
    library's own format (``"native"``, the default).

    Raises: ConfigurationError for an unknown codec name.
    """
    name = config.request_codec
    if name == "native":
        return None
    if name == "agentensemble":
        from transport._spi.agentensemble import AgentEnsembleCodec

        return AgentEnsembleCodec()
    raise ConfigurationError(f"unknown request_codec {name!r} (native, agentensemble)")


def decode_request(
    data: bytes | str,
    *identity: object,
    carried_id: str | None = None,
    codec: RequestCodec | None = None,
) -> WorkRequest:
    """Parse a delivered body into a :class:`WorkRequest`.

    With ``codec`` (the queue's ``request_codec``), a body of that codec's
    shape is read by it; every other body as the library's own record.

    A body without ``request_id`` (another program's) gets ``carried_id`` (the
    id a backend's re-published copy of the message carries in its headers)
    or else one derived from ``identity``, the broker's identity of the
    message: never a fresh random id, which would make each redelivery look
    like a new request. ``attempt`` is left to the caller, which must
    overwrite it with the backend's own delivery count.

    Raises:
        UndecodableMessageError: not JSON, or not a valid request.
    """
    if codec is not None:
        foreign = codec.decode_request(data)
        if foreign is not None:
            return foreign
    request = decode(WorkRequest, data)
    if "request_id" not in request.model_fields_set:
        if carried_id is None or not _REQUEST_ID_RE.fullmatch(carried_id):
            carried_id = derived_request_id(*identity)
        request = replace_fields(request, request_id=carried_id)
    return request


def decode(model: type[M], data: bytes | str) -> M:
    """Parse wire bytes into ``model``.

    Raises:
        UndecodableMessageError: not JSON, or not a valid ``model``.
    """
    if isinstance(data, str):
        suspect = "NaN" in data or "Infinity" in data
    else:
        suspect = b"NaN" in data or b"Infinity" in data
    if suspect and _non_finite(data):
        # pydantic's JSON parser takes these tokens as floats; JSON has
        # no such numbers (and the library never writes them).
        raise UndecodableMessageError(f"not a valid {model.__name__}: NaN/Infinity is not JSON")
    if model is WorkRequest:
        fast = fast_work_request(data)
        if fast is not None:
            return fast  # type: ignore[return-value]
    try:
        # The validator itself: the model's classmethod maps errors for its
        # callers; here they are UndecodableMessageError.
        return model.__pydantic_validator__.validate_json(data)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise UndecodableMessageError(
            f"not a valid {model.__name__}: {exc.error_count()} error(s); first: {_first(exc)}"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise UndecodableMessageError(f"not a valid {model.__name__}: {exc}") from exc


def _first(exc: ValidationError) -> str:
    """The first error, with the field it is about (``task: Field
    required``; a dead letter's reason said only "Field required")."""
    errors = exc.errors()
    if not errors:
        return str(exc)
    where = ".".join(str(part) for part in errors[0]["loc"])
    return f"{where}: {errors[0]['msg']}" if where else errors[0]["msg"]


def _refuse_constant(token: str) -> None:
    raise ValueError(token)


def _non_finite(data: bytes | str) -> bool:
    """Whether ``data`` holds a NaN/Infinity token outside strings (only
    asked when the letters occur at all)."""
    try:
        json.loads(data, parse_constant=_refuse_constant)
    except ValueError as exc:
        return str(exc) in ("NaN", "Infinity", "-Infinity")
    return False
