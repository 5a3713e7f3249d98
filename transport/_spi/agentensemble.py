"""The AgentEnsemble (Java) wire dialect: an opt-in request codec (public as
:mod:`transport.interop.agentensemble`).

The Java project this library's design comes from writes, on its Kafka
transport, one Jackson JSON record per request to topic ``<prefix><queue>``
(default prefix ``agentensemble.``), keyed by ``requestId``, and delivers a
response as a Jackson JSON record, keyed by ``requestId``, to the Kafka topic
a request's ``delivery.address`` names (``delivery.method`` ``TOPIC``). Its
``ObjectMapper`` is the default one with the Java time module, so:

* fields are written in declaration order, nulls left out, no whitespace;
* enums by name (``"HIGH"``, ``"TOPIC"``, ``"USE_CACHED"``);
* a ``java.time.Duration`` as a *number* of seconds with nine decimals
  (``30.000000000``; zero is ``0.0``), not an ISO-8601 text: the mapper does
  not turn ``WRITE_DURATIONS_AS_TIMESTAMPS`` off. Jackson reads both forms,
  and so does this module;
* ``priority`` is always present (the record defaults it to ``NORMAL``) and
  so is ``delivery`` (default ``{"method":"WEBSOCKET"}``).

This module maps those records to and from :class:`~transport.WorkRequest`
and :class:`~transport.WorkResponse`. The mapping (docs/interop-java.md):

========================  ==================================================
AgentEnsemble             this library
========================  ==================================================
``requestId``             ``request_id`` (must match the request-id pattern)
``task``                  ``task`` (must be a valid name)
``context`` (text)        ``payload`` (a ``str``, or ``None``)
``priority``              ``priority``: CRITICAL 0, HIGH 1, NORMAL 2, LOW 3
``deadline`` (duration)   ``deadline`` = arrival + duration; ``enqueued_at``
                          = arrival (the moment this process decoded it)
``traceContext``          headers ``traceparent`` / ``tracestate``
``from``                  header ``agentensemble-from``
``delivery``              headers ``agentensemble-delivery-method`` /
                          ``agentensemble-delivery-address``
``cachePolicy``           header ``agentensemble-cache-policy``
``cacheKey``              header ``agentensemble-cache-key``
``maxAge`` (duration)     header ``agentensemble-max-age`` (ISO-8601 text)
response ``status``       ``status`` (``COMPLETED`` ↔ ``completed`` …)
response ``result``       ``result`` (a non-text result is sent as JSON text)
response ``durationMs``   ``duration_ms`` (rounded to whole milliseconds)
========================  ==================================================

Guarantees: :func:`encode_request` and :func:`encode_response` give exactly
the bytes Jackson writes for the same Java record; a decoded request is
re-encoded to the same fields. Unknown fields are ignored (like
``@JsonIgnoreProperties(ignoreUnknown = true)``); a record the Java side
would refuse, or whose values do not fit this library's names, raises
:class:`~transport.errors.UndecodableMessageError`, which backends turn
into a dead letter carrying the reason and the exact bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final, Literal

from transport._spi.models import WorkRequest, WorkResponse, utcnow
from transport.errors import (
    InvalidMessageError,
    PayloadTooLargeError,
    TransportError,
    UndecodableMessageError,
    UnsupportedFeatureError,
)

if TYPE_CHECKING:
    from transport._spi.transport import Transport

__all__ = [
    "CACHE_POLICIES",
    "CODEC_NAME",
    "DELIVERY_METHODS",
    "HEADER_CACHE_KEY",
    "HEADER_CACHE_POLICY",
    "HEADER_DELIVERY_ADDRESS",
    "HEADER_DELIVERY_METHOD",
    "HEADER_FROM",
    "HEADER_MAX_AGE",
    "PRIORITY_LEVELS",
    "AgentEnsembleCodec",
    "AgentEnsembleResponder",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "format_duration",
    "is_agentensemble_request",
    "java_headers",
    "parse_duration",
]

#: The value of ``TransportConfig.request_codec`` that selects this codec.
CODEC_NAME: Final = "agentensemble"

#: AgentEnsemble priority names and the ``WorkRequest.priority`` each maps
#: to (0 = most urgent, as in a :class:`~transport.PriorityRequestQueue`).
PRIORITY_LEVELS: Final[dict[str, int]] = {"CRITICAL": 0, "HIGH": 1, "NORMAL": 2, "LOW": 3}
_PRIORITY_NAMES: Final = {level: name for name, level in PRIORITY_LEVELS.items()}

#: ``DeliveryMethod`` names of the Java side.
DELIVERY_METHODS: Final = (
    "WEBSOCKET",
    "QUEUE",
    "TOPIC",
    "WEBHOOK",
    "STORE",
    "BROADCAST_CLAIM",
    "NONE",
)
#: ``CachePolicy`` names of the Java side.
CACHE_POLICIES: Final = ("USE_CACHED", "FORCE_FRESH")

HEADER_FROM: Final = "agentensemble-from"
HEADER_DELIVERY_METHOD: Final = "agentensemble-delivery-method"
HEADER_DELIVERY_ADDRESS: Final = "agentensemble-delivery-address"
HEADER_CACHE_POLICY: Final = "agentensemble-cache-policy"
HEADER_CACHE_KEY: Final = "agentensemble-cache-key"
HEADER_MAX_AGE: Final = "agentensemble-max-age"
_TRACEPARENT: Final = "traceparent"
_TRACESTATE: Final = "tracestate"

_STATUS_TO_JAVA: Final = {"completed": "COMPLETED", "failed": "FAILED", "rejected": "REJECTED"}
_STATUS_FROM_JAVA: Final = {java: ours for ours, java in _STATUS_TO_JAVA.items()}


# -- durations ---------------------------------------------------------------
_ISO_DURATION = re.compile(
    r"([-+]?)P(?:([-+]?[0-9]+)D)?"
    r"(T(?:([-+]?[0-9]+)H)?(?:([-+]?[0-9]+)M)?(?:([-+]?[0-9]+)(?:[.,]([0-9]{0,9}))?S)?)?",
    re.IGNORECASE,
)


def parse_duration(value: object, field: str = "duration") -> timedelta:
    """A Java ``Duration`` as Jackson reads it: a JSON number of seconds
    (``30``, ``30.5``, ``30.000000000``) or an ISO-8601 text as
    ``Duration.parse`` takes it (``"PT30S"``, ``"P1DT2H"``, ``"PT-0.5S"``).
    Precision below a microsecond is dropped (``timedelta`` holds no more).

    Raises: UndecodableMessageError (not a duration, or out of range).
    """
    try:
        if isinstance(value, bool):
            raise ValueError("a boolean")
        if isinstance(value, int | float | Decimal):
            exact = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
            if not exact.is_finite():
                raise ValueError("not finite")
            # Whole microseconds, cut toward zero as Java cuts below a nanosecond.
            return timedelta(microseconds=int(exact.scaleb(6).to_integral_value(ROUND_DOWN)))
        if isinstance(value, str):
            match = _ISO_DURATION.fullmatch(value.strip())
            if match is None or (match.group(3) == "T") or value.strip().upper() in ("P", "-P"):
                raise ValueError("not an ISO-8601 duration")
            sign, days, _, hours, minutes, secs, frac = match.groups()
            if days is None and hours is None and minutes is None and secs is None:
                raise ValueError("not an ISO-8601 duration")
            seconds_part = int(secs or 0)
            micros = int((frac or "").ljust(9, "0")[:6]) if frac else 0
            if secs is not None and secs.startswith("-"):
                micros = -micros
            out = timedelta(
                days=int(days or 0),
                hours=int(hours or 0),
                minutes=int(minutes or 0),
                seconds=seconds_part,
                microseconds=micros,
            )
            return -out if sign == "-" else out
        raise ValueError(f"a JSON {type(value).__name__}")
    except (ValueError, OverflowError, InvalidOperation, TypeError) as exc:
        shown = repr(value)[:60]
        raise UndecodableMessageError(
            f"not a valid AgentEnsemble WorkRequest: {field}={shown} is not a Java Duration "
            f"(seconds as a number, or ISO-8601 like 'PT30S'): {exc}"
        ) from None


def format_duration(value: timedelta) -> str:
    """``value`` as Java's ``Duration.toString()`` writes it (``PT30S``,
    ``PT1H0.5S``, ``PT0S``), for headers; non-negative durations only.

    Raises: ValueError for a negative duration.
    """
    if value < timedelta(0):
        raise ValueError(f"negative duration {value!r}")
    total_us = value // timedelta(microseconds=1)
    seconds, micros = divmod(total_us, 1_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if total_us == 0:
        return "PT0S"
    out = "PT"
    if hours:
        out += f"{hours}H"
    if minutes:
        out += f"{minutes}M"
    if secs or micros:
        out += f"{secs}"
        if micros:
            out += "." + f"{micros:06d}".rstrip("0")
        out += "S"
    return out


def _jackson_duration(value: timedelta) -> str:
    """The JSON number Jackson writes for a non-negative ``Duration`` with
    ``WRITE_DURATIONS_AS_TIMESTAMPS`` on (its default): seconds with nine
    decimals (``DecimalUtils.toBigDecimal``), ``0.0`` for zero."""
    total_us = value // timedelta(microseconds=1)
    seconds, micros = divmod(total_us, 1_000_000)
    if seconds == 0 and micros == 0:
        return "0.0"
    return f"{seconds}.{micros * 1000:09d}"


def _refuse_constant(name: str) -> Any:
    # Jackson refuses NaN and Infinity tokens (ALLOW_NON_NUMERIC_NUMBERS is off).
    raise ValueError(f"{name} is not JSON")


def _loads(data: bytes | str) -> Any:
    """Parse JSON as Jackson would: decimals exact, no NaN/Infinity."""
    return json.loads(data, parse_float=Decimal, parse_constant=_refuse_constant)


# -- Jackson's JSON text ------------------------------------------------------
_SHORT_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\]')


def _escape(match: re.Match[str]) -> str:
    ch = match.group(0)
    short = _SHORT_ESCAPES.get(ch)
    # Jackson writes other control characters as \u00XX with upper-case hex.
    return short if short is not None else f"\\u{ord(ch):04X}"


def _jstring(value: str) -> str:
    """A JSON string as Jackson writes it: only ``"``, ``\\`` and control
    characters escaped; everything else (non-ASCII included) as is."""
    return '"' + _NEEDS_ESCAPE.sub(_escape, value) + '"'


def _jobject(fields: list[tuple[str, str | None]]) -> str:
    """An object of pre-rendered values, nulls left out
    (``@JsonInclude(NON_NULL)``), in the given order, no whitespace."""
    return "{" + ",".join(f"{_jstring(k)}:{v}" for k, v in fields if v is not None) + "}"


def _opt(value: str | None) -> str | None:
    return None if value is None else _jstring(value)


def _as_text(value: Any) -> str | None:
    """A payload or result for a Java ``String`` field: text as is, ``None``
    left out, any other JSON value as compact JSON text."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# -- requests -----------------------------------------------------------------
