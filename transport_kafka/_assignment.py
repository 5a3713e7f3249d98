"""The consumer-thread side of a Kafka queue engine: fetched records,
commits, state markers, assignment and revocation, priming, backpressure.

Called only on the member's consumer thread (:mod:`._member` runs the steps
and the rebalance callbacks). Only the contiguous settled prefix of a
partition is committed, synchronously and under the member's commit lock;
an assignment replays the state topic (delivery counts, "settled" markers)
and notes the high watermarks the fetch must reach before the engine is
primed; a revocation commits what is safe and withdraws the delivery counts
reserved ahead. Anything for the event loop is posted to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from transport_kafka._client import (
    _client_logger,
    decode_headers,
    read_to_end,
)
from transport_kafka._counts import _Counts
from transport_kafka._leases import _Leases
from transport_kafka._records import (
    _SETTLED,
    H_ATTEMPTS,
    H_ERROR,
    H_NOT_BEFORE,
    H_REQUEST_ID,
    _int_header,
    _Record,
    _replay_markers,
)

log = logging.getLogger("transport.kafka")

#: How often a revocation waiting for a hand-over runs the commits that acks wait for.
_HANDOVER_TICK = 0.02
#: How long a wake of a resumed partition's fetcher waits for its answer.
_WAKE_WAIT_S = 0.001


class _Assignment(_Counts, _Leases):
    """The engine's consumer-thread part (see the module docstring)."""

    def _ingest(self, msg: Any) -> _Record | None:
        """A fetched record of this queue's topic (consumer thread): tracked,
        and returned for the buffer unless already settled or stale. (Read
        from the client's message directly: this runs for every record, on
        the thread that shares the interpreter lock with the event loop.)"""
        p, off = msg.partition(), msg.offset()
        fetched = self._fetched
        if fetched.get(p, 0) <= off:
            fetched[p] = off + 1
        marker = self._markers.pop((p, off), None) if self._markers else None
        settled = bool(marker and marker.get("s"))
        gen = self.tracker.track_fetched(p, off, settled)
        if gen is None or settled:
            return None
        headers = msg.headers()
        base = not_before = 0
        error = carried = None
        if headers:
            found = decode_headers(headers)
            base = _int_header(found, H_ATTEMPTS)
            not_before = _int_header(found, H_NOT_BEFORE)
            raw_error, raw_carried = found.get(H_ERROR), found.get(H_REQUEST_ID)
            error = raw_error.decode("utf-8", "replace") if raw_error else None
            carried = raw_carried.decode("utf-8", "replace") if raw_carried else None
        key, value = msg.key(), msg.value()
        return _Record(
            partition=p,
            offset=off,
            generation=gen,
            key=key.encode() if isinstance(key, str) else key,
            value=value.encode() if isinstance(value, str) else value,
            base=base,
            deliveries=int(marker.get("d", 0)) if marker else 0,
            not_before=not_before / 1000,
            last_error=error,
            carried_id=carried,
        )

    def _flow_control(self, consumer: Consumer) -> None:
        # What is buffered and not handed out: the records the application
        # holds (leases) are bounded by its own concurrency, and counting
        # them would stop the fetch of the next batch while a batch is
        # being worked on (one lease dict read; exact enough from here).
        buffered = self.tracker.outstanding() - len(self.leases)
        limit = self.options.max_buffered
        try:
            if not self._paused and buffered >= limit:
                consumer.pause(self._own(consumer.assignment()))
                self._paused = True
            elif self._paused and buffered <= limit // 2:
                consumer.resume(self._own(consumer.assignment()))
                self._paused = False
                self._wake_fetchers(consumer)
        except KafkaException as exc:
            log.debug("queue %r: pause/resume: %s", self.name, exc)

    def _wake_fetchers(self, consumer: Consumer) -> None:
        """librdkafka starts fetching a resumed partition only when the
        leader's broker thread next wakes up, up to about a second later (the
        local buffer runs dry meanwhile and throughput halves). Any request
        to that broker wakes it: ask one watermark per leader."""
        if self._wake is None:  # assigned since: the leaders are asked here
            own = sorted(tp.partition for tp in self._own(consumer.assignment()))
            self._wake = self._one_per_leader(consumer, own)
        for tp in self._wake:
            try:
                # Sending the request is what wakes the broker's thread; the
                # answer is not needed (waiting for it held the commit rounds
                # acks wait for behind a 10-30 ms listing on Tansu), so the
                # wait is short and its timeout expected.
                consumer.get_watermark_offsets(tp, timeout=_WAKE_WAIT_S, cached=False)
            except KafkaException as exc:  # a timeout, as a rule: the wake is sent
                log.debug("queue %r: waking the fetcher of %s: %s", self.name, tp, exc)

    def _commit(self, candidates: dict[int, int] | None = None) -> None:
        """Synchronously commit the safe positions (consumer thread only: a
        synchronous commit from another thread waits for the consumer's
        poll to return)."""
        consumer = self._consumer
        if consumer is None:
            return
        with self._commit_lock:  # one commit at a time: positions never go back
            if candidates is None:
                candidates = self.tracker.commit_candidates()
            if not candidates:
                return
            generations = {p: self.tracker.generation(p) for p in candidates}
            if self._consumer_closed:
                return
            tps = [TopicPartition(self.topics.requests, p, off) for p, off in candidates.items()]
            try:
                result = consumer.commit(offsets=tps, asynchronous=False)
            except (KafkaException, RuntimeError) as exc:
                log.info("queue %r: commit failed, will retry: %s", self.name, exc)
                return
            for tp in result or []:
                gen = generations.get(tp.partition)
                if tp.error is None and gen is not None:
                    self.tracker.committed(tp.partition, tp.offset, gen)
                    self._drop_markers(tp.partition, tp.offset)

    def _drop_markers(self, partition: int, below: int) -> None:
        # State markers of committed records are no longer needed: tombstone them.
        with self._marked_lock:
            marked = self._marked.get(partition)
            done = [o for o in marked if o < below] if marked else []
            if marked:
                marked.difference_update(done)
            rounds = self._marked_rounds.get(partition)
            keys = [k for k, high in rounds.items() if high < below] if rounds else []
            for key in keys:
                del rounds[key]  # type: ignore[union-attr]
        for off in done:
            self.clients.produce_nowait(self.topics.state, f"{partition}:{off}".encode(), None)
        for key in keys:
            self.clients.produce_nowait(self.topics.state, key, None)

    def _targets(
        self, consumer: Consumer, partitions: list[TopicPartition], committed: dict[int, int]
    ) -> dict[int, int]:
        """High watermarks the first fetch must reach before this engine is
        primed (its initial backlog is in the local buffer)."""
        targets: dict[int, int] = {}
        for tp in partitions:
            try:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topics.requests, tp.partition),
                    timeout=self.options.operation_timeout_s,
                    cached=False,
                )
            except KafkaException:
                continue
            start = committed.get(tp.partition, -1)
            if high > (start if start >= 0 else low):
                targets[tp.partition] = high
        return targets

    def _check_primed(self) -> None:
        targets = self._prime_targets
        if targets is None:
            return
        # Primed: the backlog of the assigned partitions is buffered, or as
        # much of it as the bounded buffer takes (paused).
        if self._paused or all(self._fetched.get(p, 0) >= high for p, high in targets.items()):
            self._prime_targets = None
            self._post(self._on_primed)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not partitions:
            # Nothing (more) for this member: what it has is what it knows.
            if self._prime_targets is None:
                self._prime_targets = {}
            return
        try:
            committed = {
                tp.partition: tp.offset
                for tp in consumer.committed(partitions, timeout=self.options.operation_timeout_s)
            }
        except KafkaException as exc:
            log.warning("queue %r: committed offsets unavailable: %s", self.name, exc)
            committed = {}
        if self.former_group is not None:
            committed.update(self._adopt_former(consumer, partitions, committed))
        assigned = {tp.partition for tp in partitions}
        # After every assignment (start, rebalance) the head is unknown until
        # the backlog of the new partitions is fetched.
        self._post(self._on_unprimed)
        for p in assigned:
            self._fetched.pop(p, None)
        self._prime_targets = {
            **(self._prime_targets or {}),
            **self._targets(consumer, partitions, committed),
        }
        try:
            replay = read_to_end(
                self.clients.reader_config(), self.topics.state, self.options.operation_timeout_s
            )
        except Exception as exc:  # degrade to duplicates, never to losses
            log.warning(
                "queue %r: state replay failed (attempt counts may restart): %s", self.name, exc
            )
            replay = []
        markers, individual, rounds = _replay_markers(replay, assigned, committed)
        for p in assigned:
            self.tracker.assign(p, committed.get(p))
            with self._marked_lock:
                self._marked.setdefault(p, set()).update(o for (pp, o) in individual if pp == p)
                self._marked_rounds.setdefault(p, {}).update(rounds.get(p, {}))
        self._markers.update(markers)
        self._paused = False
        # The leaders are asked when the fetchers are first woken, outside
        # this callback: a call that enters the client (list_topics, poll,
        # consume, close) on the consumer whose callback is running ends
        # the client's call state early, and the next callback served by
        # the same poll() aborts the process (test_kafka_callbacks.py).
        self._wake = None
        log.debug("queue %r: assigned %s", self.name, sorted(assigned))

    def _adopt_former(
        self, consumer: Consumer, partitions: list[TopicPartition], committed: dict[int, int]
    ) -> dict[int, int]:
        """Positions of partitions that have none in this group yet, taken
        from the level's former group of its own (before the levels of a
        priority queue shared one group), and committed here so that the
        fetch starts from them: without this, an upgrade would deliver
        again every request the level ever consumed (they are kept until
        consumed). Consumer thread, inside the assignment callback."""
        missing = [tp.partition for tp in partitions if committed.get(tp.partition, -1) < 0]
        if not missing or self.former_group is None:
            return {}
        topic = self.topics.requests
        former = Consumer(
            {
                **self.ctx.settings.consumer_config(self.former_group, subscribe=False),
                "logger": _client_logger(),
            }
        )
        try:
            found = former.committed(
                [TopicPartition(topic, p) for p in missing],
                timeout=self.options.operation_timeout_s,
            )
        except KafkaException as exc:
            log.warning("queue %r: former group's offsets unavailable: %s", self.name, exc)
            return {}
        finally:
            former.close()
        adopted = {tp.partition: tp.offset for tp in found if tp.error is None and tp.offset >= 0}
        if not adopted:
            return {}
        try:
            consumer.commit(
                offsets=[TopicPartition(topic, p, off) for p, off in adopted.items()],
                asynchronous=False,
            )
        except KafkaException as exc:
            log.warning("queue %r: adopting the former group's offsets: %s", self.name, exc)
            return {}
        log.info(
            "queue %r: adopted committed offsets %s of group %r",
            self.name,
            adopted,
            self.former_group,
        )
        return adopted

    def _one_per_leader(self, consumer: Consumer, partitions: list[int]) -> list[TopicPartition]:
        """One of ``partitions`` per leader broker (see ``_wake_fetchers``).
        Consumer thread, never inside one of the consumer's callbacks."""
        topic = self.topics.requests
        leaders: dict[int, int] = {}
        try:
            meta = consumer.list_topics(topic, timeout=self.options.operation_timeout_s)
            parts = meta.topics[topic].partitions
            for p in partitions:
                leaders.setdefault(parts[p].leader if p in parts else -1, p)
        except (KafkaException, KeyError) as exc:
            log.debug("queue %r: leaders unknown: %s", self.name, exc)
            leaders = {-1: partitions[0]} if partitions else {}
        return [TopicPartition(topic, p) for p in leaders.values()]

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        handing_over = (
            bool(partitions)
            and self.member.subscribed  # not a hand-off of an idle member
            and not self._stopped
            and not self._consumer_closed
        )
        if handing_over:
            # A rebalance (another process joined): let the requests handed
            # out from these partitions finish before they move.
            self._hand_over_from_thread({tp.partition for tp in partitions})
        with self._commit_lock:
            safe: dict[int, tuple[int, int]] = {}
            for tp in partitions:
                gen = self.tracker.generation(tp.partition)
                position = self.tracker.revoke(tp.partition)
                if position is not None and gen is not None:
                    safe[tp.partition] = (position, gen)
            if safe:
                tps = [TopicPartition(self.topics.requests, p, off) for p, (off, _) in safe.items()]
                try:
                    result = consumer.commit(offsets=tps, asynchronous=False)
                except KafkaException as exc:
                    log.warning("queue %r: commit on revoke failed: %s", self.name, exc)
                else:
                    for tp in result or []:
                        if tp.error is None:
                            self.tracker.committed(tp.partition, tp.offset, safe[tp.partition][1])
        # Still the owner until this callback returns: take back the delivery
        # counts reserved for records not handed out (revoked above, so no
        # poll hands them out meanwhile).
        self._withdraw_from_thread({tp.partition for tp in partitions})
        self._forget(partitions)

    def _hand_over_from_thread(self, partitions: set[int]) -> None:
        """Consumer thread, inside a revocation: run :meth:`_hand_over` on
        the event loop and wait for it. The group waits too (this member
        rejoins when the callback returns), for ``handover_wait_s`` at most;
        the partitions' other records are not fetched meanwhile."""
        # Past max.poll.interval.ms the group would drop this member mid-way.
        limit = min(self.options.handover_wait_s, self.options.max_poll_interval_ms / 2000)
        loop = self._loop
        if not limit or loop is None or loop.is_closed() or not loop.is_running():
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self._hand_over(partitions, limit), loop)
        except RuntimeError:  # the loop is closed
            return
        end = time.monotonic() + limit + self.options.operation_timeout_s
        try:
            while True:
                try:
                    future.result(_HANDOVER_TICK)
                    break
                except concurrent.futures.TimeoutError:
                    if time.monotonic() >= end:
                        raise
                # Acks of the partitions this member keeps wait for a commit
                # round, which only this thread can run: run it from here.
                run, self._round_run = self._round_run, None
                if run is not None:
                    run()
        except Exception as exc:  # what is not settled is delivered again: never lost
            future.cancel()
            log.warning(
                "queue %r: hand-over of partitions %s: %s: %s",
                self.name,
                sorted(partitions),
                type(exc).__name__,
                exc,
            )

    async def _hand_over(self, partitions: set[int], limit: float) -> None:
        """Event loop: wait up to ``limit`` seconds until every request handed
        out from ``partitions`` is settled (nothing more of them is handed out
        meanwhile), then make the settled ones that the revocation's commit
        cannot cover (an earlier record of the partition was never handed
        out) durable with a "settled" marker, so that the next owner skips
        them and their acks return True. Requests still held at the end are
        delivered again by the next owner."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        self._handing_over |= partitions
        try:
            await self._await_hand_over(partitions, deadline, limit)
        finally:
            self._handing_over -= partitions

    async def _await_hand_over(self, partitions: set[int], deadline: float, limit: float) -> None:
        loop = asyncio.get_running_loop()
        leases = [
            lease
            for lease in list(self.leases.values())
            if lease.record.partition in partitions and lease.state in ("held", "settling")
        ]
        watched = [lease.record for lease in leases]

        def unsettled() -> int:
            # A lease given back (handle closed) or expired is not waited for.
            return sum(
                1
                for lease in leases
                if lease.state in ("held", "settling") and self._live(lease.record)
            )

        while unsettled() and not self._stopped:
            left = deadline - loop.time()
            if left <= 0:
                held = unsettled()
                log.info(
                    "queue %r: %d request(s) still being handled after %gs while their "
                    "partitions move to another consumer: they will be delivered again",
                    self.name,
                    held,
                    limit,
                )
                break
            await self.wait(left)
        # Acks made during the hand-over write their markers: wait for them.
        await asyncio.gather(*list(self._hand_over_writes), return_exceptions=True)
        beyond = []
        for rec in watched:
            if self._live(rec) or rec.marked_at_handover:
                continue
            position = self.tracker.position(rec.partition, rec.generation)
            if position is not None and rec.offset >= position:
                beyond.append(rec)
        if beyond:
            await asyncio.gather(*(self._write_marker(rec, _SETTLED) for rec in beyond))
            for rec in beyond:
                rec.marked_at_handover = True

    def _revoke_tentatively(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """An eager rebalance began (see ``_GroupMember.tentative``): commit
        what is safe and withdraw the delivery counts reserved ahead, as a
        revocation does (another member may get the partitions), but keep
        them (generation, leases, buffer) until the assignment is known."""
        if not partitions:
            return
        gone = {tp.partition for tp in partitions}
        self._commit({p: off for p, off in self.tracker.commit_candidates().items() if p in gone})
        self._withdraw_from_thread(gone)
        self._pending_revoke |= gone
        self._fetch_positions.update({p: self._fetched[p] for p in gone if p in self._fetched})

    def _settle_tentative(self, assigned: set[int]) -> dict[int, int]:
        """The assignment after a tentative revocation: the partitions not
        assigned again are revoked now; returns the kept ones with the
        position to fetch from (where this member's fetch had got to)."""
        pending, self._pending_revoke = self._pending_revoke, set()
        positions, self._fetch_positions = self._fetch_positions, {}
        gone = pending - assigned
        if gone:
            for p in gone:
                self.tracker.revoke(p)
            self._forget([TopicPartition(self.topics.requests, p) for p in gone])
        kept: dict[int, int] = {}
        for p in pending & assigned:
            gen = self.tracker.generation(p)
            if gen is None:
                continue
            kept[p] = positions.get(p, -1001)  # OFFSET_INVALID: from the commit
        return kept

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.tracker.revoke(tp.partition)
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions}
        if self._prime_targets is not None:
            for p in gone:
                self._prime_targets.pop(p, None)
        for key in [k for k in self._markers if k[0] in gone]:
            del self._markers[key]
        with self._marked_lock:
            for p in gone:
                self._marked.pop(p, None)
                self._marked_rounds.pop(p, None)
        self._post(self._purge)
