"""The AgentEnsemble (Java) codec: records built byte for byte as the Java
project's Kafka transport writes them (a default ``ObjectMapper`` with the
Java time module: declaration order, nulls left out, enums by name, a
``Duration`` as seconds with nine decimals) are decoded, answered, and
written back exactly; the runtime answers a Java caller per its delivery."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from transport import (
    Ensemble,
    TaskContext,
    TransportConfig,
    UndecodableMessageError,
    UnsupportedFeatureError,
    WorkRequest,
    WorkResponse,
    connect,
)
from transport.errors import InvalidMessageError
from transport.interop import agentensemble as ae
from transport.kit import decode_request, encode

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

#: new WorkRequest("req-42", "ensemble-b", "check-inventory", "Check tomatoes",
#:   Priority.HIGH, Duration.ofSeconds(30), new DeliverySpec(TOPIC, "agentensemble.replies"),
#:   new TraceContext(TRACEPARENT, "vendor=abc"), CachePolicy.USE_CACHED, "cache-42",
#:   Duration.ofMinutes(5)) through KafkaRequestQueue's mapper.
JAVA_FULL = (
    b'{"requestId":"req-42","from":"ensemble-b","task":"check-inventory",'
    b'"context":"Check tomatoes","priority":"HIGH","deadline":30.000000000,'
    b'"delivery":{"method":"TOPIC","address":"agentensemble.replies"},'
    b'"traceContext":{"traceparent":"' + TRACEPARENT.encode() + b'","tracestate":"vendor=abc"},'
    b'"cachePolicy":"USE_CACHED","cacheKey":"cache-42","maxAge":300.000000000}'
)
#: new WorkRequest("req-1", "ensemble-a", "task-1", "context", null, ... null):
#: the record's constructor fills in priority NORMAL and delivery WEBSOCKET.
JAVA_MINIMAL = (
    b'{"requestId":"req-1","from":"ensemble-a","task":"task-1","context":"context",'
    b'"priority":"NORMAL","delivery":{"method":"WEBSOCKET"}}'
)


def test_a_full_java_record_maps_to_a_work_request() -> None:
    request = ae.decode_request(JAVA_FULL, now=NOW)
    assert request.request_id == "req-42"
    assert request.task == "check-inventory"
    assert request.payload == "Check tomatoes"
    assert request.priority == 1  # HIGH
    assert request.enqueued_at == NOW
    assert request.deadline == NOW + timedelta(seconds=30)
    assert request.reply_to is None
    assert request.headers == {
        "agentensemble-from": "ensemble-b",
        "agentensemble-delivery-method": "TOPIC",
        "agentensemble-delivery-address": "agentensemble.replies",
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=abc",
        "agentensemble-cache-policy": "USE_CACHED",
        "agentensemble-cache-key": "cache-42",
        "agentensemble-max-age": "PT5M",
    }


@pytest.mark.parametrize("body", [JAVA_FULL, JAVA_MINIMAL], ids=["full", "minimal"])
def test_a_decoded_java_record_is_written_back_byte_for_byte(body: bytes) -> None:
    request = ae.decode_request(body, now=NOW)
    assert ae.encode_request(request) == body


@pytest.mark.parametrize(
    ("name", "level"), [("CRITICAL", 0), ("HIGH", 1), ("NORMAL", 2), ("LOW", 3)]
)
def test_priority_names_map_to_levels_both_ways(name: str, level: int) -> None:
    body = JAVA_MINIMAL.replace(b'"NORMAL"', f'"{name}"'.encode())
    request = ae.decode_request(body, now=NOW)
    assert request.priority == level
    assert ae.encode_request(request) == body


def test_a_python_callers_request_is_what_jackson_writes() -> None:
    headers = ae.java_headers(
        "front-desk",
        delivery=("TOPIC", "agentensemble.replies"),
        cache_policy="FORCE_FRESH",
        cache_key="pasta",
        max_age=timedelta(seconds=1.5),
    )
    request = WorkRequest(
        request_id="3f9a1c2e-7b4d-4e8f-9a6b-1c2d3e4f5a6b",
        task="prepare-meal",
        payload='Make pasta, "al dente"\n\u00e9\u4e2d\x01',
        priority=0,
        enqueued_at=NOW,
        deadline=NOW + timedelta(minutes=5, microseconds=250),
        headers={**headers, "traceparent": TRACEPARENT, "x-other": "dropped"},
    )
    # new WorkRequest(id, "front-desk", "prepare-meal", context, CRITICAL,
    #   Duration.ofMinutes(5).plusNanos(250_000), new DeliverySpec(TOPIC, ...),
    #   new TraceContext(TRACEPARENT, null), FORCE_FRESH, "pasta", Duration.ofMillis(1500)):
    # Jackson escapes '"' and control characters (\u00XX upper-case hex) and
    # writes non-ASCII as UTF-8.
    expected = (
        '{"requestId":"3f9a1c2e-7b4d-4e8f-9a6b-1c2d3e4f5a6b","from":"front-desk",'
        '"task":"prepare-meal","context":"Make pasta, \\"al dente\\"\\n\u00e9\u4e2d\\u0001",'
        '"priority":"CRITICAL","deadline":300.000250000,'
        '"delivery":{"method":"TOPIC","address":"agentensemble.replies"},'
        '"traceContext":{"traceparent":"' + TRACEPARENT + '"},'
        '"cachePolicy":"FORCE_FRESH","cacheKey":"pasta","maxAge":1.500000000}'
    ).encode("utf-8")
    assert ae.encode_request(request) == expected


def test_strings_are_escaped_as_jackson_escapes_them() -> None:
    # Short escapes for \b \t \n \f \r, \u00XX (upper-case hex) for other
    # control characters; DEL, '/', U+2028 and non-ASCII are written as they are.
    request = WorkRequest(
        request_id="r1",
        task="t",
        payload="\b\t\n\f\r\x1f\x7f/\u2028\U0001f345\\",
        headers=ae.java_headers("py"),
    )
    expected = (
        '{"requestId":"r1","from":"py","task":"t",'
        '"context":"\\b\\t\\n\\f\\r\\u001F\x7f/\u2028\U0001f345\\\\",'
        '"priority":"NORMAL","delivery":{"method":"WEBSOCKET"}}'
    ).encode("utf-8")
    assert ae.encode_request(request) == expected
    assert ae.decode_request(expected, now=NOW).payload == request.payload


def test_an_unset_priority_is_normal_and_a_level_past_low_is_low() -> None:
    base = WorkRequest(request_id="r1", task="t", headers=ae.java_headers("py"))
    assert b'"priority":"NORMAL"' in ae.encode_request(base)
    low = WorkRequest(request_id="r1", task="t", priority=9, headers=ae.java_headers("py"))
    assert b'"priority":"LOW"' in ae.encode_request(low)
    # Without a delivery the Java record's default is written, as Jackson does.
    assert ae.encode_request(base) == (
        b'{"requestId":"r1","from":"py","task":"t","priority":"NORMAL",'
        b'"delivery":{"method":"WEBSOCKET"}}'
    )


def test_unknown_fields_are_ignored() -> None:
    body = (
        b'{"requestId":"req-99","from":"ensemble-x","task":"do-something",'
        b'"futureField":"ignored-value","anotherFutureField":999,'
        b'"delivery":{"method":"NONE","extra":[1,2]},"traceContext":{"baggage":"k=v"}}'
    )
    request = ae.decode_request(body, now=NOW)
    assert request.request_id == "req-99"
    assert request.priority == 2  # missing: NORMAL, as the Java record defaults it
    assert request.headers == {
        "agentensemble-from": "ensemble-x",
        "agentensemble-delivery-method": "NONE",
    }


@pytest.mark.parametrize(
    ("wire", "seconds"),
    [
        ("30.000000000", 30.0),
        ("0.0", 0.0),
        ("30", 30.0),
        ("0.000500000", 0.0005),
        ('"PT30S"', 30.0),
        ('"PT1H0.5S"', 3600.5),
        ('"P1DT2M"', 86520.0),
        ('"pt0.000001s"', 0.000001),
    ],
)
def test_durations_are_read_as_jackson_reads_them(wire: str, seconds: float) -> None:
    body = JAVA_MINIMAL[:-1] + f',"deadline":{wire}}}'.encode()
    request = ae.decode_request(body, now=NOW)
    assert request.deadline == NOW + timedelta(seconds=seconds)


def test_duration_text_is_javas() -> None:
    assert ae.format_duration(timedelta(0)) == "PT0S"
    assert ae.format_duration(timedelta(hours=25, seconds=0.5)) == "PT25H0.5S"
    assert ae.format_duration(timedelta(minutes=5)) == "PT5M"
    assert ae.parse_duration("PT-0.5S") == timedelta(seconds=-0.5)
    assert ae.parse_duration("-PT1M") == timedelta(minutes=-1)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"requestId":"r1","from":"a","task":"t","priority":"URGENT"}', "priority"),
        (b'{"requestId":"r1","from":"a","task":"t","priority":3}', "priority"),
        (b'{"requestId":"r1","task":"t"}', "from is missing"),
        (b'{"requestId":"r.1","from":"a","task":"t"}', "request id"),
        (b'{"requestId":"r1","from":"a","task":"two words"}', "task"),
        (b'{"requestId":"r1","from":"a","task":"t","deadline":"soon"}', "deadline"),
        (b'{"requestId":"r1","from":"a","task":"t","deadline":-1.0}', "negative"),
        (b'{"requestId":"r1","from":"a","task":"t","deadline":NaN}', "not JSON"),
        (b'{"requestId":"r1","from":"a","task":"t","delivery":{"method":"PIGEON"}}', "method"),
        (b'{"requestId":"r1","from":"a","task":"t","delivery":{}}', "delivery.method"),
        (b'{"requestId":"r1","from":"a","task":"t","cachePolicy":"SOMETIMES"}', "cachePolicy"),
        (b'{"requestId":"r1","from":"a","task":"t","context":{"k":1}}', "context"),
        (b'{"requestId":"r1","from":"a\\nb","task":"t"}', "CR, LF"),
        (b"[1,2]", "not an object"),
        (b"\xff{", "not JSON"),
    ],
)
def test_bad_java_records_are_refused_with_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(UndecodableMessageError, match="AgentEnsemble") as caught:
        ae.decode_request(body, now=NOW)
    assert reason in str(caught.value)


def test_the_codec_reads_java_bodies_only_when_selected() -> None:
    # Without the codec (the default), a Java record is refused as before:
    # its priority is a name, not a number.
    with pytest.raises(UndecodableMessageError):
        decode_request(JAVA_FULL, "topic", 0, 7)
    codec = ae.AgentEnsembleCodec()
    assert decode_request(JAVA_FULL, "topic", 0, 7, codec=codec).request_id == "req-42"
    # A native body on a queue with the codec is read as before.
    native = WorkRequest(request_id="n1", task="t", payload={"k": [1]}, priority=5)
    decoded = decode_request(encode(native), "topic", 0, 8, codec=codec)
    assert decoded == native
    # A native body that happens to hold the text "requestId" is still native.
    tricky = WorkRequest(request_id="n2", task="t", payload={"requestId": "x"})
    assert decode_request(encode(tricky), "topic", 0, 9, codec=codec) == tricky


def test_requests_the_java_record_cannot_carry_are_refused_at_encode() -> None:
    with pytest.raises(InvalidMessageError, match="agentensemble-from"):
        ae.encode_request(WorkRequest(task="t"))
    with pytest.raises(InvalidMessageError, match="reply_to"):
        ae.encode_request(WorkRequest(task="t", reply_to="inbox", headers=ae.java_headers("py")))
    with pytest.raises(InvalidMessageError, match="text"):
        ae.encode_request(WorkRequest(task="t", payload={"k": 1}, headers=ae.java_headers("py")))
    with pytest.raises(InvalidMessageError, match="delivery method"):
        ae.java_headers("py", delivery=("CARRIER", None))


def test_responses_are_what_jackson_writes() -> None:
    # new WorkResponse("req-42", "COMPLETED", "Meal prepared", null, 25000L)
    done = WorkResponse(request_id="req-42", result="Meal prepared", duration_ms=25000.2)
    assert ae.encode_response(done) == (
        b'{"requestId":"req-42","status":"COMPLETED","result":"Meal prepared","durationMs":25000}'
    )
    failed = WorkResponse(request_id="req-2", status="failed", error="Something broke")
    assert ae.encode_response(failed) == (
        b'{"requestId":"req-2","status":"FAILED","error":"Something broke"}'
    )
    structured = WorkResponse(request_id="r", result={"dish": "soup", "n": [1, 2]})
    assert ae.encode_response(structured) == (
        b'{"requestId":"r","status":"COMPLETED","result":"{\\"dish\\":\\"soup\\",\\"n\\":[1,2]}"}'
    )


def test_java_responses_are_read() -> None:
    body = b'{"requestId":"req-99","status":"REJECTED","error":"busy","durationMs":12,"x":1}'
    response = ae.decode_response(body, now=NOW)
    assert (response.request_id, response.status, response.error) == ("req-99", "rejected", "busy")
    assert response.duration_ms == 12.0 and response.completed_at == NOW
    with pytest.raises(UndecodableMessageError, match="status"):
        ae.decode_response(b'{"requestId":"r","status":"DONE"}')


# -- the runtime on memory:// ---------------------------------------------------
class Published:
    """A stand-in for ``Transport.publish_foreign``: records what was sent."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self.arrived = asyncio.Event()

    async def __call__(self, topic: str, key: bytes, value: bytes) -> None:
        self.records.append((topic, key, value))
        self.arrived.set()


