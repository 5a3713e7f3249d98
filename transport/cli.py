"""``transport`` — operate a deployment from the shell.

Configuration comes from ``--url`` / ``--config`` or the usual ``TRANSPORT_*``
environment. Human-readable tables by default, ``--json`` for machines.
Exit codes: 0 success, 1 failure (unhealthy or unreachable backend),
2 invalid input (usage, names, configuration, unknown backend).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from transport._ops.logging import configure_logging
from transport._ops.top import advertised_queue_levels
from transport._spi.codec import decode
from transport._spi.config import TransportConfig, load_config, url_options
from transport._spi.connect import connect
from transport._spi.doctor import ProvisionPlan
from transport._spi.models import DeadLetter, HealthStatus, WorkRequest
from transport._spi.priority import MAX_PRIORITY_LEVELS
from transport._spi.queue import RequestQueue
from transport._spi.transport import Transport
from transport.errors import ConfigurationError, TransportError, UnsupportedFeatureError

__all__ = ["main"]


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    # None is what a backend cannot tell: "?", as `top` shows it.
    cells = [["?" if row.get(c) is None else str(row.get(c, "")) for c in columns] for row in rows]
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
        #: The "still waiting" notice not printed yet (see _noticed).
        self.notice: asyncio.TimerHandle | None = None

    def answered(self) -> None:
        """The command has its answer: no "still waiting" notice after it
        (closing the client may still take a while)."""
        if self.notice is not None:
            self.notice.cancel()

    def emit(
        self, data: Any, rows: list[dict[str, Any]] | None = None, columns: Sequence[str] = ()
    ) -> None:
        self.answered()
        if self.as_json:
            print(json.dumps(_dump(data), indent=2, default=str))
        elif rows is not None:
            print(_table(rows, columns))
        else:
            print(data)

    def say(self, text: str) -> None:
        """A line of the command's answer on stderr (a result or an error)."""
        self.answered()
        self.progress(text)

    @staticmethod
    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)


#: Seconds a command may go without its answer before it says it is still
#: waiting: against a broker that is down, a Kafka or Pulsar client keeps
#: trying until its operation timeout (30 s by default), and a command
#: silent that long reads as a hang.
_SLOW_NOTICE_S = 3.0

#: The setting that bounds that wait, per URL scheme, and its default.
_GIVES_UP = {
    "kafka": ("operation_timeout_s", 30.0),
    "pulsar": ("operation_timeout_seconds", 30.0),
}


def _still_waiting(config: TransportConfig) -> str:
    down = "a broker that is down is reported when the backend gives up"
    scheme = config.scheme.split("+", 1)[0]  # pulsar+ssl
    if scheme in _GIVES_UP:
        option, default = _GIVES_UP[scheme]
        try:
            given = url_options(scheme, config.url, config.options).get(option)
        except ConfigurationError:  # the backend says so itself
            given = None
        down = (
            f"a broker that is down is reported when its {option} of {given} s runs out"
            if given is not None
            else f"a broker that is down is reported when its {option} of {default:g} s "
            f"(the default) runs out; ?{option}=5 in the URL gives up sooner"
        )
    return (
        f"transport: still waiting for {config.redacted_url()} after {_SLOW_NOTICE_S:g} s "
        f"({down}). Ctrl-C stops."
    )


async def _noticed(config: TransportConfig, out: _Output, work: Awaitable[int]) -> int:
    """``work``, saying once on stderr that it is still waiting if it has
    no answer after :data:`_SLOW_NOTICE_S`."""
    loop = asyncio.get_running_loop()
    out.notice = loop.call_later(_SLOW_NOTICE_S, _Output.progress, _still_waiting(config))
    try:
        return await work
    finally:
        out.answered()


def _queue(transport: Transport, name: str, levels: int) -> RequestQueue:
    if levels > 1:
        return transport.priority_queue(name, levels=levels)
    return transport.request_queue(name)


