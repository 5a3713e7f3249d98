"""Scale-out: do more worker processes on one queue go faster?

Handler-bound work, as users have it: every handler sleeps 50 ms, each worker
process is an :class:`~transport.Ensemble` at ``concurrency=4`` (so one process
handles at most 80 requests/s), and 1, 2 and 4 such processes work one
backlog of the same queue with the backend's default configuration. The
figure is the rate between the 10th and the 90th percentile of completions
(group joins at start and the tail of the backlog are not counted; a
rebalance in the middle is). Targets: 2 processes >= 1.8x and 4 processes
>= 3.2x one process.

Each backend module calls :func:`scaleout_rows` with its own broker. On its
own: ``python -m benchmarks.scaleout URL [--options JSON] [--full]``; the
worker: ``python -m benchmarks.scaleout --worker URL OPTIONS QUEUE``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from benchmarks._common import Row, config, progress_printer, run_concurrently
from transport import Ensemble, TaskContext, WorkRequest, connect

HANDLER_SECONDS = 0.05
CONCURRENCY = 4
PROCESSES = (1, 2, 4)
TARGETS = {2: 1.8, 4: 3.2}
#: Steady-state seconds one measurement aims at (the backlog is sized so).
SECONDS_QUICK, SECONDS_FULL = 5.0, 20.0


# -- the worker process ----------------------------------------------------------
async def _worker(url: str, options: dict[str, Any], namespace: str, queue: str) -> None:
    transport = await connect(config(url, options, namespace))
    out = sys.stdout

    async def work(ctx: TaskContext) -> dict[str, Any]:
        await asyncio.sleep(HANDLER_SECONDS)
        out.write(f"done {ctx.request.request_id} {time.time():.6f}\n")
        out.flush()
        return {}

    ensemble = Ensemble(
        queue, transport=transport, concurrency=CONCURRENCY, advertise=False, stats_interval=None
    )
    ensemble.add_task("work", work)
    out.write("ready\n")
    out.flush()
    try:
        await ensemble.run()
    finally:
        await transport.aclose()


# -- the harness -----------------------------------------------------------------
async def _enqueue(url: str, options: dict[str, Any], namespace: str, queue: str, n: int) -> None:
    transport = await connect(config(url, options, namespace))
    try:
        q = transport.request_queue(queue)
        await run_concurrently(n, 64, lambda i: q.enqueue(WorkRequest(task="work", payload={})))
    finally:
        await transport.aclose()


async def _read(
    proc: asyncio.subprocess.Process, seen: dict[str, float], need: int, done: asyncio.Event
) -> None:
    assert proc.stdout is not None
    async for raw in proc.stdout:
        parts = raw.decode().split()
        if len(parts) == 3 and parts[0] == "done":
            seen.setdefault(parts[1], float(parts[2]))  # a redelivered copy counts once
            if len(seen) >= need:
                done.set()


async def measure(
    url: str, options: dict[str, Any], processes: int, n: int, timeout: float
) -> float:
    """Requests/s of ``processes`` workers draining a backlog of ``n``."""
    namespace = f"so{uuid.uuid4().hex[:6]}"
    queue = "scale"
    # The queue exists (and, on Kafka, has its partitions) before the workers
    # start: the backlog is written first, as a deployment scaling out finds it.
    await _enqueue(url, options, namespace, queue, n)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.scaleout",
            "--worker",
            url,
            json.dumps(options),
            namespace,
            queue,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(processes)
    ]
    seen: dict[str, float] = {}
    done = asyncio.Event()
    readers = [asyncio.ensure_future(_read(p, seen, n, done)) for p in procs]
    try:
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(
                f"{processes} worker(s) finished {len(seen)} of {n} requests in {timeout:g} s"
            ) from None
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 30)
            except TimeoutError:
                p.kill()
                await p.wait()
        for r in readers:
            r.cancel()
    times = sorted(seen.values())
    lo, hi = times[len(times) // 10], times[(len(times) * 9) // 10]
    counted = (len(times) * 9) // 10 - len(times) // 10
    return counted / max(hi - lo, 1e-9)


async def scaleout_rows(
    backend: str,
    url: str,
    options: dict[str, Any],
    quick: bool,
    progress: Callable[[str], None],
    note: str = "",
    label: str = "",
) -> list[Row]:
    """The scale-out rows of one backend (1 process is the baseline)."""
    seconds = SECONDS_QUICK if quick else SECONDS_FULL
    per_process = CONCURRENCY / HANDLER_SECONDS
    rates: dict[int, float] = {}
    for k in PROCESSES:
        n = int(per_process * k * seconds)
        progress(f"{backend}: scale-out{label}, {k} worker process(es), {n:,} requests")
        rates[k] = await measure(url, options, k, n, timeout=seconds * 6 + 60)
    base = f"1 worker process ({rates[1]:,.0f}/s; at most {per_process:.0f}/s)"
    if note:
        base += f"; {note}"
    return [
        Row(
            backend,
            f"scale-out {k} processes{label}",
            rates[k],
            rates[1],
            base,
            "req/s",
            rates[k] / rates[1],
            TARGETS[k],
        )
        for k in PROCESSES
        if k > 1
    ]


async def _main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaleout")
    parser.add_argument("url")
    parser.add_argument("--options", default="{}")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--backend", default="")
    args = parser.parse_args()
    progress = progress_printer()

    backend = args.backend or args.url.split(":", 1)[0]
    rows = await scaleout_rows(backend, args.url, json.loads(args.options), not args.full, progress)
    for r in rows:
        print(
            f"{r.backend:<8} {r.operation:<24} {r.ours:>8.1f} {r.baseline:>8.1f} {r.ratio:>5.2f} (target {r.target:g})"
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, url, options, namespace, queue = sys.argv
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_worker(url, json.loads(options), namespace, queue))
        sys.exit(0)
    sys.exit(asyncio.run(_main()))
