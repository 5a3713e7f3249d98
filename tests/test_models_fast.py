"""``WorkRequest(...)`` checks its common arguments without pydantic's
generic pass: the result and the errors must be those of the full path
(``WorkRequest.model_validate``, which never takes the shortcut)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import ValidationError

from transport import WorkRequest
from transport.errors import TransportError

_RID = "0123456789abcdef0123456789abcdef"

GOOD: list[dict[str, Any]] = [
    {"task": "work"},
    {"task": "work", "payload": {"a": [1, 2.5, None, True, "x"]}},
    {"task": "work", "payload": None},
    {"task": "work", "payload": "text"},
    {"task": "w-1_x", "payload": [], "reply_to": "caller-1"},
    {"task": "work", "request_id": _RID},
    {"task": "work", "reply_to": None, "request_id": _RID, "payload": 0},
    {"task": "work", "payload": {"ü": "ö"}},
]

BAD: list[dict[str, Any]] = [
    {},
    {"payload": 1},
    {"task": ""},
    {"task": "a.b"},
    {"task": "a__b"},
    {"task": "x" * 101},
    {"task": 5},
    {"task": "work", "reply_to": "a>b"},
    {"task": "work", "reply_to": 7},
    {"task": "work", "request_id": "has space"},
    {"task": "work", "request_id": ""},
    {"task": "work", "request_id": 12},
    {"task": "work", "payload": {1: "int key"}},
    {"task": "work", "payload": {"a": float("nan")}},
    {"task": "work", "payload": (1, 2)},
    {"task": "work", "payload": {"s": {1, 2}}},
    {"task": "work", "payload": "\ud800"},
    {"task": "work", "request_id": None},
    # Two bad arguments: the first in field order is reported.
    {"task": "a.b", "request_id": "bad id"},
    {"task": "work", "reply_to": "a>b", "request_id": "bad id"},
    {"task": "work", "reply_to": "a>b", "payload": float("nan")},
]


def _state(request: WorkRequest) -> tuple[Any, ...]:
    dumped = request.model_dump()
    dumped.pop("request_id")
    return (
        dumped,
        request.model_fields_set,
        request.__pydantic_extra__,
        request.__pydantic_private__,
        request.model_dump_json(exclude={"request_id"}),
    )


@pytest.mark.parametrize("kwargs", GOOD, ids=repr)
def test_a_request_built_directly_is_the_one_validation_builds(kwargs: dict[str, Any]) -> None:
    direct = WorkRequest(**kwargs)
    validated = WorkRequest.model_validate(kwargs)
    assert _state(direct) == _state(validated)
    if "request_id" in kwargs:
        assert direct.request_id == validated.request_id == kwargs["request_id"]
    else:
        assert direct.request_id != validated.request_id  # a fresh id each
        assert len(direct.request_id) == 32
    assert WorkRequest.model_validate_json(direct.model_dump_json()) == direct
    assert direct.headers == {} and direct.headers is not WorkRequest(**kwargs).headers
    with pytest.raises(Exception, match="frozen"):
        direct.task = "other"  # type: ignore[misc]


@pytest.mark.parametrize("kwargs", BAD, ids=repr)
def test_a_bad_argument_raises_what_validation_raises(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TransportError) as direct:
        WorkRequest(**kwargs)
    # pydantic's own classmethod raises the library's error too (it raised
    # pydantic's ValidationError, which the README says the library never does).
    with pytest.raises(TransportError) as validation:
        WorkRequest.model_validate(kwargs)
    assert type(direct.value) is type(validation.value)
    assert str(direct.value) == str(validation.value)


def test_the_shortcut_is_taken_and_other_arguments_are_not_lost() -> None:
    request = WorkRequest(task="work", payload=1, priority=3, headers={"k": "v"})
    assert (request.priority, request.headers) == (3, {"k": "v"})
    assert request.model_fields_set == {"task", "payload", "priority", "headers"}
    with pytest.raises(TypeError, match="reply_to"):
        WorkRequest(task="work", reply_too="x")  # type: ignore[call-arg]


def test_a_subclass_is_built_by_pydantic_with_its_own_fields_and_validators() -> None:
    from pydantic import field_validator

    class Tagged(WorkRequest):
        tag: str = "none"

        @field_validator("task")
        @classmethod
        def _upper(cls, value: str) -> str:
            return value.upper()

    request = Tagged(task="work", payload=1)
    assert (request.tag, request.task) == ("none", "WORK")


def test_a_dead_letter_too_large_keeps_everything_but_the_raw_body() -> None:
    from transport import DeadLetter
    from transport.kit import decode, encode_dead_letter

    big = DeadLetter(
        queue="q", request_id=None, request=None, raw=b"\x80" * 3000, error="bad", attempts=1
    )
    assert decode(DeadLetter, encode_dead_letter(big, None)).raw_bytes() == b"\x80" * 3000
    assert decode(DeadLetter, encode_dead_letter(big, 10_000)).raw_bytes() == b"\x80" * 3000
    kept = decode(DeadLetter, encode_dead_letter(big, 1_000))
    assert kept.raw is None and kept.error.startswith("bad (its body, 3,000 bytes")


def test_a_missing_field_is_named_without_echoing_the_arguments() -> None:
    from transport import WorkResponse
    from transport.errors import InvalidMessageError

    with pytest.raises(InvalidMessageError) as missing:
        WorkResponse(result={"api_key": "sk-live-123"})  # type: ignore[call-arg]
    assert str(missing.value) == "invalid WorkResponse: field request_id is required"
    with pytest.raises(InvalidMessageError, match="field task is required") as no_task:
        WorkRequest(payload={"dish": "soup"})  # type: ignore[call-arg]
    assert "soup" not in str(no_task.value)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_tokens_are_undecodable(token: str) -> None:
    """docs/wire.md: NaN/Infinity tokens make a record undecodable (they were
    read as floats and handed to handlers); inside a string they are text."""
    from transport.errors import UndecodableMessageError
    from transport.kit import decode_request

    with pytest.raises(UndecodableMessageError, match="NaN/Infinity"):
        decode_request(f'{{"request_id":"a1","task":"t","payload":{{"v":{token}}}}}'.encode())
    text = decode_request(f'{{"request_id":"a1","task":"t","payload":"{token}"}}'.encode())
    assert text.payload == token


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"task": "a.b"}', "invalid task name 'a.b'"),
        (b'{"task": 5}', "invalid WorkRequest field task=5: Input should be a valid string"),
        (b"{}", "invalid WorkRequest: field task is required"),
        (b"not json", "invalid WorkRequest b'not json': Invalid JSON"),
    ],
)
def test_pydantic_parsing_classmethods_raise_the_library_errors(body: bytes, error: str) -> None:
    with pytest.raises(TransportError, match=re.escape(error)) as raised:
        WorkRequest.model_validate_json(body)
    assert isinstance(raised.value, ValueError)
    assert not isinstance(raised.value, ValidationError)
    if body != b"not json":
        with pytest.raises(TransportError, match=re.escape(error)):
            WorkRequest.model_validate_strings(json.loads(body))
