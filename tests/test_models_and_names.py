"""Wire models and name validation, including property-based checks."""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from transport import (
    DeadLetter,
    InvalidMessageError,
    InvalidNameError,
    PayloadTooLargeError,
    PermanentTransportError,
    UndecodableMessageError,
    WorkRequest,
    WorkResponse,
    decode,
    encode,
    validate_name,
)

SAFE = string.ascii_letters + string.digits + "_-"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    payload=json_values,
    headers=st.dictionaries(
        st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=12),
        st.text(
            alphabet=st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)),
            max_size=30,
        ),
        max_size=4,
    ),
    priority=st.integers(0, 9),
)
def test_request_round_trips_through_the_wire_format(
    payload: object, headers: dict[str, str], priority: int
) -> None:
    request = WorkRequest(
        task="t", payload=payload, headers=headers, priority=priority, enqueued_at=datetime.now(UTC)
    )
    assert decode(WorkRequest, encode(request)) == request


@given(st.text(max_size=120))
def test_name_validation_accepts_exactly_the_safe_alphabet(name: str) -> None:
    ok = (
        0 < len(name) <= 100
        and all(ch in SAFE for ch in name)
        and name[0] not in "_-"
        and "__" not in name
    )
    if ok:
        assert validate_name(name) == name
    else:
        with pytest.raises(InvalidNameError):
            validate_name(name)


@pytest.mark.parametrize(
    "bad", ["a.b", "a*", ">", "a/b", "$SYS", "tab\t", "cr\rlf\n", "ü", "x" * 101, ""]
)
def test_hostile_names_are_rejected_with_a_clear_message(bad: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_name(bad, "queue name")
    assert "queue name" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    data = json.dumps({"request_id": "abc", "task": "t", "payload": 1, "from_the_future": True})
    assert decode(WorkRequest, data).request_id == "abc"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"task": "t", "request_id": "bad id!"}',
        b'{"task": 5}',
        b"\xff\xfe",
    ],
)
def test_malformed_records_raise_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableMessageError):
        decode(WorkRequest, data)


_plain = st.text(alphabet=string.ascii_letters + string.digits + " é€", max_size=5)


@given(_plain, st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), _plain)
def test_a_header_value_with_a_lone_surrogate_is_rejected_before_sending(
    before: str, surrogate: str, after: str
) -> None:
    # Not encodable as UTF-8: it would fail only when the request is sent.
    with pytest.raises(ValueError, match="lone surrogates"):
        WorkRequest(task="t", headers={"x": before + surrogate + after})


def test_header_injection_is_rejected() -> None:
    # Raised inside model validation; the library's own error reaches the
    # caller (InvalidNameError, also a ValueError), not pydantic's dump.
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        WorkRequest(task="t", headers={"x": "a\r\nInjected: 1"})
    with pytest.raises(ValueError, match="header name"):
        WorkRequest(task="t", headers={"bad name": "v"})
    with pytest.raises(ValueError, match="task name"):
        WorkRequest(task="evil.>")


def test_payload_limit_and_non_json_payloads() -> None:
    with pytest.raises(PayloadTooLargeError) as info:
        encode(WorkRequest(task="t", payload="x" * 2000), limit=1000)
    assert info.value.limit == 1000
    with pytest.raises(PermanentTransportError):
        encode(WorkRequest(task="t", payload=object()))


def test_naive_datetimes_are_taken_as_utc() -> None:
    request = WorkRequest(task="t", enqueued_at=datetime(2026, 1, 1, 12, 0))
    assert request.enqueued_at is not None and request.enqueued_at.tzinfo is not None
    response = WorkResponse(request_id="r1", completed_at=datetime(2026, 1, 1))
    assert response.completed_at.utcoffset() is not None


def test_generated_request_ids_are_uuid4_hex() -> None:
    import uuid

    ids = {WorkRequest(task="t").request_id for _ in range(2000)}
    assert len(ids) == 2000
    for rid in ids:
        parsed = uuid.UUID(hex=rid)
        assert parsed.hex == rid
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_name_validation_is_the_same_for_names_seen_before() -> None:
    # Accepted names are remembered; that must not let anything else through.
    class Name(str):
        pass

    assert validate_name("orders-1") == "orders-1"
    assert validate_name("orders-1") == "orders-1"
    assert validate_name(Name("orders-2")) == "orders-2"
    for bad in ("orders__1", "orders.1", "", "-orders", "x" * 101, Name("a/b")):
        with pytest.raises(InvalidNameError):
            validate_name(bad)
    with pytest.raises(InvalidNameError):
        validate_name(b"orders-1")


