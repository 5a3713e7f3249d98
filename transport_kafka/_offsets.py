"""Which offsets may be committed, per partition, when acks come in any order.

Kafka commits a single position per partition: everything before it counts
as done. With concurrent handlers, acks arrive out of order, so the position
we may commit is the lowest offset still outstanding (fetched but not
settled), or one past the highest offset seen if nothing is outstanding —
never beyond an unsettled record. Gaps in offsets (compaction, transaction
markers) are harmless because only offsets actually seen are tracked.

Each assignment of a partition gets a new *generation*. When a partition is
revoked, its outstanding records belong to whoever gets it next: settling
one of them through the old generation is refused (the caller reports the
lease as lost, the record is redelivered — never lost).

A settled offset is *durable* once a commit covers it (``covered``): for a
revoked generation, the commit made on revocation counts (``retire``).

Thread-safe: the consumer thread tracks and revokes, the event loop settles.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import dataclass, field

__all__ = ["OffsetTracker"]

_generations = itertools.count(1)


@dataclass
class _Partition:
    generation: int
    committed: int | None  # last committed position (None: never committed)
    high: int | None = None  # one past the highest offset seen
    outstanding: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)  # lazy min-heap over outstanding

    def lowest(self) -> int | None:
        while self.heap and self.heap[0] not in self.outstanding:
            heapq.heappop(self.heap)
        return self.heap[0] if self.heap else None

    def safe(self) -> int | None:
        lowest = self.lowest()
        if lowest is not None:
            return lowest
        return self.high if self.high is not None else self.committed


class OffsetTracker:
    """Per-partition bookkeeping of fetched, settled and committable offsets."""

    _RETIRED_KEPT = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[int, _Partition] = {}
        # (partition, generation) of revoked generations → committed position
        self._retired: dict[tuple[int, int], int | None] = {}

    def assign(self, partition: int, committed: int | None) -> int:
        """Start a new generation for ``partition``; returns it."""
        with self._lock:
            gen = next(_generations)
            self._parts[partition] = _Partition(
                gen, committed if committed is not None and committed >= 0 else None
            )
            return gen

    def revoke(self, partition: int) -> int | None:
        """Forget ``partition``; returns the position safe to commit (or None)."""
        with self._lock:
            part = self._parts.pop(partition, None)
            if part is None:
                return None
            self._retired[(partition, part.generation)] = part.committed
            while len(self._retired) > self._RETIRED_KEPT:
                del self._retired[next(iter(self._retired))]
            safe = part.safe()
            return safe if safe is not None and safe != part.committed else None

    def generation(self, partition: int) -> int | None:
        with self._lock:
            part = self._parts.get(partition)
            return None if part is None else part.generation

    def current(self, partition: int, generation: int) -> bool:
        with self._lock:
            part = self._parts.get(partition)
            return part is not None and part.generation == generation

    def track(self, partition: int, offset: int, generation: int, *, settled: bool = False) -> bool:
        """Record a fetched offset (``settled``: already done, e.g. acked
        before a crash). False if the generation is stale."""
        with self._lock:
            part = self._parts.get(partition)
            if part is None or part.generation != generation:
                return False
            return self._track(part, offset, settled)

    def track_fetched(self, partition: int, offset: int, settled: bool) -> int | None:
        """:meth:`track` under the partition's current generation (one lock
        for both): that generation, or None if the partition is not
        assigned or ``offset`` is already committed."""
        with self._lock:
            part = self._parts.get(partition)
            if part is None or not self._track(part, offset, settled):
                return None
            return part.generation

    @staticmethod
    def _track(part: _Partition, offset: int, settled: bool) -> bool:
        """Record ``offset`` in ``part`` (the caller holds the lock). False
        if a commit already covers it (a refetch after a seek)."""
        if part.committed is not None and offset < part.committed:
            return False
        high = part.high
        if high is None or offset >= high:
            part.high = offset + 1
        if not settled and offset not in part.outstanding:
            part.outstanding.add(offset)
            heapq.heappush(part.heap, offset)
        return True

    def settle(self, partition: int, offset: int, generation: int) -> bool:
        """Mark ``offset`` done. False if the generation is stale or it was
        not outstanding (already settled)."""
        with self._lock:
            part = self._parts.get(partition)
            if part is None or part.generation != generation or offset not in part.outstanding:
                return False
            part.outstanding.discard(offset)
            return True

    def settle_many(self, offsets: list[tuple[int, int, int]]) -> list[bool]:
        """:meth:`settle` for each ``(partition, offset, generation)``, under
        one lock (a batch ack)."""
        out: list[bool] = []
        with self._lock:
            parts = self._parts
            for partition, offset, generation in offsets:
                part = parts.get(partition)
                if part is None or part.generation != generation or offset not in part.outstanding:
                    out.append(False)
                else:
                    part.outstanding.discard(offset)
                    out.append(True)
        return out

    def unsettle(self, partition: int, offset: int, generation: int) -> bool:
        """Undo ``settle`` when it could not be made durable: the offset is
        outstanding again unless a commit already covers it. False if the
        generation is stale or the offset is already committed."""
        with self._lock:
            part = self._parts.get(partition)
            if part is None or part.generation != generation:
                return False
            if part.committed is not None and offset < part.committed:
                return False
            if offset not in part.outstanding:
                part.outstanding.add(offset)
                heapq.heappush(part.heap, offset)
            return True

    def covered(self, partition: int, offset: int, generation: int) -> bool:
        """True if a successful commit of ``generation`` is past ``offset``."""
        with self._lock:
            part = self._parts.get(partition)
            if part is not None and part.generation == generation:
                committed = part.committed
            else:
                committed = self._retired.get((partition, generation))
            return committed is not None and offset < committed

    def covered_many(self, offsets: list[tuple[int, int, int]]) -> list[bool]:
        """:meth:`covered` for each ``(partition, offset, generation)``,
        under one lock."""
        with self._lock:
            out: list[bool] = []
            for partition, offset, generation in offsets:
                part = self._parts.get(partition)
                if part is not None and part.generation == generation:
                    committed = part.committed
                else:
                    committed = self._retired.get((partition, generation))
                out.append(committed is not None and offset < committed)
            return out

    def is_outstanding(self, partition: int, offset: int, generation: int) -> bool:
        # No lock: one dict lookup and one set lookup are atomic reads, and a
        # caller racing a concurrent settle or revoke sees either side of it,
        # as it would a moment earlier or later with the lock (the hot path:
        # several checks per delivery).
        part = self._parts.get(partition)
        return part is not None and part.generation == generation and offset in part.outstanding

    def position(self, partition: int, generation: int) -> int | None:
        """The position a commit of ``generation`` could reach now (every
        offset below it is settled), or None."""
        with self._lock:
            part = self._parts.get(partition)
            if part is None or part.generation != generation:
                return None
            return part.safe()

    def commit_candidates(self) -> dict[int, int]:
        """Partition → position that may be committed and is ahead of the
        last commit."""
        with self._lock:
            out: dict[int, int] = {}
            for p, part in self._parts.items():
                safe = part.safe()
                if safe is not None and (part.committed is None or safe > part.committed):
                    out[p] = safe
            return out

    def committed(self, partition: int, position: int, generation: int | None = None) -> None:
        """Record a successful commit of ``position`` (for ``generation``: a
        commit made while revoking it)."""
        with self._lock:
            part = self._parts.get(partition)
            if part is not None and (generation is None or part.generation == generation):
                if part.committed is None or position > part.committed:
                    part.committed = position
                return
            key = (partition, generation) if generation is not None else None
            if key is not None and key in self._retired:
                old = self._retired[key]
                if old is None or position > old:
                    self._retired[key] = position

    def outstanding(self) -> int:
        with self._lock:
            return sum(len(p.outstanding) for p in self._parts.values())

    def snapshot(self) -> dict[int, tuple[int | None, int | None]]:
        """Partition → (committed, high) for stats."""
        with self._lock:
            return {p: (part.committed, part.high) for p, part in self._parts.items()}

    def partitions(self) -> list[int]:
        with self._lock:
            return sorted(self._parts)