def java_headers(
    sender: str,
    *,
    delivery: tuple[str, str | None] | None = None,
    cache_policy: str | None = None,
    cache_key: str | None = None,
    max_age: timedelta | None = None,
) -> dict[str, str]:
    """The ``WorkRequest.headers`` that carry the AgentEnsemble-only fields
    of a request this library sends to a Java ensemble: ``from`` (required
    by the Java record), ``delivery`` as ``(method, address)`` (e.g.
    ``("TOPIC", "replies")``: where the Java ensemble produces the
    response), ``cachePolicy``, ``cacheKey`` and ``maxAge``.

    Raises: InvalidMessageError (an unknown method or policy, a negative
    ``max_age``).
    """
    headers = {HEADER_FROM: sender}
    if delivery is not None:
        method, address = delivery
        if method not in DELIVERY_METHODS:
            raise InvalidMessageError(
                f"delivery method {method!r} is not one of {DELIVERY_METHODS}"
            )
        headers[HEADER_DELIVERY_METHOD] = method
        if address is not None:
            headers[HEADER_DELIVERY_ADDRESS] = address
    if cache_policy is not None:
        if cache_policy not in CACHE_POLICIES:
            raise InvalidMessageError(
                f"cache policy {cache_policy!r} is not one of {CACHE_POLICIES}"
            )
        headers[HEADER_CACHE_POLICY] = cache_policy
    if cache_key is not None:
        headers[HEADER_CACHE_KEY] = cache_key
    if max_age is not None:
        if max_age < timedelta(0):
            raise InvalidMessageError("max_age must not be negative")
        headers[HEADER_MAX_AGE] = format_duration(max_age)
    return headers


