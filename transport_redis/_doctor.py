"""Provisioning and ``doctor`` for ``redis://``: the keys behind each object
of a plan, which exist (``EXISTS``, creates nothing), and the checks of the
server's persistence (``appendonly``, ``appendfsync``) and eviction policy
(``maxmemory-policy``) read with ``CONFIG GET`` where the server allows it
(managed services often refuse ``CONFIG``: then they are reported as not
checked)."""

from __future__ import annotations

import redis.exceptions as rex

from transport.kit import DoctorFinding, ObjectKind, ProvisionPlan
from transport_redis._client import RedisContext, keys
from transport_redis._errors import map_redis_errors
from transport_redis._queue import RedisRequestQueue

__all__ = ["create_object", "existing_keys", "object_keys", "redis_doctor"]

_DURABLE = "an acknowledged enqueue, response or event survives a server crash or power loss"
_KEPT = "requests, dead letters and registry state are kept until consumed or deleted"


def object_keys(ctx: RedisContext, kind: ObjectKind, name: str) -> list[str]:
    """The keys behind one object of a plan (the queue stream with its
    consumer group; a registry's change stream; an event-log stream)."""
    ns = ctx.config.namespace
    if kind == "queue":
        return [keys.queue(ns, name)]
    if kind == "delivery_registry":
        return [keys.registry_changes(ns, "delivery", name)]
    if kind == "capability_registry":
        return [keys.registry_changes(ns, "capability", "capabilities")]
    return [keys.event_stream(ns, name)]


async def existing_keys(ctx: RedisContext, names: list[str]) -> set[str]:
    found: set[str] = set()
    redis = ctx.client.redis
    for name in names:
        with map_redis_errors(f"looking up {name}", ctx.endpoint.where):
            if await redis.exists(name):
                found.add(name)
    return found


async def create_object(ctx: RedisContext, kind: ObjectKind, name: str) -> None:
    """Create the keys exactly as first use would: a queue's stream with its
    consumer group; an empty stream for a registry or event log."""
    if kind == "queue":
        queue = RedisRequestQueue(
            ctx,
            name,
            lease_seconds=ctx.config.lease_seconds,
            max_attempts=ctx.config.max_attempts,
        )
        try:
            await queue._ensure_group()
        finally:
            await queue.aclose()
        return
    for key in object_keys(ctx, kind, name):
        with map_redis_errors(f"creating {key}", ctx.endpoint.where):
            # An empty stream: one entry added and trimmed away at once.
            await ctx.client.redis.xadd(key, {"created": b"1"}, maxlen=0, approximate=False)


def _setting(config: dict[bytes | str, bytes | str], name: str) -> str | None:
    for key, value in config.items():
        if (key.decode() if isinstance(key, bytes) else key) == name:
            return value.decode() if isinstance(value, bytes) else value
    return None


async def _server_findings(ctx: RedisContext) -> list[DoctorFinding]:
    subject = f"redis-server {ctx.endpoint.where} {ctx.server_version}".strip()
    redis = ctx.client.redis
    try:
        with map_redis_errors("CONFIG GET", ctx.endpoint.where):
            try:
                config = {}
                for name in ("appendonly", "appendfsync", "maxmemory-policy"):
                    config.update(await redis.config_get(name))
            except rex.ResponseError as exc:
                if "unknown command" not in str(exc).lower() and "NOPERM" not in str(exc):
                    raise
                config = {}
    except Exception as exc:  # a refused CONFIG is not a broken deployment
        if "ACL" not in str(exc) and "unknown command" not in str(exc).lower():
            raise
        config = {}
    if not config:
        return [
            DoctorFinding(
                severity="warning",
                subject=subject,
                finding="persistence not checked: the server refused CONFIG GET",
                fix="make sure the server runs with appendonly yes, appendfsync always and "
                "maxmemory-policy noeviction (or ask the provider)",
                guarantee=_DURABLE,
            )
        ]
    out: list[DoctorFinding] = []
    aof = _setting(config, "appendonly")
    fsync = _setting(config, "appendfsync")
    policy = _setting(config, "maxmemory-policy")
    if aof != "yes":
        out.append(
            DoctorFinding(
                severity="error",
                subject=subject,
                finding="appendonly is off: a server restart loses every request, response "
                "and event written since the last snapshot",
                fix="appendonly yes and appendfsync always in redis.conf "
                "(CONFIG SET appendonly yes; CONFIG REWRITE)",
                guarantee=_DURABLE,
            )
        )
    elif fsync != "always":
        out.append(
            DoctorFinding(
                severity="warning" if fsync == "everysec" else "error",
                subject=subject,
                finding=f"appendfsync {fsync}: writes acknowledged within the last "
                f"{'second' if fsync == 'everysec' else 'OS flush interval'} are lost when "
                "the server crashes or loses power",
                fix="appendfsync always (CONFIG SET appendfsync always; CONFIG REWRITE)",
                guarantee=_DURABLE,
            )
        )
    else:
        out.append(
            DoctorFinding(
                severity="ok",
                subject=subject,
                finding="appendonly yes, appendfsync always (every write fsynced before its reply)",
            )
        )
    if policy is not None and policy != "noeviction":
        out.append(
            DoctorFinding(
                severity="error",
                subject=subject,
                finding=f"maxmemory-policy {policy}: under memory pressure the server deletes "
                "keys, queues and registries included",
                fix="maxmemory-policy noeviction (writes then fail with an error instead)",
                guarantee=_KEPT,
            )
        )
    return out


async def redis_doctor(ctx: RedisContext, plan: ProvisionPlan | None) -> list[DoctorFinding]:
    findings = await _server_findings(ctx)
    if plan is None:
        return findings
    targets = [key for kind, name in plan.objects() for key in object_keys(ctx, kind, name)]
    present = await existing_keys(ctx, targets)
    for key in targets:
        if key in present:
            findings.append(DoctorFinding(severity="ok", subject=key, finding="exists"))
        else:
            findings.append(
                DoctorFinding(
                    severity="warning",
                    subject=key,
                    finding="does not exist",
                    fix="transport provision (or let the application create it at first use)",
                )
            )
    return findings
