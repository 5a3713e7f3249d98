"""Registries stay small: a caller restarting on a registry that holds many
collected responses.

Collecting a response deletes its registration (``p.<id>``) and its
completion (``c.<id>``): nothing of it stays live, but a log that has not
compacted (Tansu never does, Kafka does eventually, a Pulsar topic keeps its
history) still holds every record and tombstone, and a caller answering 100
requests/s writes millions of them. This fills a registry with ``n``
collected responses the way a caller leaves them -- per request a
``pending`` record under ``p.<id>``, a ``completed`` one (with a small
response) under ``c.<id>``, then a delete of each, written straight to the
registry's keyed log (what ``register``, ``complete`` and ``result`` write,
without the round trips) -- then opens the registry once, as the caller
that wrote it had it open, so that a resumable log gets the checkpoint such
a caller's view writes (timed: that load is a replay of the whole history).
It then times, in a fresh process, a caller's restart: ``connect`` +
``delivery_registry(name).pending()`` (which waits for the replay), and its
RSS growth. The baseline is the same restart on an empty registry of the
same broker. Targets: at most 5 s and 50 MB above the empty registry (for
200,000; ``--full``).

``python -m benchmarks.registry URL [--n N]``; each backend module calls
:func:`registry_rows` with its broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from benchmarks._common import Row, config, progress_printer
from transport import WorkResponse, connect
from transport.kit import encode, utcnow

N_QUICK, N_FULL = 20_000, 200_000
TARGET_SECONDS, TARGET_MB = 5.0, 50.0
#: Seconds the fill waits, after its last write, for the registry's view to
#: have applied every change and done its upkeep; then the stage gives up
#: (rows "n/a" with the reason) instead of holding up the whole run.
SETTLE_TIMEOUT = 300.0


class NotSettledError(RuntimeError):
    """The registry's view did not apply the fill's changes in time."""


async def fill(
    url: str,
    options: dict[str, Any],
    namespace: str,
    name: str,
    n: int,
    progress: Callable[[str], None],
) -> None:
    """Write ``n`` collected responses (pending and completed records, each
    deleted) into delivery registry ``name`` with the registry's view open,
    as the caller that collected them had it, and wait for the view's upkeep:
    the checkpoint it saves on a resumable log, the tombstones it removes
    where the log keeps them (at once here, not a minute later: the fill's
    minutes stand in for the hours such a caller runs)."""
    from transport._spi import registries
    from transport._spi.registries import DeliveryRecord

    registries._FORGET_AFTER = 0.0

    transport = await connect(config(url, options, namespace))
    try:
        registry = transport.delivery_registry(name)
        await registry.pending()  # the caller's view, open while it collects
        log_ = registry._log  # the registry's keyed log: what its writes go to
        now = utcnow()
        expires = now + timedelta(days=7)
        done = 0
        started = time.perf_counter()

        async def one(i: int) -> None:
            rid = f"req-{i:08d}"
            response = WorkResponse(request_id=rid, status="completed", result={"i": i})
            pending = DeliveryRecord(
                request_id=rid, state="pending", created_at=now, expires_at=expires
            )
            completed = DeliveryRecord(
                request_id=rid,
                state="completed",
                response=response,
                created_at=now,
                expires_at=expires,
            )
            await log_.put(f"p.{rid}", encode(pending))
            await log_.put(f"c.{rid}", encode(completed))
            await log_.delete(f"p.{rid}")
            await log_.delete(f"c.{rid}")

        it = iter(range(n))

        async def worker() -> None:
            nonlocal done
            for i in it:
                await one(i)
                done += 1
                if done % 20_000 == 0:
                    rate = done / (time.perf_counter() - started)
                    progress(f"registry: filled {done:,} of {n:,} ({rate:,.0f}/s)")

        await asyncio.gather(*(worker() for _ in range(64)))
        settling = time.perf_counter()
        try:
            await asyncio.wait_for(registry._view.settled(4 * n), SETTLE_TIMEOUT)
        except TimeoutError:
            raise NotSettledError(
                f"the registry's view had applied {registry._view.changes:,} of the fill's "
                f"{4 * n:,} changes {SETTLE_TIMEOUT:g} s after the fill and had not settled"
            ) from None
        progress(
            f"registry: the view saw {4 * n:,} changes and did its upkeep"
            f" ({time.perf_counter() - settling:.0f} s after the fill)"
        )
        await registry.aclose()
        check = transport.delivery_registry(name)
        checkpoint = await check._log.load_checkpoint()
        progress(
            f"registry: checkpoint of {len(checkpoint):,} bytes saved"
            if checkpoint is not None
            else "registry: no checkpoint (the backend's keyed log is not resumable)"
        )
        await check.aclose()
    finally:
        await transport.aclose()


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _restart(url: str, options: dict[str, Any], namespace: str, name: str) -> None:
    """The measured process: a caller starting on registry ``name``."""
    before = _rss_mb()
    started = time.perf_counter()
    transport = await connect(config(url, options, namespace))
    try:
        registry = transport.delivery_registry(name)
        live = await registry.pending()
        seconds = time.perf_counter() - started
        print(json.dumps({"seconds": seconds, "rss_mb": _rss_mb() - before, "live": len(live)}))
    finally:
        await transport.aclose()


async def restart(
    url: str, options: dict[str, Any], namespace: str, name: str
) -> tuple[float, float, int]:
    """(seconds, RSS growth MB, live records) of a fresh caller process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.registry",
        "--restart",
        url,
        json.dumps(options),
        namespace,
        name,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 900)
    if proc.returncode != 0:
        raise RuntimeError(f"the restarted caller failed (exit {proc.returncode})")
    figures = json.loads(out.decode().strip().splitlines()[-1])
    return figures["seconds"], figures["rss_mb"], figures["live"]


