"""Provisioning and ``doctor`` on ``pulsar://`` without ``admin_url``
(pulsar-lite has no admin API: only a metrics endpoint). What cannot be
looked at or set without it is reported, never claimed."""

from __future__ import annotations

import json
from urllib.parse import unquote

import pytest

from transport import ProvisionPlan, WorkRequest, connect
from transport.errors import UnsupportedFeatureError
from transport.testing._unreachable_suite import closed_port

from .conftest import make_config

_PLAN = ProvisionPlan(
    queues={"orders": 2, "mail": 1},
    delivery_registries=["inbox"],
    capability_registry=True,
    event_streams=["audit"],
)


async def test_without_admin_url_doctor_says_retention_was_not_checked(pulsar_url: str) -> None:
    transport = await connect(make_config(pulsar_url))
    try:
        report = await transport.doctor(_PLAN)
    finally:
        await transport.aclose()
    assert report.ok
    [finding] = report.findings
    assert finding.severity == "warning"
    assert "retention and deduplication not checked" in finding.finding
    assert "admin_url" in finding.fix and finding.guarantee


async def test_doctor_on_a_broker_that_does_not_answer_reports_an_error() -> None:
    """Without an admin API the doctor asked nothing, and a closed port
    got "no guarantee is void": the broker is asked first."""
    transport = await connect(make_config(f"pulsar://127.0.0.1:{closed_port()}"))
    try:
        report = await transport.doctor(_PLAN)
    finally:
        await transport.aclose()
    assert not report.ok
    [finding] = report.findings
    assert finding.severity == "error"
    assert "did not answer" in finding.finding
    assert finding.guarantee == "every guarantee (nothing could be checked)"


async def test_without_admin_url_provision_ensures_every_topic_and_the_queue_subscription(
    pulsar_url: str,
) -> None:
    transport = await connect(make_config(pulsar_url))
    try:
        with pytest.raises(UnsupportedFeatureError, match="admin_url"):
            await transport.missing(_PLAN)
        dry = await transport.provision(_PLAN, dry_run=True)
        assert {s.status for s in dry} == {"unknown"}
        steps = await transport.provision(_PLAN)
        assert {s.status for s in steps} == {"ensured"}
        assert len(steps) == 6  # two levels, one queue, two registries, one stream
        # The provisioned queue is usable, and from another connection.
        queue = transport.request_queue("mail")
        await queue.enqueue(WorkRequest(task="t", request_id="r1"))
    finally:
        await transport.aclose()
    transport = await connect(make_config(pulsar_url, namespace=transport.config.namespace))
    try:
        delivery = await transport.request_queue("mail").poll(timeout=20)
        assert delivery is not None and delivery.request.request_id == "r1"
        await delivery.ack()
    finally:
        await transport.aclose()


class _AdminStandIn:
    """A stand-in for the Pulsar admin REST API (pulsar-lite has none): it
    records the calls and answers like Apache Pulsar's documented endpoints
    (list topics, create a non-partitioned topic, topic retention and
    deduplication). It proves what the library asks for, not what a broker
    does with it."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.calls: list[tuple[str, str, object]] = []
        self.topics: set[str] = set()
        self.retention: dict[str, dict[str, int]] = {}
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, body: object, code: int = 200) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code if data or code != 200 else 204)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                path = unquote(self.path.split("?")[0].removeprefix("/admin/v2/persistent/"))
                stand_in.calls.append((method, path, body))
                parts = path.split("/")
                if method == "GET" and len(parts) == 2:
                    return self._answer(sorted(stand_in.topics))
                topic = "persistent://" + "/".join(parts[:3])
                if method == "PUT" and len(parts) == 3:
                    if topic in stand_in.topics:
                        return self._answer({"reason": "exists"}, 409)
                    stand_in.topics.add(topic)
                    return self._answer(None)
                if parts[3:] == ["retention"] and method == "POST":
                    stand_in.retention[topic] = body  # type: ignore[assignment]
                    return self._answer(None)
                if parts[3:] == ["retention"] and method == "GET":
                    return self._answer(stand_in.retention.get(topic, {}))
                if parts[3:] == ["deduplicationEnabled"]:
                    return self._answer(True)
                return self._answer({"reason": "not found"}, 404)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_POST(self) -> None:
                self._handle("POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_with_admin_url_provision_sets_infinite_retention_on_reader_only_topics(
    pulsar_url: str,
) -> None:
    admin = _AdminStandIn()
    config = make_config(pulsar_url)
    options = {
        **config.options,
        "admin_url": admin.url,
        "stream_retention_minutes": {"audit": 90},
    }
    config = config.model_copy(update={"options": options})
    transport = await connect(config)
    try:
        assert transport.capabilities.inspect_without_create
        missing = await transport.missing(_PLAN)
        assert len(missing) == 6 and admin.topics == set()
        steps = await transport.provision(_PLAN)
        assert {s.status for s in steps} == {"created"}
        wanted = {t for s in steps for t in s.broker_objects}
        assert admin.topics == wanted
        queue_topics = {
            t
            for t in wanted
            if ".q." in t and not t.endswith(("__dlq", "__attempts", "__checkpoint"))
        }
        assert len(queue_topics) == 3  # orders__p0, orders__p1, mail
        # Each registry has a checkpoint topic beside its keyed topic (read
        # by readers only, its last message only: kept without a time limit,
        # 64 MB at most, below).
        base = f"persistent://public/default/{config.namespace}"
        assert {
            f"{base}.kv.delivery.inbox",
            f"{base}.kv.delivery.inbox__checkpoint",
            f"{base}.kv.capability.capabilities",
            f"{base}.kv.capability.capabilities__checkpoint",
            # A queue's hand-out counts, and the checkpoints of workers' views of them.
            f"{base}.q.mail__attempts",
            f"{base}.q.mail__attempts__checkpoint",
        } <= wanted
        infinite = {"retentionTimeInMinutes": -1, "retentionSizeInMB": -1}
        audit = next(t for t in wanted if t.endswith(".log.audit"))
        assert admin.retention.pop(audit) == {"retentionTimeInMinutes": 90, "retentionSizeInMB": -1}
        checkpoints = {t for t in wanted if t.endswith("__checkpoint")}
        assert len(checkpoints) == 5  # two registries, three queues' hand-out counts
        for topic in checkpoints:
            assert admin.retention.pop(topic) == {
                "retentionTimeInMinutes": -1,
                "retentionSizeInMB": 64,
            }
        assert admin.retention == dict.fromkeys(
            wanted - queue_topics - checkpoints - {audit}, infinite
        )
        admin.retention[audit] = {"retentionTimeInMinutes": 90, "retentionSizeInMB": -1}
        for topic in checkpoints:
            admin.retention[topic] = {"retentionTimeInMinutes": -1, "retentionSizeInMB": 64}
        assert await transport.missing(_PLAN) == []
        assert (await transport.doctor(_PLAN)).ok
        # An operator shortens the retention of a registry: doctor says so.
        registry = next(t for t in wanted if t.endswith(".kv.delivery.inbox"))
        admin.retention[registry] = {"retentionTimeInMinutes": 60, "retentionSizeInMB": 10}
        report = await transport.doctor(_PLAN)
        assert not report.ok
        [error] = [f for f in report.findings if f.severity == "error"]
        assert error.subject == registry and "60 min" in error.finding
    finally:
        await transport.aclose()
        admin.close()
