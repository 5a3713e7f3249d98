"""A Jepsen-style ledger: every enqueue attempt and every processing event,
reduced to enqueued / acknowledged / processed / lost / duplicated.

A timed-out or failed enqueue is *indeterminate*: it may or may not have been
stored, so it is never counted as lost (nor required to be processed).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Ledger:
    attempted: set[str] = field(default_factory=set)
    acknowledged: set[str] = field(default_factory=set)
    indeterminate: set[str] = field(default_factory=set)
    processed: Counter[str] = field(default_factory=Counter)
    acked: set[str] = field(default_factory=set)
    in_flight_at_faults: set[str] = field(default_factory=set)
    dead_lettered: int = 0

    def read_lines(self, lines: list[str]) -> None:
        """Fold a producer's or worker's stdout (transport.testing.worker)."""
        leased: set[str] = set()
        acked: set[str] = set()
        for line in lines:
            verb, _, rest = line.partition(" ")
            rid = rest.split(" ")[0] if rest else ""
            if verb == "ATTEMPT":
                self.attempted.add(rid)
            elif verb == "ENQUEUED":
                self.acknowledged.add(rid)
            elif verb == "INDETERMINATE":
                self.indeterminate.add(rid)
            elif verb == "LEASED":
                self.processed[rid] += 1
                leased.add(rid)
            elif verb in ("ACKED", "ACKING"):
                # ACKING without ACKED: killed during the ack; the drain
                # checks the queue is empty, so an ack that did not commit
                # shows up as a redelivery, never as a silent loss.
                self.acked.add(rid)
                acked.add(rid)
        return None

    def fault(self, lines: list[str]) -> None:
        """Record what a killed process had in flight (leased, not acked)."""
        leased = {ln.split()[1] for ln in lines if ln.startswith("LEASED ")}
        acked = {ln.split()[1] for ln in lines if ln.startswith("ACKED ")}
        self.in_flight_at_faults |= leased - acked

    @property
    def lost(self) -> set[str]:
        return self.acknowledged - self.acked

    @property
    def duplicated(self) -> set[str]:
        return {rid for rid, n in self.processed.items() if n > 1}

    def row(self, backend: str, fault: str, **extra: object) -> dict[str, object]:
        return {
            "backend": backend,
            "fault": fault,
            "enqueued": len(self.attempted) or len(self.acknowledged),
            "acknowledged": len(self.acknowledged),
            "indeterminate": len(self.indeterminate - self.acknowledged),
            "processed": len(self.processed),
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "dead_lettered": self.dead_lettered,
            **extra,
        }