async def registry_rows(
    backend: str,
    url: str,
    options: dict[str, Any],
    quick: bool,
    progress: Callable[[str], None],
    n: int | None = None,
) -> list[Row]:
    """The restart rows of one backend: time and RSS above an empty registry."""
    n = n or (N_QUICK if quick else N_FULL)
    namespace = f"rg{uuid.uuid4().hex[:6]}"
    progress(f"{backend}: registry with {n:,} collected responses")
    label = f"{n // 1000}k collected responses" if n >= 1000 else f"{n} collected responses"
    try:
        await fill(url, options, namespace, "caller", n, progress)
    except NotSettledError as exc:
        progress(f"{backend}: registry stage given up: {exc}")
        return [
            Row(backend, f"{operation}, {label}", 0.0, 0.0, "", unit, 0.0, missing=str(exc))
            for operation, unit in (("caller restart", "s"), ("caller RSS", "MB"))
        ]
    empty = await restart(url, options, namespace, "empty")
    full = await restart(url, options, namespace, "caller")
    if full[2] != 0:
        raise RuntimeError(f"{full[2]} collected responses replayed as live")
    rows = []
    for operation, index, unit, target, digits, above in (
        ("caller restart", 0, "s", TARGET_SECONDS, 2, ""),
        ("caller RSS", 1, "MB", TARGET_MB, 1, " above it"),
    ):
        grown = full[index] - empty[index]
        met = "met" if grown <= target else "missed"
        rows.append(
            Row(
                backend,
                f"{operation}, {label}",
                round(full[index], digits),
                round(empty[index], digits),
                f"the same restart on an empty registry: {grown:+.{digits}f} {unit}"
                f" (target at most {target:g} {unit}{above}: {met})",
                unit,
                0.0,
            )
        )
    return rows


async def _main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.registry")
    parser.add_argument("url")
    parser.add_argument("--options", default="{}")
    parser.add_argument("--n", type=int, default=N_QUICK)
    parser.add_argument("--backend", default="")
    args = parser.parse_args()
    progress = progress_printer()

    backend = args.backend or args.url.split(":", 1)[0]
    rows = await registry_rows(
        backend, args.url, json.loads(args.options), True, progress, n=args.n
    )
    for r in rows:
        print(f"{r.backend:<8} {r.operation:<36} {r.ours:>8} {r.unit:<3} {r.baseline_name}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--restart":
        _, _, url, options, namespace, name = sys.argv
        asyncio.run(_restart(url, json.loads(options), namespace, name))
        sys.exit(0)
    sys.exit(asyncio.run(_main()))
