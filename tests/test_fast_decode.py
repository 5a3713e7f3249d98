"""The decoding fast path (``fast_work_request``) gives exactly what
``WorkRequest.model_validate_json`` gives, or declines (``None``) and the
full path decides: the same request, field for field and type for type, or
the same error."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import WorkRequest
from transport._spi.models import _WorkRequestFields, fast_work_request
from transport.errors import UndecodableMessageError
from transport.kit import decode, decode_request


def _full(data: bytes) -> WorkRequest | str:
    try:
        return WorkRequest.model_validate_json(data)
    except Exception as exc:  # the full path's outcome, whatever it is
        return f"{type(exc).__name__}"


def _same(fast: WorkRequest, full: WorkRequest) -> None:
    assert type(fast) is WorkRequest
    assert fast == full
    assert list(fast.__dict__) == list(full.__dict__)
    assert fast.model_fields_set == full.model_fields_set
    for name, value in full.__dict__.items():
        assert type(fast.__dict__[name]) is type(value), name
        if isinstance(value, datetime):
            assert fast.__dict__[name].utcoffset() == value.utcoffset()
    assert fast.model_dump_json() == full.model_dump_json()
    assert repr(fast) == repr(full)


_STAMP = "2026-12-04T05:00:00.123456Z"
BODIES: list[Any] = [
    {"request_id": "a1", "task": "work", "payload": {"x": [1, 2.5, None, True]}},
    {"request_id": "a1", "task": "work", "enqueued_at": _STAMP, "attempt": 3},
    {"request_id": "a1", "task": "work", "enqueued_at": "2026-12-04T06:00:00+01:00"},
    {"request_id": "a1", "task": "work", "enqueued_at": "2026-12-04T05:00:00"},  # naive
    {"request_id": "a1", "task": "work", "deadline": "2026-12-04T05:00:00"},  # naive
    {"request_id": "a1", "task": "work", "reply_to": "callers", "priority": 255},
    {"request_id": "a1", "task": "work", "priority": "7", "attempt": 2.0},  # coerced alike
    {"request_id": "a1", "task": "work", "priority": 256},
    {"request_id": "a1", "task": "work", "attempt": 0},
    {"request_id": "a1", "task": "work", "schema_version": 1, "unknown": {"x": 1}},
    {"request_id": "a1", "task": "work", "schema_version": 2},
    {"request_id": "a1", "task": "work", "schema_version": 0},
    {"task": "work"},  # another program's body: no request id
    {"request_id": "a b", "task": "work"},
    {"request_id": "a" * 129, "task": "work"},
    {"request_id": "a1", "task": "a__b"},
    {"request_id": "a1", "task": "-ab"},
    {"request_id": "a1", "task": "a" * 101},
    {"request_id": "a1", "task": "ab\n"},
    {"request_id": "a1", "task": "ab", "reply_to": "x__y"},
    {"request_id": "a1", "task": "ab", "reply_to": "x.y"},
    {"request_id": "a1", "task": "ab", "reply_to": None},
    {"request_id": "a1", "task": "ab", "headers": {"trace": "1"}},
    {"request_id": "a1", "task": "ab", "headers": {"bad name": "1"}},
    {"request_id": "a1", "task": "ab", "headers": {"x": "a\nb"}},
    {"request_id": "a1", "task": "ab", "ordering_key": "k1"},
    {"request_id": "a1", "task": "ab", "ordering_key": ""},
    {"request_id": "a1", "task": "ab", "ordering_key": "a\x01"},
    {"request_id": "a1", "task": 5},
    {"request_id": 5, "task": "ab"},
    {"request_id": "a1"},
    [],
    "text",
    None,
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: json.dumps(b)[:60])
def test_the_fast_path_gives_what_the_full_path_gives_or_declines(body: Any) -> None:
    data = json.dumps(body).encode()
    full = _full(data)
    fast = fast_work_request(data)
    if fast is not None:
        assert isinstance(full, WorkRequest), full
        _same(fast, full)
    # decode() (which tries the fast path first) ends as the full path does.
    try:
        decoded: WorkRequest | str = decode(WorkRequest, data)
    except UndecodableMessageError:
        decoded = "error"
    if isinstance(full, WorkRequest):
        assert isinstance(decoded, WorkRequest)
        if "request_id" not in full.model_fields_set:  # each decode draws an id
            values = {**full.__dict__, "request_id": decoded.request_id}
            full = WorkRequest.model_construct(full.model_fields_set, **values)
        _same(decoded, full)
    else:
        assert decoded == "error"


def test_a_typical_body_takes_the_fast_path() -> None:
    request = WorkRequest(task="work", payload={"n": 1}, reply_to="callers")
    stamped = request.model_copy(update={"enqueued_at": datetime.now(UTC)})
    data = stamped.model_dump_json().encode()
    fast = fast_work_request(data)
    assert fast is not None
    _same(fast, WorkRequest.model_validate_json(data))
    assert decode_request(data, "x", 1) == stamped


def test_not_json_is_declined_and_the_full_path_raises() -> None:
    assert fast_work_request(b"{not json") is None
    with pytest.raises(UndecodableMessageError):
        decode(WorkRequest, b"{not json")


def test_the_fast_model_has_every_field_of_the_request() -> None:
    """Built from ``WorkRequest``: a field added there is decoded here too."""
    assert list(_WorkRequestFields.model_fields) == list(WorkRequest.model_fields)
    for name, info in WorkRequest.model_fields.items():
        fast = _WorkRequestFields.model_fields[name]
        assert fast.default == info.default, name
        assert fast.default_factory == info.default_factory, name


_names = st.text(alphabet="ab_-.9Z \n", min_size=0, max_size=6)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "request_id": st.one_of(_names, st.integers()),
        "task": st.one_of(_names, st.none()),
        "reply_to": st.one_of(_names, st.none()),
        "priority": st.one_of(st.integers(-2, 300), st.text("0123", max_size=3)),
        "attempt": st.one_of(st.integers(-1, 3), st.floats(0, 3)),
        "schema_version": st.integers(0, 3),
        "enqueued_at": st.sampled_from(
            [_STAMP, "2026-12-04T05:00:00", "2026-12-04T06:00:00+01:00", "x", None]
        ),
        "headers": st.dictionaries(_names, _names, max_size=2),
        "ordering_key": st.one_of(_names, st.none()),
        "payload": st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=3),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner),
            max_leaves=5,
        ),
    },
)


@settings(max_examples=400, deadline=None)
@given(_fields)
def test_generated_bodies_decode_alike(body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    full = _full(data)
    fast = fast_work_request(data)
    if fast is not None:
        assert isinstance(full, WorkRequest), (body, full)
        _same(fast, full)


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b'{"payload": 1}', "task: Field required"),
        (b'{"task": "x", "priority": 999}', "priority: Input should be less than or equal to 255"),
        (b"[1, 2]", "first: Input should be an object"),
    ],
)
def test_a_refused_body_names_the_field_at_fault(body: bytes, names: str) -> None:
    """The reason a foreign body is dead-lettered with says which field is
    wrong (it said only "Field required")."""
    with pytest.raises(UndecodableMessageError) as caught:
        decode_request(body)
    assert str(caught.value).endswith(names), str(caught.value)
