"""Delivery counts of a Kafka queue: reservation rounds and withdrawal.

Kafka counts no deliveries, so a record's next delivery is written to the
state topic (acks=all) before it is handed out. Polls in progress share one
round of these writes (one state record per partition, keyed
``"<p>:r<low>-<high>.<id>"``), which also counts the next few records ahead
(at most twice the demand: polls in progress, the rest of a batch poll,
leases held; 1,024 at most; with ``max_attempts=1`` none ahead, only the
polls in progress and the rest of a batch). A
consumer giving a partition up cleanly withdraws the counts it reserved for
records it did not hand out, by rewriting their state keys (the latest value
of a key holds). Event loop, except :meth:`_Counts._withdraw_from_thread`,
which a revocation calls on the consumer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from transport.kit import retrieve
from transport_kafka._records import (
    _RESERVE_MAX,
    _Record,
    _tokens,
)
from transport_kafka._state import _EngineState

log = logging.getLogger("transport.kafka")


class _Counts(_EngineState):
    """The engine's part that reserves and withdraws delivery counts."""

    async def _write_counts(self, partition: int, recs: list[_Record]) -> bytes:
        """One state record with the delivery counts of ``recs`` (all of
        ``partition``), keyed uniquely so that compaction keeps it until
        the committed offset passes all of them. Returns its key."""
        low = min(r.offset for r in recs)
        high = max(r.offset for r in recs)
        key = f"{partition}:r{low}-{high}.{self._round_prefix}{next(_tokens)}".encode()
        value = json.dumps({"ds": [[r.offset, r.deliveries] for r in recs]}, separators=(",", ":"))
        # Until its report comes the round is not in ``_counted``: a
        # program ending meanwhile (its tasks cancelled) withdraws it at
        # exit by key (see _withdraw_at_exit).
        self._rounds_unconfirmed.add(key)
        try:
            await self.clients.produce(
                self.topics.state, key, value.encode(), what="writing delivery state"
            )
        except Exception:
            self._rounds_unconfirmed.discard(key)
            raise
        self._rounds_unconfirmed.discard(key)
        with self._marked_lock:
            self._marked_rounds.setdefault(partition, {})[key] = high
        return key

    async def _write_marker(self, rec: _Record, value: bytes) -> None:
        """Write a state marker (JSON: ``{"d": deliveries}`` or ``{"s": 1}``)."""
        await self.clients.produce(
            self.topics.state, rec.state_key, value, what="writing delivery state"
        )
        with self._marked_lock:
            self._marked.setdefault(rec.partition, set()).add(rec.offset)

    async def _reserve(self, max_attempts: int) -> None:
        """Count the next delivery of the records at the head of the buffer
        in the state topic, one round of markers for all waiting pollers."""
        task = self._reserving
        if task is None or task.done():
            task = self._reserving = asyncio.ensure_future(self._reserve_round(max_attempts))
        await asyncio.shield(task)

    def _reserve_ahead(self, max_attempts: int) -> None:
        """Start the next round of delivery counts before the polls in
        progress need it (background; a failure shows in the next poll).
        Not with a single attempt: a count ahead that a killed process
        leaves behind would dead-letter a request no handler saw."""
        if max_attempts < 2 or (self._reserving is not None and not self._reserving.done()):
            return
        index = min(self._demand(), len(self.ready) - 1)
        if index >= 0 and not self.ready[index].reserved:
            self._reserving = asyncio.ensure_future(self._reserve_round(max_attempts))
            self._reserving.add_done_callback(retrieve)

    async def _reserve_round(self, max_attempts: int) -> None:
        # Twice the demand: the next polls find their record counted
        # already. A process killed now over-counts at most these (like a
        # broker counting a prefetched batch as delivered).
        # Those counted by an earlier round and not handed out yet are part
        # of it: at most that many are ever reserved and not handed out.
        # With a single attempt only the polls in progress (and the rest of
        # a batch) are counted: a record counted and not handed out before a
        # kill would be exhausted without a delivery.
        if max_attempts < 2:
            want = min(_RESERVE_MAX, max(1, self._pollers + self._batch_demand))
        else:
            want = min(_RESERVE_MAX, 2 * max(1, self._demand()))
        picked: list[_Record] = []
        ahead = 0
        for rec in self.ready:
            if len(picked) + ahead >= want:
                break
            if rec.reserved:
                # Counted already (not checked for being live: one settled
                # or moved away meanwhile only makes this round smaller,
                # and the walk over a long counted run stays cheap).
                ahead += 1
                continue
            if not self._live(rec):
                continue
            if self._decoded(rec) is None:
                continue
            if rec.attempts >= max_attempts:
                continue
            picked.append(rec)
        by_partition: dict[int, list[_Record]] = {}
        for rec in picked:
            rec.deliveries += 1
            rec.counting = True
            by_partition.setdefault(rec.partition, []).append(rec)
        groups = list(by_partition.items())
        try:
            results = await asyncio.gather(
                *(self._write_counts(p, recs) for p, recs in groups), return_exceptions=True
            )
        finally:  # written, failed or cancelled (then maybe written: an over-count)
            for rec in picked:
                rec.counting = False
        failed: BaseException | None = None
        self._prune_counted()
        for (partition, recs), result in zip(groups, results, strict=True):
            for rec in recs:
                if isinstance(result, BaseException):
                    rec.deliveries -= 1
                else:
                    rec.reserved = True
            if isinstance(result, BaseException):
                failed = failed or result
            else:
                key = result
                for rec in recs:
                    rec.count_key = key
                self._counted[key] = (partition, {r.offset: r.deliveries for r in recs}, recs)
        if failed is not None:
            raise failed

    def _prune_counted(self) -> None:
        """Forget state keys none of whose records is still reserved there."""
        for key, (_, _, recs) in list(self._counted.items()):
            if not any(r.reserved and r.count_key == key for r in recs):
                del self._counted[key]

    def _withdraw_from_thread(self, partitions: set[int]) -> None:
        loop = self._loop
        if loop is None or not partitions or loop.is_closed() or not loop.is_running():
            return  # nothing can run the withdrawal: the counts stay (over-count)
        try:
            future = asyncio.run_coroutine_threadsafe(self._withdraw(partitions), loop)
        except RuntimeError:  # the loop is closed: nothing to withdraw with
            return
        try:
            future.result(self.options.operation_timeout_s)
        except Exception as exc:  # the counts stay: attempts over-count, nothing is lost
            future.cancel()
            log.warning(
                "queue %r: reserved delivery counts not withdrawn (%s): %s",
                self.name,
                type(exc).__name__,
                exc,
            )

    async def _withdraw(self, partitions: set[int]) -> None:
        """Withdraw the delivery counts reserved in the state topic for
        records of ``partitions`` not handed out: rewrite each state key
        holding one with the count before the reservation."""
        pending = self._reserving
        if pending is not None and not pending.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(pending)
        writes = self._withdrawals(partitions)
        if writes:
            await asyncio.gather(
                *(
                    self.clients.produce(
                        self.topics.state, key, value, what="withdrawing delivery counts"
                    )
                    for key, value in writes
                )
            )

    def _withdrawal_of(self, rec: _Record) -> tuple[bytes, bytes] | None:
        """Withdraw the count reserved for ``rec`` alone: it is no longer
        reserved once this returns; the state write that withdraws it
        (its round's key with its count lowered, the others' as they are),
        or ``None`` if no count is reserved for it."""
        key = rec.count_key
        entry = None if key is None else self._counted.get(key)
        if key is None or entry is None or not rec.reserved:
            return None
        partition, counts, _ = entry
        rec.deliveries -= 1
        rec.reserved = False
        rec.count_key = None
        counts[rec.offset] = rec.deliveries
        self._prune_counted()
        return key, self._state_value(key, partition, counts, rec.offset)

    @staticmethod
    def _state_value(key: bytes, partition: int, counts: dict[int, int], offset: int) -> bytes:
        """The value of state key ``key`` holding ``counts`` (a round's), or
        the count of ``offset`` (a one-record key)."""
        if key.startswith(f"{partition}:r".encode()):
            return json.dumps({"ds": sorted(counts.items())}, separators=(",", ":")).encode()
        return b'{"d":%d}' % counts[offset]

    def _withdrawals(self, partitions: set[int] | None) -> list[tuple[bytes, bytes]]:
        """The state writes that withdraw the counts reserved for records
        of ``partitions`` (every partition: ``None``) not handed out; those
        records are no longer reserved once this returns."""
        writes: list[tuple[bytes, bytes]] = []
        for key, (partition, counts, recs) in list(self._counted.items()):
            if partitions is not None and partition not in partitions:
                continue
            del self._counted[key]
            taken = [r for r in recs if r.reserved and r.count_key == key]
            for rec in taken:
                rec.deliveries -= 1
                rec.reserved = False
                rec.count_key = None
                counts[rec.offset] = rec.deliveries
            if not taken:
                continue
            writes.append((key, self._state_value(key, partition, counts, taken[0].offset)))
        return writes

    def _withdraw_at_exit(self, deadline: float) -> None:
        """At interpreter exit, with the event loop gone (a program that
        ended without ``aclose()``): withdraw every reserved count with
        the producer directly, waiting for the writes until ``deadline``."""
        writes: list[tuple[bytes, bytes | None]] = [*self._withdrawals(None)]
        # A round whose report never reached the loop counted only records
        # not handed out (a hand-out waits for that report): its key goes.
        writes.extend((key, None) for key in sorted(self._rounds_unconfirmed))
        self._rounds_unconfirmed.clear()
        producer = self.clients.existing_producer()
        if not writes or producer is None:
            return
        failed: list[object] = []

        def report(err: object, _msg: object) -> None:
            if err is not None:
                failed.append(err)

        try:
            for key, value in writes:
                producer.produce(self.topics.state, value=value, key=key, on_delivery=report)
            left = producer.flush(max(0.0, deadline - time.monotonic()))
        except Exception as exc:  # the counts stay: attempts over-count, nothing is lost
            failed.append(exc)
            left = 0
        if left or failed:
            log.warning(
                "queue %r: reserved delivery counts not withdrawn at exit (%s)",
                self.name,
                failed[0] if failed else f"{left} writes not confirmed in time",
            )