async def test_an_ensemble_answers_a_java_request_on_its_delivery_topic() -> None:
    config = TransportConfig(url="memory://", request_codec="agentensemble")
    async with await connect(config) as transport:
        published = Published()
        kitchen = Ensemble(
            "kitchen",
            transport=transport,
            concurrency=1,
            advertise=False,
            respond=ae.AgentEnsembleResponder(publish=published),
        )
        seen: list[WorkRequest] = []

        @kitchen.task("check-inventory")
        async def check(ctx: TaskContext) -> str:
            seen.append(ctx.request)
            return f"checked: {ctx.payload}"

        # What the Java side writes (the codec's enqueue writes those bytes:
        # see test_a_decoded_java_record_is_written_back_byte_for_byte).
        java = ae.decode_request(JAVA_FULL.replace(b"30.000000000", b"3600.000000000"))
        queue = transport.request_queue("kitchen")
        await queue.enqueue(java)
        async with kitchen.serving():
            await asyncio.wait_for(published.arrived.wait(), 20)
        assert seen[0].headers["traceparent"] == TRACEPARENT
        [(topic, key, value)] = published.records
        assert (topic, key) == ("agentensemble.replies", b"req-42")
        response = ae.decode_response(value)
        assert (response.status, response.result) == ("completed", "checked: Check tomatoes")
        assert value.startswith(
            b'{"requestId":"req-42","status":"COMPLETED","result":"checked: Check tomatoes",'
            b'"durationMs":'
        )
        assert kitchen.counts["completed"] == 1