def test_replace_fields_stamps_a_copy_and_keeps_the_original() -> None:
    from transport._spi.models import replace_fields

    request = WorkRequest(task="t", payload={"a": 1})
    now = datetime.now(UTC)
    stamped = replace_fields(request, enqueued_at=now, attempt=3)
    assert request.enqueued_at is None and request.attempt == 1
    assert stamped.enqueued_at == now and stamped.attempt == 3
    assert stamped.request_id == request.request_id and stamped.payload == request.payload
    assert {"enqueued_at", "attempt"} <= stamped.model_fields_set
    assert decode(WorkRequest, encode(stamped)) == stamped


@pytest.mark.parametrize(
    "bad",
    ["", "x" * 257, "tab\there", "line\nbreak", "nul\x00", "del\x7f", "c1\x85", "lone\ud800", 5],
)
def test_a_bad_ordering_key_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match=r"ordering[ _]key"):
        WorkRequest(task="t", ordering_key=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", ["customer-42", "a", "x" * 256, "tenant/ü €:order 7", "a.b>*$"])
def test_an_ordering_key_round_trips_and_becomes_the_message_key(good: str) -> None:
    request = WorkRequest(task="t", ordering_key=good)
    again = decode(WorkRequest, encode(request))
    assert again == request
    assert again.ordering_key == good
    assert again.message_key == good


def test_without_an_ordering_key_the_request_id_is_the_message_key() -> None:
    request = WorkRequest(task="t")
    assert request.ordering_key is None
    assert request.message_key == request.request_id
    # An older writer's record (no such field) still decodes.
    old = json.dumps({"request_id": "abc", "task": "t"})
    assert decode(WorkRequest, old).message_key == "abc"


def test_an_unsafe_task_name_raises_invalid_name_error_not_pydantics() -> None:
    with pytest.raises(InvalidNameError, match="invalid task name 'bad task'") as info:
        WorkRequest(task="bad task")
    assert not isinstance(info.value, ValidationError)


def test_an_out_of_range_field_raises_one_readable_line() -> None:
    with pytest.raises(InvalidMessageError) as info:
        WorkRequest(task="t", priority=300)
    assert str(info.value) == (
        "invalid WorkRequest field priority=300: Input should be less than or equal to 255"
    )


def _nested(levels: int) -> dict[str, object]:
    # The innermost level is not empty: the decoder does not count an
    # empty container as a level.
    top: dict[str, object] = {"leaf": 1}
    inner = top
    for _ in range(levels - 1):
        inner["a"] = {"leaf": 1}
        inner = inner["a"]  # type: ignore[assignment]
    return top


def test_a_payload_nested_to_the_limit_is_sent_as_it_is() -> None:
    from transport._spi.jsonvalue import MAX_NESTING

    deep = _nested(MAX_NESTING)
    request = WorkRequest(task="t", payload=deep)
    assert decode(WorkRequest, encode(request)).payload == deep
    # The deepest record holding a payload: a dead letter of the request.
    letter = DeadLetter(
        queue="q", request_id=request.request_id, request=request, error="e", attempts=1
    )
    assert decode(DeadLetter, encode(letter)).request == request
    with pytest.raises(InvalidMessageError, match=f"nested more than {MAX_NESTING} levels"):
        WorkRequest(task="t", payload=_nested(MAX_NESTING + 1))


def test_an_int_longer_than_the_decoder_takes_is_refused_when_built() -> None:
    from transport._spi.jsonvalue import MAX_INT_DIGITS

    longest = -(10**MAX_INT_DIGITS - 1)
    request = WorkRequest(task="t", payload={"n": [longest]})
    assert decode(WorkRequest, encode(request)).payload == {"n": [longest]}
    for too_long in (10**MAX_INT_DIGITS, -(10**MAX_INT_DIGITS)):
        with pytest.raises(InvalidMessageError, match=r"payload\['n'\]\[0\] is an int of more"):
            WorkRequest(task="t", payload={"n": [too_long]})
        with pytest.raises(InvalidMessageError, match="result is an int of more"):
            WorkResponse(request_id="r", result=too_long)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (float("nan"), "payload is nan: NaN and infinities are not JSON"),
        ({"x": float("inf")}, "payload['x'] is inf: NaN and infinities are not JSON"),
        ([(1, 2)], "payload[0] is a tuple"),
        ({1, 2}, "payload is a set"),
        (datetime(2026, 1, 1, tzinfo=UTC), "payload is a datetime"),
        ({1: "one"}, "payload has the key 1 (int): JSON object keys are plain strings"),
        (b"x", "payload is a bytes"),
        # Accepted here, then refused by the encoder at enqueue with another
        # error type (PermanentTransportError, not a ValueError):
        ({"s": "\ud800"}, "payload['s'] holds a lone surrogate"),
        ({"\udfff": 1}, "payload key holds a lone surrogate"),
        (_nested(201), "payload['a']['a']"),
    ],
)
def test_payloads_that_would_not_arrive_as_sent_are_refused(payload: object, message: str) -> None:
    with pytest.raises(InvalidMessageError) as info:
        WorkRequest(task="t", payload=payload)
    assert str(info.value).startswith(message)