async def _health(args: argparse.Namespace, config: TransportConfig, out: _Output) -> int:
    """Report the backend's health; a backend that cannot be reached (or
    raises, or does not answer within ``--timeout``) is reported as down in
    the same format, never as an empty output."""
    try:
        async with asyncio.timeout(args.timeout):
            transport = await connect(config)
            try:
                status = await transport.health()
            finally:
                await transport.aclose()
    except ValueError:
        raise  # invalid configuration: exit 2
    except TimeoutError:
        status = HealthStatus(
            ok=False, backend=config.scheme, detail=f"no answer within {args.timeout:g}s"
        )
    except Exception as exc:  # unreachable: whatever the client raised
        status = HealthStatus(
            ok=False, backend=config.scheme, detail=f"{type(exc).__name__}: {exc}"
        )
    row = {
        "ok": "yes" if status.ok else "NO",
        "backend": status.backend,
        "latency_ms": "-" if status.latency_ms is None else f"{status.latency_ms:.2f}",
        "detail": status.detail,
    }
    out.emit(status, [row], ["ok", "backend", "latency_ms", "detail"])
    return 0 if status.ok else 1


async def _requeue(args: argparse.Namespace, queue: RequestQueue, out: _Output) -> int:
    dead = await queue.dead_letters(1_000_000)
    if args.ids:
        chosen: list[DeadLetter] = []
        for prefix in args.ids:
            matches = [d for d in dead if d.request_id and d.request_id.startswith(prefix)]
            if not matches:
                out.say(
                    f"transport: no dead letter of {args.queue} has an id starting with {prefix!r}"
                )
                return 1
            if len({d.request_id for d in matches}) > 1:
                shown = ", ".join(sorted({str(d.request_id) for d in matches})[:5])
                raise ValueError(
                    f"--id {prefix!r} matches {len(matches)} dead letters of {args.queue} "
                    f"({shown}…): give more characters"
                )
            if matches[0].request is None:
                out.say(
                    f"transport: dead letter {matches[0].request_id} of {args.queue} is "
                    "undecodable; it cannot be requeued (see its raw text with --json list)"
                )
                return 1
            chosen.append(matches[0])
    else:  # undecodable ones stay where they are (requeue_dead_letters skips them)
        chosen = [d for d in dead if d.request_id is not None and d.request is not None]
    ids = list(dict.fromkeys(str(d.request_id) for d in chosen))
    # Every decodable dead letter of those ids moves (a request enqueued twice
    # and dead-lettered twice has two): all of them are what was asked for.
    wanted = set(ids)
    chosen = [d for d in dead if d.request is not None and d.request_id in wanted]
    moved = await queue.requeue_dead_letters(ids) if ids else 0
    rows = [
        {
            "request_id": d.request_id,
            "task": d.request.task if d.request else "(undecodable)",
            "attempts": d.attempts,
            "error": (d.error[:60] + "…") if len(d.error) > 60 else d.error,
        }
        for d in chosen
    ]
    if out.as_json:
        out.emit({"queue": args.queue, "requeued": moved, "of": len(chosen), "request_ids": ids})
    else:
        print(f"requeued {moved} of {len(chosen)} dead letter(s) of {args.queue}")
        if rows:
            print(_table(rows, ["request_id", "task", "attempts", "error"]))
    return 0 if moved >= len(chosen) else 1


def _not_an_outbox(path: Path) -> str | None:
    """Why ``path`` is not an outbox's file (looked at read-only), or None."""
    import sqlite3

    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return f"cannot open it: {exc}"
    try:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    except sqlite3.DatabaseError as exc:
        return str(exc)  # "file is not a database"
    finally:
        conn.close()
    return None if "outbox" in tables else "it has no outbox table"


async def _outbox(args: argparse.Namespace, out: _Output) -> int:
    """``transport outbox list|requeue FILE``: the file only, no backend."""
    from transport._runtime.outbox import OutboxFile

    if not args.file.is_file():
        out.say(f"transport: no outbox file at {args.file}")
        return 1
    if (reason := _not_an_outbox(args.file)) is not None:
        # Opening it as an outbox would add the outbox's tables to the file
        # (and switch it to WAL): another program's database, or the
        # transport's own, given by mistake.
        out.say(f"transport: {args.file} is not an outbox file ({reason}); left unchanged")
        return 1
    async with OutboxFile(args.file) as box:
        if args.action == "list":
            depth = await box.depth()
            dead = await box.dead()
            if out.as_json:
                out.emit({"file": str(args.file), "waiting": depth, "dead": dead})
                return 0
            waiting = ", ".join(f"{n} {kind}(s)" for kind, n in sorted(depth.items()))
            print(f"{args.file}: waiting {waiting or 'nothing'}; {len(dead)} dead letter(s)")
            rows = [
                {
                    "id": d["id"],
                    "kind": d["kind"],
                    "target": d["target"],
                    "attempts": d["attempts"],
                    "error": (d["error"][:60] + "…") if len(d["error"]) > 60 else d["error"],
                }
                for d in dead
            ]
            if rows:
                print(_table(rows, ["id", "kind", "target", "attempts", "error"]))
            return 0
        wanted = None if not args.ids else set(args.ids)
        known = {d["id"] for d in await box.dead()}
        if wanted is not None and (missing := wanted - known):
            out.say(
                f"transport: no dead letter with id {', '.join(map(str, sorted(missing)))} "
                f"in {args.file}"
            )
            return 1
        moved = await box.requeue_dead(wanted)
        if out.as_json:
            out.emit({"file": str(args.file), "requeued": moved})
        else:
            print(f"requeued {moved} dead letter(s) of {args.file} (sent when its outbox runs)")
        return 0


