"""Provisioning and ``doctor`` for ``pulsar://``.

Topics read only by readers (the dead letters of a queue, the registries
and their checkpoint topics, the event-log streams and their cursors) have no durable subscription that
holds their messages: Pulsar's default retention (none) lets the broker
delete them once a ledger rolls over. With ``admin_url`` set, ``provision``
creates every topic through the admin REST API and gives those topics
infinite retention (``retentionTimeInMinutes=-1``, ``retentionSizeInMB=-1``);
``doctor`` reads retention and deduplication back. Without ``admin_url``
(and on pulsar-lite, which has no admin API) none of this can be set or
checked: ``provision`` creates the topics through the binary protocol
(readers, the queue subscription) and ``doctor`` says what it could not
check.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from transport.errors import TransientTransportError, TransportError, UnsupportedFeatureError
from transport.kit import DoctorFinding, ObjectKind, ProvisionPlan, internal_name
from transport_pulsar._client import PulsarContext
from transport_pulsar._queue import attempts_name
from transport_pulsar._registries import checkpoint_name

__all__ = ["PulsarAdmin", "create_object", "object_topics", "pulsar_doctor"]

_KEPT = "registry state, dead letters and event history are kept until deleted"
_INFINITE = {"retentionTimeInMinutes": -1, "retentionSizeInMB": -1}


def object_topics(ctx: PulsarContext, kind: ObjectKind, name: str) -> list[str]:
    """The topics of one object of a plan; the first of a queue is read
    through its subscription, every other one by readers only."""
    if kind == "queue":
        return [
            ctx.topic("q", name),
            ctx.topic("q", internal_name(name, "dlq")),
            ctx.topic("q", attempts_name(name)),
            ctx.topic("q", checkpoint_name(attempts_name(name))),
        ]
    if kind == "delivery_registry":
        return [ctx.topic("kv.delivery", name), ctx.topic("kv.delivery", checkpoint_name(name))]
    if kind == "capability_registry":
        return [
            ctx.topic("kv.capability", "capabilities"),
            ctx.topic("kv.capability", checkpoint_name("capabilities")),
        ]
    return [ctx.topic("log", name), ctx.topic("logcursor", name)]


#: Retention (MB) of a registry's checkpoint topic: its oldest checkpoints go.
CHECKPOINT_RETENTION_MB = 64


def _wanted_retention(ctx: PulsarContext, topic: str) -> dict[str, int]:
    """Infinite, except on an event-log stream topic with a configured
    retention (``stream_retention_minutes`` / ``event_retention_minutes``)
    and on checkpoint topics (:data:`CHECKPOINT_RETENTION_MB`)."""
    o = ctx.settings.options
    local = topic.rsplit("/", 1)[-1]
    if local.endswith("__checkpoint"):
        # Only the last message is read: kept for good, bounded in size
        # (each view appends one every 2,000 changes of its registry).
        return {"retentionTimeInMinutes": -1, "retentionSizeInMB": CHECKPOINT_RETENTION_MB}
    prefix = f"{ctx.config.namespace}.log."
    if local.startswith(prefix):
        stream = local.removeprefix(prefix)
        minutes = o.stream_retention_minutes.get(stream, o.event_retention_minutes)
        if minutes != -1:
            return {"retentionTimeInMinutes": minutes, "retentionSizeInMB": -1}
    return dict(_INFINITE)


def _reader_only(ctx: PulsarContext, topic: str) -> bool:
    local = topic.rsplit("/", 1)[-1]
    prefix = f"{ctx.config.namespace}.q."
    # A queue's dead letters, hand-out counts and their checkpoints are read
    # by readers only, like every topic that is not a queue.
    return not local.startswith(prefix) or local.endswith(("__dlq", "__attempts", "__checkpoint"))


class PulsarAdmin:
    """The few admin REST calls provisioning and doctor need."""

    def __init__(self, ctx: PulsarContext, url: str) -> None:
        self._ctx = ctx
        self._base = url.rstrip("/") + "/admin/v2/persistent/"
        self._timeout = ctx.settings.options.operation_timeout_seconds

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        token = self._ctx.config.token
        if token is not None:
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        req = urllib.request.Request(self._base + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=self._timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            return await self._ctx.client.run_blocking(
                lambda: self._call(method, path, body), self._timeout + 1
            )
        except urllib.error.HTTPError as exc:
            if exc.code == 409 and method == "PUT":  # already exists
                return None
            raise TransientTransportError(f"pulsar admin {method} {path}: HTTP {exc.code}") from exc
        except (OSError, ValueError, TimeoutError) as exc:
            raise TransientTransportError(
                f"pulsar admin {method} {path}: {type(exc).__name__}"
            ) from exc

    @staticmethod
    def path(topic: str) -> str:
        return quote(topic.removeprefix("persistent://"))

    async def topics(self) -> set[str]:
        o = self._ctx.settings.options
        names = await self.call("GET", f"{quote(o.tenant)}/{quote(o.pulsar_namespace)}")
        return {str(n) for n in names or []}


def admin_for(ctx: PulsarContext) -> PulsarAdmin | None:
    url = ctx.settings.options.admin_url
    return None if url is None else PulsarAdmin(ctx, url)


async def existing_topics(ctx: PulsarContext, topics: list[str]) -> set[str]:
    admin = admin_for(ctx)
    if admin is None:
        raise UnsupportedFeatureError(
            "pulsar:// cannot tell whether a topic exists without the option admin_url "
            "(the binary protocol creates what it touches)"
        )
    return set(topics) & await admin.topics()


async def create_object(ctx: PulsarContext, kind: ObjectKind, name: str) -> None:
    topics = object_topics(ctx, kind, name)
    admin = admin_for(ctx)
    if admin is not None:
        for topic in topics:
            await admin.call("PUT", admin.path(topic))
            if _reader_only(ctx, topic):
                await admin.call(
                    "POST", admin.path(topic) + "/retention", _wanted_retention(ctx, topic)
                )
    if kind == "queue":
        # The queue's subscription holds its backlog (created at Earliest).
        await ctx.ensure_subscription(topics[0])
    if admin is None:
        # Reader-only topics come into being when a reader or producer
        # touches them; without the admin API their retention is the
        # namespace's (see doctor).
        for topic in topics if kind != "queue" else topics[1:]:
            reader = await ctx.client.create_reader(topic)
            await reader.close(ctx.settings.options.close_timeout_seconds)


async def pulsar_doctor(ctx: PulsarContext, plan: ProvisionPlan | None) -> list[DoctorFinding]:
    admin = admin_for(ctx)
    subject = ctx.settings.service_url
    # The broker must answer first: without an admin API nothing below asks
    # it, and a doctor that checked nothing must not report nothing void.
    try:
        await ctx.client.topic_partitions(
            ctx.topic("health", "probe"),
            timeout=min(5.0, ctx.settings.options.operation_timeout_seconds),
        )
    except (TransportError, TimeoutError) as exc:
        raise TransientTransportError(f"Pulsar broker at {subject} did not answer: {exc}") from exc
    if admin is None:
        return [
            DoctorFinding(
                severity="warning",
                subject=subject,
                finding="retention and deduplication not checked: no admin_url "
                "(pulsar-lite has no admin API)",
                fix="set the option admin_url; give the namespace infinite retention "
                "(pulsar-admin namespaces set-retention TENANT/NS --time -1 --size -1) and "
                "enable deduplication",
                guarantee=_KEPT,
            )
        ]
    present = await admin.topics()
    if plan is not None:
        topics = [t for kind, name in plan.objects() for t in object_topics(ctx, kind, name)]
    else:
        prefix = f"{ctx.config.namespace}."
        topics = sorted(t for t in present if t.rsplit("/", 1)[-1].startswith(prefix))
    findings: list[DoctorFinding] = []
    for topic in topics:
        if topic not in present:
            findings.append(
                DoctorFinding(
                    severity="warning",
                    subject=topic,
                    finding="topic does not exist",
                    fix="transport provision",
                )
            )
            continue
        path = admin.path(topic)
        if _reader_only(ctx, topic):
            retention = await admin.call("GET", path + "/retention?applied=true") or {}
            minutes = retention.get("retentionTimeInMinutes", 0)
            size = retention.get("retentionSizeInMB", 0)
            wanted = _wanted_retention(ctx, topic)
            if wanted != _INFINITE and minutes == wanted["retentionTimeInMinutes"]:
                pass  # a stream's configured retention
            elif minutes != -1 or size != -1:
                findings.append(
                    DoctorFinding(
                        severity="error",
                        subject=topic,
                        finding=f"read by readers only, retention {minutes} min / {size} MB: "
                        "the broker deletes older messages once a ledger rolls over",
                        fix=f"pulsar-admin topicPolicies set-retention {topic} --time -1 "
                        "--size -1 (or transport provision)",
                        guarantee=_KEPT,
                    )
                )
        dedup = await admin.call("GET", path + "/deduplicationEnabled?applied=true")
        if dedup is not True:
            findings.append(
                DoctorFinding(
                    severity="warning",
                    subject=topic,
                    finding="deduplication is off: a send retried after a lost receipt "
                    "is stored twice",
                    fix=f"pulsar-admin topicPolicies set-deduplication {topic} --enable",
                    guarantee="an enqueue retried by the client is stored once "
                    "(consumers see it at least once either way)",
                )
            )
    if not findings:
        findings.append(
            DoctorFinding(severity="ok", subject=subject, finding="retention and deduplication")
        )
    return findings
