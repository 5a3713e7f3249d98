"""``python -m benchmarks [--full] [--backends memory,sqlite,...]``

Starts what it needs, runs every operation for this library and for the
baseline alternately (median of ``--rounds``), prints a table of ratios
(higher is better: ours/baseline for throughput, baseline/ours for latency)
and writes ``benchmarks/results.json``. A run of some backends replaces
only their rows there; each row says which run measured it (``measured``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import Row, Sizes, progress_printer

DEFAULT_ROUNDS = 3
ALL = ["memory", "sqlite", "nats", "kafka", "pulsar", "redis"]
MODULES = {
    "memory": "inprocess",
    "sqlite": "inprocess",
    "nats": "nats",
    "kafka": "kafka",
    "pulsar": "pulsar",
    "redis": "redis",
}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def command(full: bool, rounds: int, backends: set[str]) -> str:
    """The command line that measures ``backends`` as this run did."""
    return (
        "python -m benchmarks"
        + (" --full" if full else "")
        + ("" if rounds == DEFAULT_ROUNDS else f" --rounds {rounds}")
        + (
            ""
            if set(ALL) <= backends
            else f" --backends {','.join(b for b in ALL if b in backends)}"
        )
    )


def merge(
    previous: dict[str, Any] | None, run: dict[str, Any], ran: set[str]
) -> list[dict[str, Any]]:
    """The rows of ``run`` (each stamped with the run as ``measured``) in
    place of the rows of the backends in ``ran``; the rows of the other
    backends of ``previous`` are kept (stamped with their own run if they
    carry no stamp yet). Backends in the order of ``ALL``."""
    stamp = {k: run[k] for k in ("generated_at", "mode", "rounds")}
    stamp["command"] = command(run["mode"] == "full", run["rounds"], ran)
    fresh = [{**row, "measured": row.get("measured", stamp)} for row in run["rows"]]
    kept: list[dict[str, Any]] = []
    if previous is not None:
        old = {k: previous.get(k) for k in ("generated_at", "mode", "rounds")}
        for row in previous.get("rows", []):
            if row.get("backend") not in ran:
                kept.append({**row, "measured": row.get("measured", old)})
    order = {b: i for i, b in enumerate(ALL)}
    every = fresh + kept
    # A stable sort: each backend's rows keep their own order.
    return sorted(every, key=lambda row: order.get(row.get("backend", ""), len(ALL)))


def table(rows: list[Row]) -> str:
    head = f"{'backend':<8} {'operation':<26} {'ours':>12} {'baseline':>12} {'unit':<6} {'ratio':>7} {'target':>7}  baseline"
    lines = [head, "-" * len(head)]
    for r in rows:
        target = "" if r.target is None else (f"{'✓' if r.ratio >= r.target else '✗'} {r.target:g}")
        ratio = "" if r.ratio == 0 else f"{r.ratio:.2f}"
        base = "" if r.baseline == 0 else f"{r.baseline:,.1f}"
        ours = f"{r.ours:,.1f}"
        if r.missing:  # no figure of ours: the target is shown, unmet or met by nobody
            ours, ratio, target = "n/a", "", "" if r.target is None else f"{r.target:g}"
        elif not r.unit:  # a row of text only
            ours = ""
        lines.append(
            f"{r.backend:<8} {r.operation:<26} {ours:>12} {base:>12} {r.unit:<6} {ratio:>7} {target:>7}  {r.baseline_name}"
            + (f" — ours: n/a ({r.missing})" if r.missing and r.unit else "")
        )
    return "\n".join(lines)


async def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--full", action="store_true", help="larger sizes (default: quick)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--backends", default=",".join(ALL))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    args = parser.parse_args()
    sizes = Sizes.for_mode(not args.full, args.rounds)
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows: list[Row] = []
    progress = progress_printer()

    out = Path(args.out)

    def save() -> None:
        """Merge the rows measured so far into ``out``: a run that dies late
        (a broker gone, a stage that hangs) keeps what it had measured."""
        result: dict[str, Any] = {
            "machine": machine(),
            "mode": "quick" if sizes.quick else "full",
            "rounds": sizes.rounds,
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": [r.json() for r in rows],
        }
        previous = json.loads(out.read_text()) if out.exists() else None
        result["rows"] = merge(previous, result, {b for b in wanted if MODULES[b] in done_modules})
        out.write_text(json.dumps(result, indent=2) + "\n")

    done_modules: set[str] = set()
    for backend in wanted:
        module_name = MODULES.get(backend)
        if module_name is None:
            parser.error(f"unknown backend {backend!r} (known: {', '.join(ALL)})")
        if module_name in done_modules:
            continue
        try:
            module = importlib.import_module(f"benchmarks.{module_name}")
        except ImportError as exc:
            progress(f"{backend}: skipped ({exc})")
            continue
        done_modules.add(module_name)
        produced = await module.run(sizes, progress)
        rows += [r for r in produced if r.backend in wanted]
        save()  # after each backend module: seconds once per module, not per row
        progress(f"{module_name}: rows written to {args.out}")
    print(table(rows))
    print(f"\nwritten {args.out} ({machine()})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