async def _replace(args: argparse.Namespace, queue: RequestQueue, out: _Output) -> int:
    """``dead-letters replace QUEUE --dead-letter ID --body FILE``."""
    if not args.dead_letter or args.body is None:
        raise ValueError("replace needs --dead-letter ID and --body FILE")
    try:
        data = args.body.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {args.body}: {exc.strerror}") from exc
    try:
        request = decode(WorkRequest, data)
    except TransportError as exc:
        raise ValueError(f"{args.body} is not a valid request: {exc}") from exc
    if not await queue.replace_dead_letter(args.dead_letter, request):
        out.say(f"transport: {args.queue} has no dead letter {args.dead_letter!r}")
        return 1
    if out.as_json:
        out.emit(
            {"queue": args.queue, "replaced": args.dead_letter, "request_id": request.request_id}
        )
    else:
        print(
            f"replaced dead letter {args.dead_letter} of {args.queue} by request {request.request_id}"
        )
    return 0


async def _top(args: argparse.Namespace, transport: Transport, out: _Output) -> int:
    from transport._ops.top import TopCollector, run_top

    collector = TopCollector(transport, args.queues, args.registries, args.levels)
    try:
        last = await run_top(
            collector, interval=args.interval, count=args.count, as_json=out.as_json
        )
    finally:
        await collector.aclose()
    return 1 if last.error else 0


#: How many priority levels the CLI looks for when none are advertised.
_LEVEL_PROBE = MAX_PRIORITY_LEVELS


async def _present_levels(transport: Transport, name: str) -> list[int]:
    """Which priority levels of ``name`` exist (``<name>__p0`` …, the first
    :data:`_LEVEL_PROBE`); none if the backend cannot tell without creating
    them."""
    try:
        absent = await transport.missing(ProvisionPlan(queues={name: _LEVEL_PROBE}))
    except UnsupportedFeatureError:
        return []
    missing = {step.name for step in absent}
    return [k for k in range(_LEVEL_PROBE) if f"{name}__p{k}" not in missing]


async def _level_count(transport: Transport, name: str) -> int:
    """How many priority levels of ``name`` exist from level 0 without a
    gap; 0 if none (or the backend cannot tell without creating them)."""
    present = set(await _present_levels(transport, name))
    count = 0
    while count in present:
        count += 1
    return count


async def _has_levels(transport: Transport, name: str) -> bool:
    """Whether ``name`` looks like a priority queue: level queues of it
    exist and hold something. Creates nothing (a backend that cannot tell
    without creating is not asked)."""
    present = await _present_levels(transport, name)
    if not present:
        return False
    queue = transport.priority_queue(name, levels=max(present) + 1)
    try:
        stats = await queue.stats()
    finally:
        await queue.aclose()
    return bool(stats.depth or stats.in_flight or stats.dead_lettered)


def _plain_note(names: list[str]) -> str:
    """Said of queues read as plain ones that showed nothing: a priority
    queue nobody advertises (its ensemble is not running) reads so too."""
    return (
        f"transport: note: {', '.join(map(repr, names))} read as a plain queue, but its "
        "priority levels hold requests and no live ensemble advertises how many: "
        "pass --levels N"
    )


