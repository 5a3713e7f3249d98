"""Measurement helpers shared by every backend's benchmark."""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from transport import TransportConfig


@dataclass
class Sizes:
    quick: bool
    enqueue: int
    consume: int
    round_trips: int
    concurrency: int = 64
    rounds: int = 3

    @classmethod
    def for_mode(cls, quick: bool, rounds: int) -> Sizes:
        if quick:
            return cls(quick=True, enqueue=2000, consume=2000, round_trips=200, rounds=rounds)
        return cls(quick=False, enqueue=20000, consume=20000, round_trips=2000, rounds=rounds)


def config(url: str, options: dict[str, Any], namespace: str) -> TransportConfig:
    """The configuration a measurement connects with."""
    return TransportConfig(url=url, namespace=namespace, options=options)


def progress_printer() -> Callable[[str], None]:
    """A progress callback printing ``[seconds since now] text`` to stderr."""
    started = time.perf_counter()

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {text}", file=sys.stderr, flush=True)

    return progress


@dataclass
class Row:
    backend: str
    operation: str
    ours: float
    baseline: float
    baseline_name: str
    unit: str
    ratio: float
    target: float | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    #: why this library has no figure in the row ("" when it has one)
    missing: str = ""

    def json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples")
        data["met"] = None if self.target is None else self.ratio >= self.target
        if self.missing:
            data["ours"] = data["ratio"] = data["met"] = None
        else:
            data.pop("missing")
        return data


Measure = Callable[[], Awaitable[float]]


async def alternate(
    ours: Measure, baseline: Measure, rounds: int
) -> tuple[list[float], list[float]]:
    """Run ``ours`` and ``baseline`` alternately ``rounds`` times each."""
    a: list[float] = []
    b: list[float] = []
    for i in range(rounds):
        for which, fn, out in (
            ((0, ours, a), (1, baseline, b)) if i % 2 == 0 else ((1, baseline, b), (0, ours, a))
        ):
            del which
            gc.collect()
            out.append(await fn())
    return a, b


def throughput_row(
    backend: str,
    operation: str,
    ours: list[float],
    base: list[float],
    baseline_name: str,
    target: float | None,
    unit: str = "msg/s",
) -> Row:
    o, b = statistics.median(ours), statistics.median(base)
    return Row(
        backend,
        operation,
        round(o, 1),
        round(b, 1),
        baseline_name,
        unit,
        round(o / b, 3),
        target,
        {"ours": ours, "baseline": base},
    )


def latency_row(
    backend: str,
    operation: str,
    ours: list[float],
    base: list[float],
    baseline_name: str,
    target: float | None,
    unit: str = "ms",
) -> Row:
    o, b = statistics.median(ours), statistics.median(base)
    return Row(
        backend,
        operation,
        round(o, 3),
        round(b, 3),
        baseline_name,
        unit,
        round(b / o, 3),
        target,
        {"ours": ours, "baseline": base},
    )


async def rate(n: int, body: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await body()
    return n / (time.perf_counter() - start)


async def run_concurrently(n: int, concurrency: int, one: Callable[[int], Awaitable[Any]]) -> None:
    """Call ``one(i)`` for i in range(n) with ``concurrency`` in flight."""
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
