"""Provisioning and ``doctor`` for ``nats://``: the JetStream streams behind
each object of a plan, which exist (``STREAM.INFO``, creates nothing), and
the checks of the server's ``sync_interval`` (read from the monitoring
endpoint's ``/varz`` when the option ``monitor_url`` is set) and of every
stream's storage, replicas and limits."""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import nats.js.errors
from nats.js.api import StorageType

from transport.kit import DoctorFinding, ObjectKind, ProvisionPlan, internal_name, redact_url
from transport_nats._client import NatsContext, broker_name
from transport_nats._errors import map_nats_errors
from transport_nats._events import NatsEventLog
from transport_nats._queue import NatsRequestQueue
from transport_nats._registries import NatsKeyedLog

__all__ = ["create_object", "existing_streams", "nats_doctor", "object_streams"]

_DURABLE = "an acknowledged enqueue, response or event survives a server crash or power loss"
_KEPT = "requests, dead letters and registry state are kept until consumed or deleted"


def object_streams(ctx: NatsContext, kind: ObjectKind, name: str) -> list[str]:
    """JetStream stream names behind one object of a plan."""
    ns = ctx.config.namespace
    if kind == "queue":
        return [f"{ns}__{name}", f"{ns}__{internal_name(name, 'dlq')}"]
    if kind == "delivery_registry":
        return [f"KV_{ns}__delivery__{name}"]
    if kind == "capability_registry":
        return [f"KV_{ns}__capability__capabilities"]
    return [f"{ns}__log__{name}"]


async def existing_streams(ctx: NatsContext, names: list[str]) -> set[str]:
    found: set[str] = set()
    for name in names:
        with map_nats_errors(f"looking up stream {name}"):
            try:
                await ctx.js.stream_info(name)
            except nats.js.errors.NotFoundError:
                continue
        found.add(name)
    return found


async def create_object(ctx: NatsContext, kind: ObjectKind, name: str) -> None:
    """Create the streams (and a queue's durable consumer, a registry's
    bucket) exactly as first use would."""
    ctx.require_jetstream()
    if kind == "queue":
        queue = NatsRequestQueue(
            ctx,
            name,
            lease_seconds=ctx.config.lease_seconds,
            max_attempts=ctx.config.max_attempts,
        )
        try:
            await queue._ensure_consumer()
        finally:
            await queue.aclose()
    elif kind in ("delivery_registry", "capability_registry"):
        log = NatsKeyedLog(
            ctx,
            broker_name(
                ctx.config.namespace,
                "delivery" if kind == "delivery_registry" else "capability",
                name if kind == "delivery_registry" else "capabilities",
            ),
        )
        try:
            await log._bucket()
        finally:
            await log.aclose()
    else:
        event_log = NatsEventLog(ctx)
        try:
            await event_log._ensure(name)
        finally:
            await event_log.aclose()