def test_results_and_events_follow_the_same_payload_rule() -> None:
    from transport import Event

    with pytest.raises(InvalidMessageError, match="result is nan"):
        WorkResponse(request_id="r1", result=float("nan"))
    with pytest.raises(InvalidMessageError, match="data"):
        Event(subject="agent.events.x", data={"when": datetime(2026, 1, 1, tzinfo=UTC)})


def test_a_self_containing_payload_is_refused() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(InvalidMessageError, match="nested"):
        WorkRequest(task="t", payload=loop)


@given(payload=json_values)
def test_every_json_value_is_accepted_and_comes_back_equal(payload: object) -> None:
    request = WorkRequest(task="t", payload=payload)
    assert decode(WorkRequest, encode(request)).payload == payload


def test_error_header_is_cut_at_a_character_boundary_within_the_limit() -> None:
    from transport.kit import HEADER_ERROR, MAX_ERROR_BYTES, error_header

    assert HEADER_ERROR == "ae-error"
    assert error_header("too hot") == "too hot"
    long = "é" * MAX_ERROR_BYTES  # two bytes each
    cut = error_header(long)
    assert len(cut.encode()) == MAX_ERROR_BYTES and set(cut) == {"é"}
    odd = "x" + "é" * MAX_ERROR_BYTES  # the limit falls inside a character
    cut = error_header(odd)
    assert len(cut.encode()) == MAX_ERROR_BYTES - 1 and cut.startswith("xé")


def test_dead_letter_keeps_the_exact_bytes_of_an_undecodable_body() -> None:
    from transport import DeadLetter, decode, encode

    for body, encoding in [
        (b"\xff\xfe\x00 not utf-8", "base64"),
        ('{"t\u00e9xt": 1'.encode(), "utf-8"),
    ]:
        dead = DeadLetter(queue="q", request_id=None, request=None, raw=body, error="x", attempts=1)
        assert dead.raw_encoding == encoding
        assert dead.raw_bytes() == body
        again = decode(DeadLetter, encode(dead))  # as stored and read back by a backend
        assert (again.raw_encoding, again.raw_bytes()) == (encoding, body)
    text = DeadLetter(
        queue="q", request_id=None, request=None, raw="as text", error="x", attempts=1
    )
    assert (text.raw_encoding, text.raw_bytes()) == ("utf-8", b"as text")


def test_subclasses_of_json_types_are_refused() -> None:
    # A str Enum, an IntEnum or a dict subclass passed the build check and
    # arrived as the plain type ("arrive as sent, or are refused").
    import enum

    class Colour(str, enum.Enum):  # noqa: UP042 - the case users write
        RED = "red"

    class Level(enum.IntEnum):
        HIGH = 1

    for payload in ({"c": Colour.RED}, Level.HIGH, {Colour.RED: 1}):
        with pytest.raises(InvalidMessageError, match=r"subclass|plain strings"):
            WorkRequest(task="t", payload=payload)
    assert WorkRequest(task="t", payload={"c": Colour.RED.value}).payload == {"c": "red"}


def test_a_copy_with_updates_is_validated_like_a_new_request() -> None:
    # pydantic's model_copy does not validate: a bad task name or a set
    # payload reached the broker (dead-lettered there, or sent as a list).
    request = WorkRequest(task="t", payload={"n": 1})
    with pytest.raises(InvalidNameError):
        request.model_copy(update={"task": "a.b>"})
    with pytest.raises(InvalidMessageError, match="a set"):
        request.model_copy(update={"payload": {1, 2}})
    copy = request.model_copy(update={"payload": {"n": 2}})
    assert (copy.request_id, copy.payload) == (request.request_id, {"n": 2})
    assert copy.model_fields_set == request.model_fields_set | {"payload"}


def test_a_misspelt_argument_is_refused_with_the_closest_name() -> None:
    with pytest.raises(TypeError, match=r"'reply_too' \(did you mean 'reply_to'\?\)"):
        WorkRequest(task="t", reply_too="desk")  # type: ignore[call-arg]