def encode_request(request: WorkRequest, limit: int | None = None) -> bytes:
    """``request`` as the UTF-8 bytes Jackson writes for the same Java
    ``WorkRequest`` (see the module docstring for the mapping).

    ``deadline`` becomes the duration from ``enqueued_at`` (the enqueue
    template stamps it just before; else now), at least zero. A priority the
    caller never set is ``NORMAL`` (Java's default); otherwise 0 CRITICAL,
    1 HIGH, 2 NORMAL, 3 and above LOW. Not carried (the Java record has no
    place for them): ``reply_to`` (refused: the Java side answers per
    ``delivery``), ``ordering_key`` (it still keys the Kafka record),
    ``enqueued_at``, ``attempt`` and headers other than the ones above.

    Raises: InvalidMessageError (no ``agentensemble-from`` header, a
    ``reply_to``, a payload that is not text, a bad delivery method, cache
    policy or max age header), PayloadTooLargeError (over ``limit``).
    """
    headers = request.headers
    sender = headers.get(HEADER_FROM)
    if sender is None:
        raise InvalidMessageError(
            f"an AgentEnsemble request needs its sender: set header {HEADER_FROM!r} "
            "(transport.interop.agentensemble.java_headers builds them)"
        )
    if request.reply_to is not None:
        raise InvalidMessageError(
            "an AgentEnsemble ensemble answers per the request's delivery, not to a "
            f"delivery registry: leave reply_to unset and set {HEADER_DELIVERY_METHOD!r} / "
            f"{HEADER_DELIVERY_ADDRESS!r}"
        )
    if request.payload is not None and not isinstance(request.payload, str):
        raise InvalidMessageError(
            "an AgentEnsemble request carries its payload as text (context): "
            f"got {type(request.payload).__name__}; send json.dumps(payload) if the "
            "Java side expects JSON text"
        )
    if "priority" in request.model_fields_set:
        priority = _PRIORITY_NAMES.get(min(request.priority, 3), "LOW")
    else:
        priority = "NORMAL"
    deadline = None
    if request.deadline is not None:
        start = request.enqueued_at or utcnow()
        deadline = _jackson_duration(max(request.deadline - start, timedelta(0)))
    method = headers.get(HEADER_DELIVERY_METHOD, "WEBSOCKET")
    if method not in DELIVERY_METHODS:
        raise InvalidMessageError(f"header {HEADER_DELIVERY_METHOD}={method!r} is not a method")
    delivery = _jobject(
        [("method", _jstring(method)), ("address", _opt(headers.get(HEADER_DELIVERY_ADDRESS)))]
    )
    trace = None
    if _TRACEPARENT in headers or _TRACESTATE in headers:
        trace = _jobject(
            [
                ("traceparent", _opt(headers.get(_TRACEPARENT))),
                ("tracestate", _opt(headers.get(_TRACESTATE))),
            ]
        )
    policy = headers.get(HEADER_CACHE_POLICY)
    if policy is not None and policy not in CACHE_POLICIES:
        raise InvalidMessageError(f"header {HEADER_CACHE_POLICY}={policy!r} is not a policy")
    max_age = headers.get(HEADER_MAX_AGE)
    if max_age is not None:
        try:
            max_age = _jackson_duration(_non_negative(parse_duration(max_age, HEADER_MAX_AGE)))
        except (UndecodableMessageError, ValueError) as exc:
            raise InvalidMessageError(f"header {HEADER_MAX_AGE}: {exc}") from None
    text = _jobject(
        [
            ("requestId", _jstring(request.request_id)),
            ("from", _jstring(sender)),
            ("task", _jstring(request.task)),
            ("context", _opt(request.payload)),
            ("priority", _jstring(priority)),
            ("deadline", deadline),
            ("delivery", delivery),
            ("traceContext", trace),
            ("cachePolicy", _opt(policy)),
            ("cacheKey", _opt(headers.get(HEADER_CACHE_KEY))),
            ("maxAge", max_age),
        ]
    )
    data = text.encode("utf-8")
    if limit is not None and len(data) > limit:
        raise PayloadTooLargeError(len(data), limit)
    return data