def _read_varz(url: str, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/varz", timeout=timeout) as resp:
        data = json.loads(resp.read())
    if not isinstance(data, dict):
        raise ValueError("its /varz is not a JSON object")
    return data


async def _server_findings(ctx: NatsContext) -> list[DoctorFinding]:
    url = ctx.options.monitor_url
    subject = "nats-server"
    if url is None:
        return [
            DoctorFinding(
                severity="warning",
                subject=subject,
                finding="JetStream sync_interval not checked (no client API shows it; "
                "the option monitor_url names the server's monitoring endpoint)",
                fix="set the option monitor_url (http://host:8222) so doctor can read /varz; "
                "on the server: jetstream { sync_interval: always }",
                guarantee=_DURABLE,
            )
        ]
    if urlsplit(url).scheme not in {"http", "https"}:
        return [
            DoctorFinding(
                severity="error",
                subject=subject,
                finding=f"monitor_url must be http:// or https://, got {url!r}",
                fix="monitor_url=http://host:8222",
            )
        ]
    try:
        varz = await asyncio.to_thread(_read_varz, url, ctx.options.request_timeout)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # The broker may be fine: say which endpoint failed, and what it
        # leaves unchecked (it read as "every guarantee void").
        return [
            DoctorFinding(
                severity="error",
                subject=subject,
                finding=f"the monitoring endpoint monitor_url={redact_url(url)!r} could not be "
                f"read ({redact_url(str(exc))}): JetStream sync_interval not checked",
                fix="point the option monitor_url at the server's monitoring port "
                "(http://host:8222, reachable from here)",
                guarantee=_DURABLE,
            )
        ]
    config = (varz.get("jetstream") or {}).get("config") or {}
    subject = f"nats-server {varz.get('server_name', '')} {varz.get('version', '')}".strip()
    if not config:
        return [
            DoctorFinding(
                severity="error",
                subject=subject,
                finding="the monitoring endpoint shows no JetStream configuration",
                fix="enable JetStream on this server",
                guarantee=_DURABLE,
            )
        ]
    if config.get("sync_always"):
        return [
            DoctorFinding(
                severity="ok",
                subject=subject,
                finding="JetStream sync_interval: always (every write fsynced before its ack)",
            )
        ]
    interval = config.get("sync_interval")
    shown = f"{interval / 1e9:g} s" if isinstance(interval, int | float) else "the default (2 min)"
    return [
        DoctorFinding(
            severity="error",
            subject=subject,
            finding=f"JetStream fsyncs every {shown}, not before each ack: writes acknowledged "
            "within that window are lost when the server (or every replica) crashes or "
            "loses power",
            fix="jetstream { sync_interval: always } in the server config, then restart it",
            guarantee=_DURABLE,
        )
    ]


def _stream_findings(name: str, info: Any, kind: str) -> list[DoctorFinding]:
    cfg = info.config
    out: list[DoctorFinding] = []
    if cfg.storage != StorageType.FILE:
        out.append(
            DoctorFinding(
                severity="error",
                subject=name,
                finding=f"storage is {cfg.storage}: lost when the server restarts",
                fix="recreate the stream with file storage (delete it; first use or "
                "transport provision creates it)",
                guarantee=_DURABLE,
            )
        )
    replicas = cfg.num_replicas or 1
    if replicas < 3:
        out.append(
            DoctorFinding(
                severity="warning",
                subject=name,
                finding=f"{replicas} replica(s): the stream is lost with its server's disk",
                fix="option replicas=3 on a cluster of at least 3 servers "
                f"(nats stream edit {name} --replicas 3)",
                guarantee=_DURABLE,
            )
        )
    if kind != "event_stream":
        limited = [
            f"{field}={value}"
            for field, value in (
                ("max_age", cfg.max_age),
                ("max_msgs", cfg.max_msgs),
                ("max_bytes", cfg.max_bytes),
            )
            if value not in (None, 0, -1)
        ]
        if limited:
            out.append(
                DoctorFinding(
                    severity="error",
                    subject=name,
                    finding=f"limits {', '.join(limited)}: the server deletes stored "
                    "messages before they are consumed",
                    fix=f"remove the limits (nats stream edit {name})",
                    guarantee=_KEPT,
                )
            )
    if not out:
        out.append(
            DoctorFinding(
                severity="ok",
                subject=name,
                finding="file storage, replicas and limits as the library needs",
            )
        )
    return out


def _kind_of(ctx: NatsContext, stream: str) -> str | None:
    ns = ctx.config.namespace
    if stream.startswith(f"KV_{ns}__"):
        return "registry"
    if stream.startswith(f"{ns}__log__"):
        return "event_stream"
    if stream.startswith(f"{ns}__"):
        return "queue"
    return None


async def nats_doctor(ctx: NatsContext, plan: ProvisionPlan | None) -> list[DoctorFinding]:
    findings = await _server_findings(ctx)
    js = ctx.js
    targets: list[tuple[str, str]] = []
    if plan is not None:
        for kind, name in plan.objects():
            short = "registry" if kind.endswith("registry") else kind
            targets += [(s, short) for s in object_streams(ctx, kind, name)]
    else:
        with map_nats_errors("listing streams"):
            names = await js.streams_info()
        for info in names:
            stream = info.config.name or ""
            recognised = _kind_of(ctx, stream)
            if recognised is not None:
                targets.append((stream, recognised))
    for stream, role in targets:
        with map_nats_errors(f"stream info {stream}"):
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                findings.append(
                    DoctorFinding(
                        severity="warning",
                        subject=stream,
                        finding="stream does not exist",
                        fix="transport provision (or let the application create it at first use)",
                    )
                )
                continue
        findings += _stream_findings(stream, info, role)
    return findings
