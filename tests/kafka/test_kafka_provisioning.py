"""Provisioning, read-only commands and ``doctor`` on the dev broker.

Everything is read back with a raw ``AdminClient`` (topic lists,
``describe_configs``), never through the library.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource
from confluent_kafka.cimpl import NewTopic

from transport import TransportConfig, WorkRequest, connect
from transport.cli import main
from transport.errors import ConfigurationError, PermanentTransportError
from transport_kafka import KafkaTransport
from transport_kafka._config import KafkaOptions, KafkaSettings

from .conftest import TEST_OPTIONS


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def _topics(admin: AdminClient) -> set[str]:
    return set(admin.list_topics(timeout=10).topics)


def _configs(admin: AdminClient, topic: str) -> dict[str, str]:
    [future] = admin.describe_configs([ConfigResource("topic", topic)]).values()
    return {k: v.value for k, v in future.result(10).items()}


@pytest.fixture
def cli_env(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A fresh namespace for the CLI (``TRANSPORT_*`` environment)."""
    namespace = f"p{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TRANSPORT_URL", f"kafka://{kafka_bootstrap}")
    monkeypatch.setenv("TRANSPORT_NAMESPACE", namespace)
    options = {**TEST_OPTIONS, "stream_retention_ms": {"short": 3_600_000}}
    monkeypatch.setenv("TRANSPORT_OPTIONS", json.dumps(options))
    return kafka_bootstrap, namespace


def _settings(namespace: str) -> KafkaSettings:
    return KafkaSettings("unused:9092", namespace, "workers", KafkaOptions())


_PLAN_ARGS = [
    "--queue",
    "orders:2",
    "--queue",
    "mail",
    "--registry",
    "inbox",
    "--capabilities",
    "--stream",
    "audit",
    "--stream",
    "short",
]


def _plan_topics(namespace: str) -> set[str]:
    s = _settings(namespace)
    out: set[str] = set()
    for queue in ("orders__p0", "orders__p1", "mail"):
        t = s.queue_topics(queue)
        out |= {t.requests, t.state, t.dlq}
    for kind, name in (("delivery", "inbox"), ("capability", "capabilities")):
        out |= {s.registry_topic(kind, name), s.registry_checkpoint_topic(kind, name)}
    out |= {s.stream_topic("audit"), s.stream_topic("short")}
    return out


