"""Encoding of models to and from wire bytes (JSON, UTF-8), with size limits."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from transport.errors import PayloadTooLargeError, PermanentTransportError, UndecodableMessageError

__all__ = ["decode", "encode"]

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


def decode(model: type[M], data: bytes | str) -> M:
    """Parse wire bytes into ``model``.

    Raises:
        UndecodableMessageError: not JSON, or not a valid ``model``.
    """
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise UndecodableMessageError(
            f"not a valid {model.__name__}: {exc.error_count()} error(s); first: "
            f"{exc.errors()[0]['msg'] if exc.errors() else exc}"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise UndecodableMessageError(f"not a valid {model.__name__}: {exc}") from exc