async def test_a_java_request_whose_response_cannot_be_delivered_is_dead_lettered() -> None:
    config = TransportConfig(url="memory://", request_codec="agentensemble")
    async with await connect(config) as transport:
        published = Published()
        ens = Ensemble(
            "hooks",
            transport=transport,
            concurrency=1,
            advertise=False,
            respond=ae.AgentEnsembleResponder(publish=published),
        )
        ran = asyncio.Event()

        @ens.task("t")
        async def handler(ctx: TaskContext) -> str:
            ran.set()
            return "done"

        queue = transport.request_queue("hooks")
        await queue.enqueue(
            WorkRequest(
                request_id="w1",
                task="t",
                headers=ae.java_headers("java-side", delivery=("WEBHOOK", "https://x/hook")),
            )
        )
        async with ens.serving():
            await asyncio.wait_for(ran.wait(), 20)
            for _ in range(200):
                if await queue.dead_letters():
                    break
                await asyncio.sleep(0.05)
        [dead] = await queue.dead_letters()
        assert dead.request_id == "w1" and "WEBHOOK" in dead.error
        assert published.records == []


async def test_native_requests_on_a_codec_transport_still_use_reply_to() -> None:
    responder_calls: list[str] = []

    async def respond(request: WorkRequest, response: WorkResponse) -> bool:
        responder_calls.append(request.request_id)
        return await ae.AgentEnsembleResponder(publish=Published())(request, response)

    async with await connect("memory://") as transport:
        ens = Ensemble("plain", transport=transport, concurrency=1, respond=respond)

        @ens.task("t")
        async def handler(ctx: TaskContext) -> Any:
            return ctx.payload

        registry = transport.delivery_registry("inbox")
        pending = await registry.register("p1")
        await transport.request_queue("plain").enqueue(
            WorkRequest(request_id="p1", task="t", payload={"a": 1}, reply_to="inbox")
        )
        async with ens.serving():
            response = await pending.result(timeout=20)
        assert response.result == {"a": 1}
        assert responder_calls == ["p1"]


async def test_the_codec_is_refused_where_the_backend_does_not_read_it(tmp_path: Any) -> None:
    config = TransportConfig(url=f"sqlite:///{tmp_path}/q.db", request_codec="agentensemble")
    async with await connect(config) as transport:
        with pytest.raises(UnsupportedFeatureError, match="request_codec"):
            transport.request_queue("q")