def _non_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError("a negative duration")
    return value


def _refuse(reason: str) -> UndecodableMessageError:
    return UndecodableMessageError(f"not a valid AgentEnsemble WorkRequest: {reason}")


def _text(obj: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _refuse(f"{key} is missing (the Java record requires it)")
        return None
    if not isinstance(value, str):
        raise _refuse(f"{key} must be a string, got a JSON {type(value).__name__}")
    return value


def _enum(obj: dict[str, Any], key: str, names: tuple[str, ...] | list[str]) -> str | None:
    value = _text(obj, key)
    if value is not None and value not in names:
        raise _refuse(f"{key}={value[:60]!r} is not one of {', '.join(names)}")
    return value


def is_agentensemble_request(obj: object) -> bool:
    """Whether a parsed JSON value has the shape of an AgentEnsemble
    request: an object with ``requestId`` and neither of this library's
    ``request_id`` / ``schema_version`` (which every record it writes has)."""
    return (
        isinstance(obj, dict)
        and "requestId" in obj
        and "request_id" not in obj
        and "schema_version" not in obj
    )


def decode_request(
    data: bytes | str | dict[str, Any], *, now: datetime | None = None
) -> WorkRequest:
    """Parse an AgentEnsemble ``WorkRequest`` record (bytes, text or the
    parsed object). ``now`` is the arrival time (default: the current time):
    ``enqueued_at`` is set to it and ``deadline`` counts from it, because the
    Java record carries its deadline as a duration and no send time.

    Guarantees: unknown fields are ignored; ``priority`` missing is
    ``NORMAL``; the Java-only fields are kept in headers so that
    :func:`encode_request` writes the same record again.
    Raises: UndecodableMessageError with the reason (not JSON, not an
    object, a required field missing, a wrong type or enum name, a negative
    duration, an id, task or header value this library does not accept).
    """
    if isinstance(data, dict):
        obj: Any = data
    else:
        try:
            obj = _loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _refuse(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _refuse(f"a JSON {type(obj).__name__}, not an object")
    request_id = _text(obj, "requestId", required=True)
    sender = _text(obj, "from", required=True)
    task = _text(obj, "task", required=True)
    context = _text(obj, "context")
    priority = _enum(obj, "priority", list(PRIORITY_LEVELS)) or "NORMAL"
    arrival = now or utcnow()
    assert sender is not None  # required above
    headers: dict[str, str] = {HEADER_FROM: sender}
    deadline = None
    if obj.get("deadline") is not None:
        duration = parse_duration(obj["deadline"], "deadline")
        if duration < timedelta(0):
            raise _refuse("deadline is a negative duration")
        deadline = arrival + duration
    delivery = obj.get("delivery")
    if delivery is not None:
        if not isinstance(delivery, dict):
            raise _refuse("delivery must be an object")
        method = _enum(delivery, "method", DELIVERY_METHODS)
        if method is None:
            raise _refuse("delivery.method is missing (the Java record requires it)")
        headers[HEADER_DELIVERY_METHOD] = method
        address = _text(delivery, "address")
        if address is not None:
            headers[HEADER_DELIVERY_ADDRESS] = address
    trace = obj.get("traceContext")
    if trace is not None:
        if not isinstance(trace, dict):
            raise _refuse("traceContext must be an object")
        for key in (_TRACEPARENT, _TRACESTATE):
            value = _text(trace, key)
            if value is not None:
                headers[key] = value
    policy = _enum(obj, "cachePolicy", CACHE_POLICIES)
    if policy is not None:
        headers[HEADER_CACHE_POLICY] = policy
    cache_key = _text(obj, "cacheKey")
    if cache_key is not None:
        headers[HEADER_CACHE_KEY] = cache_key
    if obj.get("maxAge") is not None:
        max_age = parse_duration(obj["maxAge"], "maxAge")
        if max_age < timedelta(0):
            raise _refuse("maxAge is a negative duration")
        headers[HEADER_MAX_AGE] = format_duration(max_age)
    try:
        return WorkRequest(
            request_id=request_id,
            task=task,
            payload=context,
            priority=PRIORITY_LEVELS[priority],
            enqueued_at=arrival,
            deadline=deadline,
            headers=headers,
        )
    except TransportError as exc:
        # InvalidNameError / InvalidMessageError: a value valid in Java but
        # not here (an id with dots, a task with spaces, a header with CR/LF).
        raise _refuse(str(exc)) from None


# -- responses ----------------------------------------------------------------
def encode_response(response: WorkResponse) -> bytes:
    """``response`` as the UTF-8 bytes Jackson writes for the Java
    ``WorkResponse``: ``requestId``, ``status`` (upper case), ``result``
    (text; another JSON value as compact JSON text), ``error``,
    ``durationMs`` (whole milliseconds, rounded), nulls left out.
    ``completed_at`` has no Java field and is not carried.

    Raises: InvalidMessageError (a result JSON cannot carry).
    """
    try:
        result = _as_text(response.result)
    except ValueError as exc:
        raise InvalidMessageError(f"result cannot be sent as text: {exc}") from None
    duration = None if response.duration_ms is None else str(round(response.duration_ms))
    return _jobject(
        [
            ("requestId", _jstring(response.request_id)),
            ("status", _jstring(_STATUS_TO_JAVA[response.status])),
            ("result", _opt(result)),
            ("error", _opt(response.error)),
            ("durationMs", duration),
        ]
    ).encode("utf-8")


def decode_response(data: bytes | str, *, now: datetime | None = None) -> WorkResponse:
    """Parse a Java ``WorkResponse`` record (what a Java ensemble delivers
    to a ``TOPIC`` address). ``result`` stays text; ``completed_at`` is
    ``now`` (default: the current time); unknown fields are ignored.

    Raises: UndecodableMessageError (not JSON, a missing ``requestId`` or
    ``status``, a status other than COMPLETED, FAILED, REJECTED).
    """
    try:
        obj = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UndecodableMessageError(f"not a valid AgentEnsemble WorkResponse: {exc}") from None
    if not isinstance(obj, dict):
        raise UndecodableMessageError("not a valid AgentEnsemble WorkResponse: not an object")
    try:
        status = obj.get("status")
        if status not in _STATUS_FROM_JAVA:
            raise InvalidMessageError(f"status {status!r} is not COMPLETED, FAILED or REJECTED")
        for key in ("requestId", "result", "error"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise InvalidMessageError(f"{key} must be a string")
        duration = obj.get("durationMs")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int)):
            raise InvalidMessageError("durationMs must be an integer")
        if obj.get("requestId") is None:
            raise InvalidMessageError("requestId is missing")
        return WorkResponse(
            request_id=obj["requestId"],
            status=_STATUS_FROM_JAVA[status],
            result=obj.get("result"),
            error=obj.get("error"),
            duration_ms=None if duration is None else float(duration),
            completed_at=now or utcnow(),
        )
    except TransportError as exc:
        raise UndecodableMessageError(f"not a valid AgentEnsemble WorkResponse: {exc}") from None


# -- the codec a transport selects --------------------------------------------
@dataclass(frozen=True)
class AgentEnsembleCodec:
    """The request codec of ``TransportConfig.request_codec = "agentensemble"``.

    A request queue with it writes every request as an AgentEnsemble record
    (:func:`encode_request`) and reads both dialects: a body of the
    AgentEnsemble shape (:func:`is_agentensemble_request`) through
    :func:`decode_request`, any other body as this library's own record.
    """

    name: Literal["agentensemble"] = CODEC_NAME

    def encode_request(self, request: WorkRequest, limit: int | None = None) -> bytes:
        """See :func:`encode_request`."""
        return encode_request(request, limit)

    def decode_request(self, data: bytes | str) -> WorkRequest | None:
        """The request if ``data`` is an AgentEnsemble record, ``None`` if
        it is not of that shape (then the caller decodes it as its own).

        Raises: UndecodableMessageError (of the shape, but invalid).
        """
        raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
        # The common case, a native body, is not parsed twice.
        if raw.lstrip()[:1] != b"{" or b'"requestId"' not in raw:
            return None
        try:
            obj = _loads(data)
        except (ValueError, UnicodeDecodeError):
            return None  # the library's own decoder gives the reason
        if not is_agentensemble_request(obj):
            return None
        return decode_request(obj)


#: How :class:`AgentEnsembleResponder` sends a record: ``(topic, key, value)``.
Publish = Callable[[str, bytes, bytes], Awaitable[None]]


class AgentEnsembleResponder:
    """The response hook of an :class:`~transport.Ensemble` that serves
    AgentEnsemble callers (``Ensemble(..., respond=AgentEnsembleResponder(transport))``).

    For a request that came in the AgentEnsemble shape (it has the
    ``agentensemble-from`` header) with delivery method ``TOPIC``, it writes
    the Java ``WorkResponse`` record (:func:`encode_response`) keyed by the
    request id to the topic the delivery address names, as the Java
    ``KafkaTopicDelivery`` does, and returns ``True`` (the response is
    delivered). Delivery method ``NONE`` is answered by nothing (``True``).
    Other requests return ``False`` and go the usual way (``reply_to``).

    Guarantees: the Ensemble acks a request only after this returned, so a
    crash before means a redelivery and the response may be written twice
    (at-least-once; the Java side's ``IdempotencyGuard`` / result store
    deduplicates by ``requestId``).
    Raises: UnsupportedFeatureError for another delivery method (WEBSOCKET,
    QUEUE, WEBHOOK, STORE, BROADCAST_CLAIM: not reachable from here; the
    Ensemble dead-letters such a request), TransientTransportError.
    """

    def __init__(self, transport: Transport | None = None, *, publish: Publish | None = None):
        if publish is None:
            if transport is None:
                raise ValueError("AgentEnsembleResponder needs a transport or publish=")
            publish = transport.publish_foreign
        self._publish = publish

    async def __call__(self, request: WorkRequest, response: WorkResponse) -> bool:
        headers = request.headers
        if HEADER_FROM not in headers:
            return False
        method = headers.get(HEADER_DELIVERY_METHOD, "WEBSOCKET")
        if method == "NONE":
            return True
        address = headers.get(HEADER_DELIVERY_ADDRESS)
        if method != "TOPIC" or not address:
            raise UnsupportedFeatureError(
                f"request {request.request_id}: AgentEnsemble delivery {method} "
                f"(address {address!r}) cannot be answered from here; only TOPIC with an "
                "address (a Kafka topic) and NONE are"
            )
        await self._publish(address, request.request_id.encode("utf-8"), encode_response(response))
        return True