def test_read_only_commands_on_an_empty_broker_create_nothing(
    cli_env: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap, _ = cli_env
    admin = _admin(bootstrap)
    before = _topics(admin)
    for argv, what in [
        (["stats", "typo"], "queue 'typo' does not exist"),
        (["stats", "typo", "--levels", "3"], "queue 'typo__p2' does not exist"),
        (["dead-letters", "list", "typo"], "queue 'typo' does not exist"),
        (["dead-letters", "requeue", "typo"], "queue 'typo' does not exist"),
        (["pending", "inbox"], "delivery registry 'inbox' does not exist"),
        (["capabilities"], "capability registry 'capabilities' does not exist"),
    ]:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert what in err, (argv, err)
    assert main(["health"]) == 0
    capsys.readouterr()
    assert _topics(admin) == before, "a read-only command created topics"


def test_a_registry_without_its_checkpoint_topic_is_reported_and_nothing_is_created(
    cli_env: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # A registry topic made by an earlier release (or an operator), without
    # the checkpoint topic: the read-only command names what is missing and
    # creates nothing; provision creates the checkpoint topic, compacted.
    bootstrap, namespace = cli_env
    admin = _admin(bootstrap)
    s = _settings(namespace)
    registry = s.registry_topic("delivery", "inbox")
    checkpoint = s.registry_checkpoint_topic("delivery", "inbox")
    assert checkpoint == f"{registry}.checkpoint"
    [future] = admin.create_topics(
        [NewTopic(registry, 1, 1, config={"cleanup.policy": "compact"})]
    ).values()
    future.result(10)
    before = _topics(admin)
    assert main(["pending", "inbox"]) == 1
    err = capsys.readouterr().err
    assert f"delivery registry 'inbox' does not exist (missing: {checkpoint})" in err, err
    assert _topics(admin) == before, "a read-only command created topics"

    assert main(["--json", "provision", "--registry", "inbox"]) == 0
    [step] = json.loads(capsys.readouterr().out)
    assert step["status"] == "created" and step["missing_objects"] == [checkpoint], step
    assert _configs(admin, checkpoint).get("cleanup.policy") == "compact"
    assert main(["--json", "pending", "inbox"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    # Without a plan, doctor finds the checkpoint topic by its name.
    assert main(["--json", "doctor"]) == 0
    subjects = {f["subject"] for f in json.loads(capsys.readouterr().out)["findings"]}
    assert {registry, checkpoint} <= subjects


def test_provision_dry_run_creates_nothing_then_provision_creates_idempotently(
    cli_env: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap, namespace = cli_env
    admin = _admin(bootstrap)
    wanted = _plan_topics(namespace)
    before = _topics(admin)
    assert not wanted & before

    assert main(["--json", "provision", "--dry-run", *_PLAN_ARGS]) == 0
    steps = json.loads(capsys.readouterr().out)
    assert {s["status"] for s in steps} == {"missing"}
    assert {o for s in steps for o in s["broker_objects"]} == wanted
    assert _topics(admin) == before, "provision --dry-run created topics"

    assert main(["--json", "provision", *_PLAN_ARGS]) == 0
    assert {s["status"] for s in json.loads(capsys.readouterr().out)} == {"created"}
    assert wanted <= _topics(admin)

    assert main(["--json", "provision", *_PLAN_ARGS]) == 0
    assert {s["status"] for s in json.loads(capsys.readouterr().out)} == {"exists"}

    # Retention and compaction as set at creation, read back raw.
    s = _settings(namespace)
    for queue in ("orders__p0", "orders__p1", "mail"):
        t = s.queue_topics(queue)
        requests = _configs(admin, t.requests)
        assert requests.get("retention.ms") == "-1", (t.requests, requests)
        assert requests.get("retention.bytes") == "-1", (t.requests, requests)
        assert requests.get("cleanup.policy", "delete") == "delete"
        for compacted in (t.state, t.dlq):
            assert _configs(admin, compacted).get("cleanup.policy") == "compact", compacted
    for registry in (
        s.registry_topic("delivery", "inbox"),
        s.registry_topic("capability", "capabilities"),
        s.registry_checkpoint_topic("delivery", "inbox"),
        s.registry_checkpoint_topic("capability", "capabilities"),
    ):
        assert _configs(admin, registry).get("cleanup.policy") == "compact", registry
    assert _configs(admin, s.stream_topic("audit")).get("retention.ms") == "-1"
    assert _configs(admin, s.stream_topic("short")).get("retention.ms") == "3600000"

    # Now the read-only commands work on what exists.
    assert main(["--json", "stats", "orders", "--levels", "2"]) == 0
    assert [q["queue"] for q in json.loads(capsys.readouterr().out)] == ["orders"]
    assert main(["--json", "stats", "mail"]) == 0
    assert [q["queue"] for q in json.loads(capsys.readouterr().out)] == ["mail"]
    assert main(["doctor", *_PLAN_ARGS]) == 0, capsys.readouterr().out
    capsys.readouterr()


def test_doctor_flags_topics_an_operator_created_badly(
    cli_env: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap, namespace = cli_env
    admin = _admin(bootstrap)
    t = _settings(namespace).queue_topics("jobs")
    futures = admin.create_topics(
        [
            NewTopic(t.requests, 1, 1, config={"retention.ms": "86400000"}),
            NewTopic(t.state, 1, 1, config={"cleanup.policy": "delete"}),
            NewTopic(t.dlq, 1, 1, config={"cleanup.policy": "compact"}),
        ]
    )
    for future in futures.values():
        future.result(10)

    assert main(["--json", "doctor", "--queue", "jobs"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    errors = [(f["subject"], f["finding"]) for f in report["findings"] if f["severity"] == "error"]
    assert any(
        subject == t.requests and "retention.ms=86400000" in finding for subject, finding in errors
    ), report
    assert any(
        subject == t.state and "cleanup.policy=delete" in finding for subject, finding in errors
    ), report
    assert not any(subject == t.dlq for subject, _ in errors), report
    assert all(f["fix"] and f["guarantee"] for f in report["findings"] if f["severity"] == "error")
    # A queue whose requests topic exists with finite retention and whose
    # other topics do not: provision refuses it as a deployment to fix
    # (exit 1; it said "invalid input", exit 2) and creates nothing.
    other = _settings(namespace).queue_topics("batch")
    [future] = admin.create_topics(
        [NewTopic(other.requests, 1, 1, config={"retention.ms": "86400000"})]
    ).values()
    future.result(10)
    assert main(["provision", "--queue", "batch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("transport: cannot provision: ") and "retention.ms=86400000" in err, err
    assert not {other.state, other.dlq} & set(admin.list_topics(timeout=10).topics)
    # Without a plan, doctor finds the namespace's topics by their names.
    assert main(["--json", "doctor"]) == 1
    subjects = {f["subject"] for f in json.loads(capsys.readouterr().out)["findings"]}
    assert {t.requests, t.state, t.dlq} <= subjects


async def test_a_request_topic_with_finite_retention_is_refused_at_first_use(
    kafka_bootstrap: str, kafka_config_factory: Any
) -> None:
    namespace = f"r{uuid.uuid4().hex[:8]}"
    admin = _admin(kafka_bootstrap)
    t = _settings(namespace).queue_topics("q")
    [future] = admin.create_topics(
        [NewTopic(t.requests, 1, 1, config={"retention.ms": "604800000"})]
    ).values()
    future.result(10)
    transport = await connect(kafka_config_factory(namespace=namespace))
    assert isinstance(transport, KafkaTransport)
    try:
        with pytest.raises(ConfigurationError, match=r"retention\.ms=604800000"):
            await transport.request_queue("q").enqueue(WorkRequest(task="t"))
        # The library never alters an operator's topic; it refuses it, and
        # creates none of the queue's other topics meanwhile (the state and
        # dead-letter topics were created, then the call refused).
        assert _configs(admin, t.requests).get("retention.ms") == "604800000"
        present = set(admin.list_topics(timeout=10).topics)
        assert t.state not in present and t.dlq not in present, present
    finally:
        await transport.aclose()


async def test_a_refused_login_is_a_permanent_error_naming_the_cause(
    tansu_broker: Any,
) -> None:
    # SASL against a broker that refuses it (Tansu has no SASL; a wrong
    # password on a real cluster fails the same way in librdkafka): health
    # said "broker unreachable: ... Broker transport failure" and an enqueue
    # waited out the operation timeout with a TransientTransportError, the
    # cause only in the client's log.
    if tansu_broker is None:
        pytest.skip("needs the Tansu broker (no SASL)")
    config = TransportConfig(
        url=f"kafka://{tansu_broker.bootstrap}",
        username="bob",
        password="not-the-password",
        sasl_mechanism="PLAIN",
        options={"operation_timeout_s": 4},
    )
    transport = await connect(config)
    try:
        health = await transport.health()
        assert not health.ok and health.detail.startswith("broker login refused: "), health
        assert "SASL" in health.detail and "not-the-password" not in health.detail
        with pytest.raises(PermanentTransportError, match="authentication or TLS failed"):
            await transport.request_queue("q").enqueue(WorkRequest(task="t"))
    finally:
        await transport.aclose()


async def test_doctor_on_an_unreachable_broker_reports_instead_of_raising(
    kafka_config_factory: Any,
) -> None:
    import socket
    import time

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = kafka_config_factory(options={"operation_timeout_s": 2.0}).model_copy(
        update={"url": f"kafka://127.0.0.1:{port}"}
    )
    transport = await connect(config)
    started = time.monotonic()
    try:
        report = await transport.doctor()
    finally:
        await transport.aclose()
    assert time.monotonic() - started < 30, "doctor did not give up within its timeout"
    assert not report.ok
    [finding] = report.findings
    assert finding.severity == "error" and "could not check" in finding.finding


async def test_doctor_on_a_wrong_address_answers_within_seconds(
    kafka_config_factory: Any,
) -> None:
    """With the default 30 s operation timeout, a typo in the URL is
    reported after the doctor's short probe, not after 30 s of retries."""
    import socket
    import time

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = kafka_config_factory(options={"operation_timeout_s": 30.0}).model_copy(
        update={"url": f"kafka://127.0.0.1:{port}"}
    )
    transport = await connect(config)
    started = time.monotonic()
    try:
        report = await transport.doctor()
    finally:
        await transport.aclose()
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"doctor took {elapsed:.1f} s to report an address nobody answers on"
    [finding] = report.findings
    assert finding.severity == "error" and f"127.0.0.1:{port}" in finding.finding


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("_AUTHENTICATION", "_AUTHENTICATION"),  # said as it is
        ("_TRANSPORT", "no answer from Kafka"),  # a broker that does not answer
    ],
)
async def test_doctor_reports_refused_credentials_as_such_not_as_no_answer(
    kafka_config_factory: Any, monkeypatch: pytest.MonkeyPatch, code: str, expected: str
) -> None:
    """The short metadata probe words a broker that does not answer as
    such; an error the broker did answer with (refused credentials) is
    reported as that error, so the fix it points to is the right one."""
    from confluent_kafka import KafkaError, KafkaException

    transport = await connect(kafka_config_factory())
    assert isinstance(transport, KafkaTransport)

    class Refusing:
        def list_topics(self, timeout: float) -> None:
            raise KafkaException(KafkaError(getattr(KafkaError, code), "refused (test)"))

    monkeypatch.setattr(transport.clients, "admin", Refusing)
    try:
        report = await transport.doctor()
    finally:
        await transport.aclose()
    [finding] = report.findings
    assert finding.severity == "error" and expected in finding.finding
