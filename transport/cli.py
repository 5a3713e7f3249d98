"""``transport`` — operate a deployment from the shell.

Configuration comes from ``--url`` / ``--config`` or the usual ``TRANSPORT_*``
environment. Human-readable tables by default, ``--json`` for machines.
Exit codes: 0 success, 1 failure (unhealthy or unreachable backend),
2 invalid input (usage, names, configuration, unknown backend).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from transport._config import TransportConfig, load_config
from transport._connect import connect
from transport._doctor import ProvisionPlan
from transport._logging import configure_logging
from transport._queue import RequestQueue
from transport._transport import Transport
from transport.errors import TransportError, UnsupportedFeatureError

__all__ = ["main"]


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


class _Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(
        self, data: Any, rows: list[dict[str, Any]] | None = None, columns: Sequence[str] = ()
    ) -> None:
        if self.as_json:
            print(json.dumps(_dump(data), indent=2, default=str))
        elif rows is not None:
            print(_table(rows, columns))
        else:
            print(data)

    @staticmethod
    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def _queue(transport: Transport, name: str, levels: int) -> RequestQueue:
    if levels > 1:
        return transport.priority_queue(name, levels=levels)
    return transport.request_queue(name)


async def _run(args: argparse.Namespace, config: TransportConfig, out: _Output) -> int:
    if args.command == "demo":
        from transport.demo import run_demo

        await run_demo(config.url)
        return 0
    transport = await connect(config)
    try:
        if args.command == "health":
            status = await transport.health()
            row = status.model_dump()
            if status.latency_ms is not None:
                row["latency_ms"] = f"{status.latency_ms:.2f}"
            out.emit(status, [row], ["ok", "backend", "latency_ms", "detail"])
            return 0 if status.ok else 1
        if args.command in _PLAN_COMMANDS:
            return await _run_plan_command(args, transport, out)
        if (absent := await _absent(transport, args)) is not None:
            out.progress(absent)
            return 1
        if args.command == "stats":
            stats = [await _queue(transport, q, args.levels).stats() for q in args.queues]
            rows = [s.model_dump() for s in stats]
            out.emit(stats, rows, ["queue", "depth", "in_flight", "delayed", "dead_lettered"])
            return 0
        if args.command == "dead-letters":
            queue = _queue(transport, args.queue, args.levels)
            if args.action == "list":
                dead = await queue.dead_letters(args.limit)
                rows = [
                    {
                        "request_id": d.request_id,
                        "task": d.request.task if d.request else "(undecodable)",
                        "attempts": d.attempts,
                        "error": (d.error[:60] + "…") if len(d.error) > 60 else d.error,
                        "at": d.dead_lettered_at.isoformat(timespec="seconds"),
                    }
                    for d in dead
                ]
                out.emit(dead, rows, ["request_id", "task", "attempts", "error", "at"])
                return 0
            ids = args.ids or None
            total = len(ids) if ids else len(await queue.dead_letters(1_000_000))
            out.progress(f"requeueing {total} dead letter(s) of {args.queue}…")
            moved = await queue.requeue_dead_letters(ids)
            out.progress(f"requeued {moved} of {total}")
            out.emit({"requeued": moved})
            return 0
        if args.command == "pending":
            records = await transport.delivery_registry(args.registry).records()
            live = [r for r in records if r.state != "taken"]
            rows = [
                {
                    "request_id": r.request_id,
                    "state": r.state,
                    "created_at": r.created_at.isoformat(timespec="seconds"),
                    "expires_at": r.expires_at.isoformat(timespec="seconds"),
                }
                for r in live
            ]
            out.emit(live, rows, ["request_id", "state", "created_at", "expires_at"])
            return 0
        if args.command == "capabilities":
            caps = await transport.capability_registry().all()
            rows = [
                {
                    "name": c.name,
                    "kind": c.kind,
                    "ensemble": c.ensemble,
                    "queue": c.queue,
                    "levels": c.priority_levels,
                    "expires_at": c.expires_at.isoformat(timespec="seconds")
                    if c.expires_at
                    else "",
                }
                for c in caps
            ]
            out.emit(caps, rows, ["name", "kind", "ensemble", "queue", "levels", "expires_at"])
            return 0
        raise AssertionError(args.command)
    finally:
        await transport.aclose()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transport", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--url", help="transport URL (default: TRANSPORT_URL or sqlite:///transport.db)"
    )
    parser.add_argument("--config", help="TOML file (default: TRANSPORT_CONFIG_FILE)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="log lines on stderr"
    )
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("health", help="check that the configured backend is reachable")
    stats = sub.add_parser("stats", help="queue depth/lag, in flight, dead-lettered")
    stats.add_argument("queues", nargs="+")
    stats.add_argument("--levels", type=int, default=1, help="priority levels of the queue")
    dead = sub.add_parser("dead-letters", help="list or requeue dead letters")
    dead.add_argument("action", choices=["list", "requeue"])
    dead.add_argument("queue")
    dead.add_argument("--levels", type=int, default=1)
    dead.add_argument("--limit", type=int, default=100)
    dead.add_argument("--id", dest="ids", action="append", help="only this request id (repeatable)")
    pending = sub.add_parser(
        "pending", help="requests awaiting their response in a delivery registry"
    )
    pending.add_argument("registry")
    sub.add_parser("capabilities", help="live advertised tasks and tools")
    sub.add_parser("demo", help="run the kitchen network demo on the configured backend")
    _add_plan_commands(sub)
    return parser


# -- provision, doctor, and the read-only guard -------------------------------
# Read-only commands look first (Transport.missing) and never create a topic,
# stream or table: a queue or registry that does not exist is reported.

_PLAN_COMMANDS = {"provision", "doctor"}


def _read_plan(args: argparse.Namespace) -> ProvisionPlan:
    import tomllib

    data: dict[str, Any] = {}
    if args.plan:
        try:
            with open(args.plan, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ValueError(f"cannot read the plan {args.plan!r}: {exc.strerror}") from exc
    queues = dict(data.pop("queues", {}))
    for spec in args.queue or []:
        name, _, levels = spec.partition(":")
        queues[name] = int(levels) if levels else 1
    return ProvisionPlan(
        queues=queues,
        delivery_registries=[*data.pop("delivery_registries", []), *(args.registry or [])],
        capability_registry=bool(data.pop("capability_registry", False) or args.capabilities),
        event_streams=[*data.pop("event_streams", []), *(args.stream or [])],
        **data,
    )


async def _absent(transport: Transport, args: argparse.Namespace) -> str | None:
    """Why a read-only command cannot run (what does not exist), or None."""
    if args.command in {"stats", "dead-letters"}:
        names = args.queues if args.command == "stats" else [args.queue]
        plan = ProvisionPlan(queues=dict.fromkeys(names, args.levels))
    elif args.command == "pending":
        plan = ProvisionPlan(delivery_registries=[args.registry])
    elif args.command == "capabilities":
        plan = ProvisionPlan(capability_registry=True)
    else:
        return None
    try:
        missing = await transport.missing(plan)
    except UnsupportedFeatureError as exc:
        _Output.progress(f"transport: note: {exc}; not checked")
        return None
    if not missing:
        return None
    what = {
        "queue": "queue",
        "delivery_registry": "delivery registry",
        "capability_registry": "capability registry",
        "event_stream": "event stream",
    }
    lines = [
        f"transport: {what[s.kind]} {s.name!r} does not exist "
        f"(missing: {', '.join(s.missing_objects)}); nothing was created "
        "(`transport provision` creates it)"
        for s in missing
    ]
    return "\n".join(lines)


async def _run_plan_command(args: argparse.Namespace, transport: Transport, out: _Output) -> int:
    plan = _read_plan(args)
    if args.command == "provision":
        steps = await transport.provision(plan, dry_run=args.dry_run)
        rows = [
            {
                "object": f"{s.kind} {s.name}",
                "status": {"missing": "would create", "unknown": "would ensure"}.get(
                    s.status, s.status
                ),
                "broker_objects": ", ".join(s.broker_objects) or "(in the store)",
            }
            for s in steps
        ]
        out.emit(steps, rows, ["object", "status", "broker_objects"])
        return 0
    report = await transport.doctor(plan if plan.objects() else None)
    if out.as_json:
        out.emit({"ok": report.ok, **report.model_dump(mode="json")})
    else:
        for f in report.findings:
            print(f"[{f.severity.upper()}] {f.subject}: {f.finding}")
            if f.fix:
                print(f"    fix: {f.fix}")
            if f.guarantee:
                label = "voids" if f.severity == "error" else "weakens"
                print(f"    {label}: {f.guarantee}")
        print("doctor: " + ("no guarantee is void" if report.ok else "a guarantee is void"))
    return 0 if report.ok else 1


def _add_plan_commands(sub: Any) -> None:
    def plan_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--plan",
            help="TOML file: queues = {name = levels}, "
            "delivery_registries, capability_registry, event_streams",
        )
        p.add_argument("--queue", action="append", metavar="NAME[:LEVELS]")
        p.add_argument("--registry", action="append", help="delivery registry name")
        p.add_argument("--capabilities", action="store_true", help="the capability registry")
        p.add_argument("--stream", action="append", help="event-log stream name")

    provision = sub.add_parser(
        "provision", help="create every topic/stream/table a plan needs (idempotent)"
    )
    plan_args(provision)
    provision.add_argument("--dry-run", action="store_true", help="print the plan, create nothing")
    doctor = sub.add_parser(
        "doctor", help="check the deployment against what the guarantees need (exit 1 if void)"
    )
    plan_args(doctor)


# -- end of provision / doctor ---------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = _Output(args.json)
    try:
        configure_logging(args.log_level, fmt=args.log_format)
        if args.config:
            config = TransportConfig.from_toml(
                args.config, **({"url": args.url} if args.url else {})
            )
        else:
            config = load_config(args.url)
        return asyncio.run(_run(args, config, out))
    except ValueError as exc:  # invalid names, settings, unknown backend
        print(f"transport: invalid input: {exc}", file=sys.stderr)
        return 2
    except TransportError as exc:
        print(f"transport: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
