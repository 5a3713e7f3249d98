"""Provisioning and ``doctor`` for ``kafka://``: the topics behind each
object of a plan (:func:`plan_specs`), which exist, and the check of every
topic's replication, ``min.insync.replicas``,
``unclean.leader.election.enable``, retention and ``cleanup.policy``
against what the library's guarantees need."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException

from transport.errors import TransientTransportError
from transport.kit import DoctorFinding, ObjectKind, ProvisionPlan
from transport_kafka._client import KafkaContext
from transport_kafka._errors import error_from_kafka
from transport_kafka._events import stream_spec
from transport_kafka._registries import checkpoint_spec, registry_spec
from transport_kafka._topics import TopicSpec, TopicState, check_topic, describe_topics, topic_name

__all__ = ["kafka_doctor", "object_specs", "topic_names"]

_CAPABILITIES = ("capability", "capabilities")
#: How long ``doctor`` waits for the broker's first answer.
_PROBE_S = 5.0
_DURABLE = "an accepted request, response or event survives the loss of a broker"


def object_specs(ctx: KafkaContext, kind: ObjectKind, name: str) -> list[TopicSpec]:
    """The topics of one object of a plan, as the library creates them."""
    from transport_kafka._engine import _QueueEngine

    settings = ctx.settings
    if kind == "queue":
        return _QueueEngine(ctx, name).topic_specs()
    if kind in ("delivery_registry", "capability_registry"):
        registry = ("delivery", name) if kind == "delivery_registry" else _CAPABILITIES
        return [
            registry_spec(settings.registry_topic(*registry)),
            checkpoint_spec(settings.registry_checkpoint_topic(*registry)),
        ]
    return [stream_spec(settings, name)]


def _spec_of(ctx: KafkaContext, topic: str) -> TopicSpec | None:
    """The spec of a topic of this namespace, recognised by its name."""
    parts = [p.replace("__", "_") for p in topic.split(".")]
    ns = ctx.settings.namespace
    if len(parts) < 3 or parts[0] != ns:
        return None
    specs: list[TopicSpec] = []
    if len(parts) == 3 and parts[2] in {"requests", "state", "dlq"}:
        specs = object_specs(ctx, "queue", parts[1])
    elif len(parts) in (4, 5) and parts[1] == "registry" and parts[2] == "delivery":
        specs = object_specs(ctx, "delivery_registry", parts[3])
    elif len(parts) in (4, 5) and parts[1] == "registry" and parts[2] == "capability":
        specs = object_specs(ctx, "capability_registry", parts[3])
    elif len(parts) == 4 and parts[1] == "stream" and parts[3] == "events":
        specs = object_specs(ctx, "event_stream", parts[2])
    return next((s for s in specs if s.name == topic), None)


async def topic_names(ctx: KafkaContext) -> set[str]:
    """Every topic the broker lists (creates nothing)."""
    clients = ctx.clients

    def run() -> set[str]:
        return set(clients.admin().list_topics(timeout=clients.timeout).topics)

    return await clients.blocking(f"listing topics on Kafka at {clients.settings.bootstrap}", run)


async def kafka_doctor(ctx: KafkaContext, plan: ProvisionPlan | None) -> list[DoctorFinding]:
    clients = ctx.clients
    prefix = topic_name(ctx.settings.namespace) + "."

    def run() -> tuple[int, list[TopicSpec], list[TopicSpec], dict[str, TopicState]]:
        admin = clients.admin()
        # A broker that answers does so in milliseconds: a wrong address or
        # a broker that is down is reported after a few seconds, not after
        # the whole operation timeout (30 s by default) of a silent retry.
        probe = min(_PROBE_S, clients.timeout)
        try:
            meta = admin.list_topics(timeout=probe)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else exc
            if isinstance(error, KafkaError):
                mapped = error_from_kafka(error, "doctor: metadata")
                if not isinstance(mapped, TransientTransportError):
                    raise mapped from exc  # refused credentials, a bad setting: as it is
            reason = error.str() if hasattr(error, "str") else str(error)
            raise TransientTransportError(
                f"no answer from Kafka at {ctx.settings.bootstrap} within {probe:g} s: {reason}"
            ) from exc
        present = set(meta.topics)
        if plan is not None:
            specs = [s for kind, name in plan.objects() for s in object_specs(ctx, kind, name)]
        else:
            found = (_spec_of(ctx, t) for t in sorted(present) if t.startswith(prefix))
            specs = [s for s in found if s is not None]
        existing = [s for s in specs if s.name in present]
        missing = [s for s in specs if s.name not in present]
        states = (
            describe_topics(admin, [s.name for s in existing], clients.timeout) if existing else {}
        )
        return len(meta.brokers), existing, missing, states

    brokers, existing, missing, states = await clients.blocking("doctor", run)
    findings: list[DoctorFinding] = []
    for spec in missing:
        findings.append(
            DoctorFinding(
                severity="warning",
                subject=spec.name,
                finding=f"topic of {spec.what} does not exist",
                fix="transport provision (or let the application create it at first use)",
            )
        )
    if not existing and not missing:
        findings.append(
            DoctorFinding(
                severity="warning",
                subject=ctx.settings.bootstrap,
                finding=f"no topic of namespace {ctx.settings.namespace!r} to check",
                fix="name the queues, registries and streams (--queue, --registry, --stream) "
                "or provision them first",
            )
        )
    for spec in existing:
        findings += _topic_findings(spec, states[spec.name], brokers)
    return findings


def _topic_findings(spec: TopicSpec, state: TopicState, brokers: int) -> list[DoctorFinding]:
    topic = spec.name
    out: list[DoctorFinding] = []
    errors, warnings = check_topic(spec, state)
    for text in errors:
        out.append(
            DoctorFinding(
                severity="error",
                subject=topic,
                finding=text,
                fix="see the finding",
                guarantee=spec.exact_partitions
                if spec.exact_partitions and "partitions" in text.split(":")[0]
                else _voided(spec),
            )
        )
    for text in warnings:
        out.append(DoctorFinding(severity="warning", subject=topic, finding=text))
    if spec.retention_loses is not None and state.retention_ms is None:
        out.append(
            DoctorFinding(
                severity="warning",
                subject=topic,
                finding="the broker does not report retention.ms (its default applies: "
                "7 days on Apache Kafka)",
                fix=f"kafka-configs --alter --entity-type topics --entity-name {topic} "
                "--add-config retention.ms=-1",
                guarantee=f"{spec.retention_loses} are kept until consumed",
            )
        )
    wanted_retention = spec.config.get("retention.ms")
    if (
        spec.retention_loses is None
        and not spec.compacted
        and wanted_retention is not None
        and state.retention_ms is not None
        and str(state.retention_ms) != wanted_retention
    ):
        out.append(
            DoctorFinding(
                severity="warning",
                subject=topic,
                finding=f"retention.ms={state.retention_ms}, configured {wanted_retention} "
                "(option event_retention_ms / stream_retention_ms)",
                fix=f"kafka-configs --alter --entity-type topics --entity-name {topic} "
                f"--add-config retention.ms={wanted_retention}",
                guarantee="events are replayable for the configured retention",
            )
        )
    if state.replicas < 3:
        out.append(
            DoctorFinding(
                severity="warning",
                subject=topic,
                finding=f"replication factor {state.replicas}"
                + (f" on a cluster of {brokers} broker(s)" if brokers else ""),
                fix="replication_factor=3 (option) on a cluster of at least 3 brokers; "
                "kafka-reassign-partitions for an existing topic",
                guarantee=_DURABLE,
            )
        )
    if state.replicas > 1:
        if state.min_insync_replicas is None:
            out.append(
                DoctorFinding(
                    severity="warning",
                    subject=topic,
                    finding="min.insync.replicas not reported: not checked",
                    fix="min.insync.replicas=2 (with replication factor 3)",
                    guarantee=_DURABLE,
                )
            )
        elif state.min_insync_replicas < 2:
            out.append(
                DoctorFinding(
                    severity="error",
                    subject=topic,
                    finding=f"min.insync.replicas={state.min_insync_replicas}: acks=all is "
                    "satisfied by the leader alone",
                    fix=f"kafka-configs --alter --entity-type topics --entity-name {topic} "
                    "--add-config min.insync.replicas=2",
                    guarantee=_DURABLE,
                )
            )
    if state.unclean_leader_election:
        out.append(
            DoctorFinding(
                severity="error",
                subject=topic,
                finding="unclean.leader.election.enable=true: an out-of-sync replica can "
                "become leader and drop acknowledged records",
                fix=f"kafka-configs --alter --entity-type topics --entity-name {topic} "
                "--add-config unclean.leader.election.enable=false",
                guarantee=_DURABLE,
            )
        )
    if not errors and not any(f.severity != "ok" for f in out):
        out.append(
            DoctorFinding(
                severity="ok",
                subject=topic,
                finding=f"{spec.what}: partitions, cleanup.policy, retention and replication "
                "as the library needs",
            )
        )
    return out


def _voided(spec: TopicSpec) -> str:
    if spec.retention_loses is not None:
        return f"{spec.retention_loses} are kept until consumed"
    if spec.compacted:
        return f"{spec.what} keeps the last record of every key"
    return f"{spec.what} keeps every record"