async def _run(args: argparse.Namespace, config: TransportConfig, out: _Output) -> int:
    if args.command == "demo":
        from transport.demo import run_demo

        await run_demo(config.url)
        return 0
    if args.command == "health":
        return await _health(args, config, out)
    if args.command == "top":
        from transport._ops.top import require_rich

        require_rich()
    transport = await connect(config)
    try:
        if args.command in _PLAN_COMMANDS:
            return await _run_plan_command(args, transport, out)
        if args.command == "top":
            return await _top(args, transport, out)
        guessed: set[str] = set()  # read as plain queues for want of their levels
        if args.command in {"stats", "dead-letters"}:
            names = args.queues if args.command == "stats" else [args.queue]
            advertised = await advertised_queue_levels(transport)
            args.queue_levels = {n: args.levels or advertised.get(n, 1) for n in names}
            guessed = {n for n in names if args.levels is None and n not in advertised}
            notes = [
                f"transport: note: queue {n!r} is advertised with {advertised[n]} levels; "
                f"--levels {args.levels} reads {args.levels} of them"
                for n in names
                if args.levels is not None and advertised.get(n, args.levels) != args.levels
            ]
            if notes:
                args.note = "\n".join(notes)
        absent = await _absent(transport, args)
        if absent is not None and guessed:
            # A plain queue that does not exist, whose level queues do (as
            # `provision --queue name:N` leaves it): read as those levels.
            found = {n: await _level_count(transport, n) for n in sorted(guessed)}
            found = {n: k for n, k in found.items() if k}
            if found:
                args.queue_levels.update(found)
                guessed -= set(found)
                note = "\n".join(
                    f"transport: note: read {n!r} as a priority queue of {k} levels "
                    "(its level queues exist, no plain queue does, and no live ensemble "
                    "advertises how many; --levels N says)"
                    for n, k in found.items()
                )
                args.note = f"{args.note}\n{note}" if getattr(args, "note", None) else note
                absent = await _absent(transport, args)
        if absent is not None:
            prioritised = [n for n in sorted(guessed) if await _has_levels(transport, n)]
            if prioritised:
                absent += (
                    f"\ntransport: hint: {', '.join(map(repr, prioritised))} has priority "
                    "levels and no live ensemble advertises how many: pass --levels N"
                )
            out.say(absent)
            return 1
        if args.command == "stats":
            stats = [await _queue(transport, q, args.queue_levels[q]).stats() for q in args.queues]
            rows = [s.model_dump() for s in stats]
            out.emit(stats, rows, ["queue", "depth", "in_flight", "delayed", "dead_lettered"])
            empty = [
                s.queue
                for s in stats
                if s.queue in guessed
                and not (s.depth or s.in_flight or s.dead_lettered)
                and await _has_levels(transport, s.queue)
            ]
            if empty:
                args.note = _plain_note(empty)
            return 0
        if args.command == "dead-letters":
            queue = _queue(transport, args.queue, args.queue_levels[args.queue])
            if args.action == "list":
                dead = await queue.dead_letters(args.limit)
                rows = [
                    {
                        "request_id": d.request_id,
                        "task": d.request.task if d.request else "(undecodable)",
                        "attempts": d.attempts,
                        "error": (d.error[:60] + "…") if len(d.error) > 60 else d.error,
                        "at": d.dead_lettered_at.isoformat(timespec="seconds"),
                        "dead_letter_id": d.dead_letter_id or "-",
                    }
                    for d in dead
                ]
                out.emit(
                    dead, rows, ["request_id", "task", "attempts", "error", "at", "dead_letter_id"]
                )
                if not dead and args.queue in guessed and await _has_levels(transport, args.queue):
                    args.note = _plain_note([args.queue])
                return 0
            if args.action == "replace":
                return await _replace(args, queue, out)
            return await _requeue(args, queue, out)
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
                    "queue": c.queue or "-",
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _version() -> str:
    try:
        return importlib.metadata.version("agentensemble-transport")
    except importlib.metadata.PackageNotFoundError:  # a source checkout, not installed
        return "unknown (not installed)"


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes, before or after the command name
    (``transport --json health`` and ``transport health --json``). On the
    subcommands their default is SUPPRESS, so that an option given before
    the command is not reset by the subcommand's default."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--url",
        default=default(None),
        help="transport URL (default: TRANSPORT_URL, then the config file, then "
        "sqlite:///transport.db)",
    )
    group.add_argument(
        "--config",
        metavar="FILE",
        default=default(None),
        help="TOML configuration file (default: TRANSPORT_CONFIG_FILE)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="machine-readable output (JSON on stdout)",
    )
    group.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=default("text"),
        help="format of log lines on stderr (default: text)",
    )
    group.add_argument(
        "--log-level",
        default=default("WARNING"),
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING (default) or ERROR",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transport",
        description=__doc__.split("\n")[0].replace("``", ""),
        epilog="Exit codes: 0 success, 1 failure (unhealthy or unreachable backend, an "
        "object that does not exist, an --id that matches no dead letter; requeueing all "
        'with none to requeue is a success: "requeued 0 of 0"), 2 invalid input, '
        "141 the output's reader went away (a pipe into head).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        child = sub.add_parser(name, help=help, description=help)
        _global_options(child, suppress=True)
        return child

    def levels(child: argparse.ArgumentParser) -> None:
        child.add_argument(
            "--levels",
            type=_positive_int,
            default=None,
            help="priority levels of the queue (default: as its ensemble advertises them in"
            " the capability registry, where the backend can look without creating anything;"
            " else as many as exist when no plain queue of that name does; else 1)",
        )

    health = command("health", "check that the configured backend is reachable")
    health.add_argument(
        "--timeout",
        type=_positive_float,
        default=15.0,
        help="seconds to wait for the backend before reporting it down (default 15)",
    )
    stats = command("stats", "queue depth/lag, in flight, delayed, dead-lettered")
    stats.add_argument("queues", nargs="+", metavar="QUEUE", help="queue name(s)")
    levels(stats)
    dead = command("dead-letters", "list, requeue or replace (repair) dead letters")
    dead.add_argument(
        "action",
        choices=["list", "requeue", "replace"],
        help="list them; move them back to the queue; or put a repaired request (--body) "
        "in place of one (--dead-letter), e.g. an undecodable body fixed by hand",
    )
    dead.add_argument("queue", metavar="QUEUE", help="the queue whose dead letters to use")
    levels(dead)
    dead.add_argument(
        "--limit", type=_positive_int, default=100, help="list at most this many (default 100)"
    )
    dead.add_argument(
        "--id",
        dest="ids",
        action="append",
        metavar="ID",
        help="requeue only this request id, or a unique prefix of it (repeatable; default: all)",
    )
    dead.add_argument(
        "--dead-letter",
        metavar="DEAD_LETTER_ID",
        help="replace: the dead letter's id (the dead_letter_id column of list)",
    )
    dead.add_argument(
        "--body",
        type=Path,
        metavar="FILE",
        help="replace: a file holding the repaired request as JSON (see docs/wire.md)",
    )
    pending = command("pending", "requests awaiting their response in a delivery registry")
    pending.add_argument(
        "registry", metavar="REGISTRY", help="the caller's delivery registry (its inbox)"
    )
    command("capabilities", "live advertised tasks and tools")
    top = command(
        "top",
        "live view of queues and registries, refreshed every second (needs the 'cli' extra)",
    )
    top.add_argument(
        "queues",
        nargs="*",
        metavar="QUEUE",
        help="queue name(s) to show (default: every queue advertised in the capability registry)",
    )
    top.add_argument(
        "--levels",
        type=_positive_int,
        default=None,
        help="priority levels of the named queues (default: as advertised, else 1)",
    )
    top.add_argument(
        "--registry",
        dest="registries",
        action="append",
        default=[],
        metavar="REGISTRY",
        help="also show the pending responses of this delivery registry (repeatable)",
    )
    top.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        help="seconds between refreshes (default 1)",
    )
    top.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after N refreshes (default: until Ctrl-C); with --json, one JSON "
        "object per refresh",
    )
    outbox = command(
        "outbox",
        "what an outbox file holds: waiting rows and dead letters (list), or move its "
        "dead letters back into the line (requeue); needs no backend",
    )
    outbox.add_argument("action", choices=["list", "requeue"], help="list, or requeue")
    outbox.add_argument("file", type=Path, metavar="FILE", help="the outbox's SQLite file")
    outbox.add_argument(
        "--id",
        dest="ids",
        action="append",
        type=_positive_int,
        metavar="ID",
        help="requeue only the dead letter with this id (repeatable; default: all)",
    )
    command("demo", "run the kitchen network demo on the configured backend")
    schema = command(
        "schema",
        "write the JSON Schema of every record the library puts on the wire "
        "(one file per record; needs no backend)",
    )
    schema.add_argument(
        "--out",
        type=Path,
        default=Path("docs/schemas"),
        metavar="DIR",
        help="directory of the schema files (default: docs/schemas)",
    )
    schema.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 naming every file in DIR that differs from the models",
    )
    _add_plan_commands(command)
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
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"the plan {args.plan!r} is not valid TOML: {exc}") from exc
    queues = dict(data.pop("queues", {}))
    for spec in args.queue or []:
        name, _, levels = spec.partition(":")
        if levels and not levels.isdigit():
            raise ValueError(f"--queue {spec!r}: the levels after ':' must be a number")
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
        plan = ProvisionPlan(queues=args.queue_levels)
    elif args.command == "pending":
        plan = ProvisionPlan(delivery_registries=[args.registry])
    elif args.command == "capabilities":
        plan = ProvisionPlan(capability_registry=True)
    else:
        return None
    try:
        missing = await transport.missing(plan)
    except UnsupportedFeatureError as exc:
        # Said after the command's own output, and only if it ran: a command
        # that fails prints its one error line and nothing else.
        args.note = f"transport: note: {exc}; not checked"
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
        try:
            steps = await transport.provision(plan, dry_run=args.dry_run)
        except ConfigurationError as exc:
            # An existing broker object that voids a guarantee: no invalid
            # input of the command (exit 2), a deployment to fix (exit 1).
            out.say(f"transport: cannot provision: {exc} (`transport doctor` says more)")
            return 1
        rows = [
            {
                "object": f"{s.kind} {s.name}",
                "status": {"missing": "would create", "unknown": "would ensure"}.get(
                    s.status, s.status
                ),
                # What a real run would create: the missing ones, not those
                # that exist already (a dry run said "would create" for all).
                "broker_objects": ", ".join(
                    s.missing_objects if s.status == "missing" else s.broker_objects
                )
                or "(in the store)",
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


def _add_plan_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    def plan_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--plan",
            metavar="FILE",
            help="TOML file: queues = {name = levels}, "
            "delivery_registries, capability_registry, event_streams",
        )
        p.add_argument(
            "--queue",
            action="append",
            metavar="NAME[:LEVELS]",
            help="a request queue (with its priority levels; repeatable)",
        )
        p.add_argument(
            "--registry",
            action="append",
            metavar="NAME",
            help="a delivery registry (repeatable)",
        )
        p.add_argument("--capabilities", action="store_true", help="the capability registry")
        p.add_argument(
            "--stream", action="append", metavar="NAME", help="an event-log stream (repeatable)"
        )

    provision = command("provision", "create every topic/stream/table a plan needs (idempotent)")
    plan_args(provision)
    provision.add_argument("--dry-run", action="store_true", help="print the plan, create nothing")
    doctor = command(
        "doctor", "check the deployment against what the guarantees need (exit 1 if void)"
    )
    plan_args(doctor)


# -- end of provision / doctor ---------------------------------------------------


def _schema(args: argparse.Namespace) -> int:
    """``transport schema``: generate (or, with ``--check``, compare) the
    wire schemas; runs without a configuration or a backend."""
    from transport._ops.wireschema import check_schemas, write_schemas

    if args.check:
        if not args.out.is_dir():
            print(
                f"transport: {args.out} is not a directory (--out names the schema files' "
                "directory; the default, docs/schemas, is relative: run it from the "
                "repository root)",
                file=sys.stderr,
            )
            return 1
        problems = check_schemas(args.out)
        for name, problem in problems.items():
            print(f"{args.out / name}: differs from the models", file=sys.stderr)
            if problem.startswith("---"):  # a unified diff
                print(problem, file=sys.stderr, end="")
            else:
                print(f"    {problem}", file=sys.stderr)
        if problems:
            print(
                "transport: the wire schemas are out of date: run `make schemas` "
                "(transport schema --out DIR) and commit the result",
                file=sys.stderr,
            )
            return 1
        print(f"{args.out}: every schema matches the models")
        return 0
    changed = write_schemas(args.out)
    for name in changed:
        print(f"wrote {args.out / name}")
    if not changed:
        print(f"{args.out}: up to date")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader of the output went away (``| head``): stop quietly, as
        # other command-line tools do, with the shell's code for SIGPIPE.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    out = _Output(args.json)
    if args.command == "schema":
        try:
            return _schema(args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            print(f"transport: error: {exc}", file=sys.stderr)
            return 1
    if args.command == "outbox":
        try:
            return asyncio.run(_outbox(args, out))
        except TransportError as exc:
            print(f"transport: error: {exc}", file=sys.stderr)
            return 1
    try:
        configure_logging(args.log_level, fmt=args.log_format)
        if args.config:
            config = TransportConfig.from_toml(
                args.config, **({"url": args.url} if args.url else {})
            )
        else:
            config = load_config(args.url)
        work = _run(args, config, out)
        if args.command not in {"top", "demo", "health"}:  # their own progress or limit
            work = _noticed(config, out, work)
        code = asyncio.run(work)
        if getattr(args, "note", None):
            _Output.progress(args.note)
        return code
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
