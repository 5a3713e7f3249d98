"""Priority levels with aging, layered on any :class:`RequestQueue`.

Each level is an ordinary queue of the backend (``name__p0`` is the highest),
so a priority queue is exactly as durable as the backend: nothing is acked
before it is processed, and nothing lives only in memory. Aging is computed
from each request's ``enqueued_at`` (stamped once at first enqueue), so it is
the same after a restart as before.

Selection: before anything is served, every level whose head is not held
here must know its head (:meth:`RequestQueue.caught_up`: a consumer that
just joined its group or got partitions has loaded their backlog), waited for
concurrently and within the poll's timeout: a lower level is never served
while a higher one may still hold work that has not arrived yet, after start
and after every rebalance. Then the head (oldest request) of every level is
leased and compared by
effective level = level − ⌊waited / aging_interval⌋ (never below 0), ties to the
oldest ``enqueued_at``. Because a level is FIFO, its head is also its most-aged
request, so comparing heads is exact on ordered backends. Heads that lose the
comparison stay leased by this queue (their leases are kept alive) and compete
again on the next poll: at most one held request per level. A head a level
poll leases after the poll that started it returned is held the same way.
Heads held while nobody polls this queue (every handler busy) are given back
uncounted after a third of the lease, so other workers can take them. A
head held for more than a tenth of its lease is renewed to a whole lease
before it is handed out (its handler is promised ``lease_seconds``), and one
whose lease was lost while held is not handed out. Levels found empty keep
being asked in the background while the winner is handled (what arrives is
held for the next poll, which need not ask them again: an empty level's
answer costs a round trip or more). With
``max_attempts=1`` none is held between polls: a kill would use the only
attempt of every head held, so the losers are given back uncounted before
the winner is returned. Closing gives
them back without counting an attempt (``Delivery._release_uncounted``): an
attempt is a hand-out to a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from transport._spi.models import DeadLetter, QueueStats, WorkRequest, replace_fields, utcnow
from transport._spi.naming import validate_name
from transport._spi.queue import (
    Delivery,
    ExhaustedHook,
    RequestQueue,
    seconds,
    work_requests,
)
from transport.errors import ClosedResourceError

__all__ = ["AgingPolicy", "PriorityRequestQueue"]

log = logging.getLogger("transport.priority")

#: The most levels a priority queue may have.
MAX_PRIORITY_LEVELS = 16

# How long one background poll of an empty level waits before it is re-issued.
_POLL_SLICE = 1.0
#: Seconds a queue cancelled without ``aclose()`` (its event loop ending)
#: spends giving its held heads back.
_SHUTDOWN_GIVE_BACK_S = 1.0
#: A head held here for more than this share of the lease is renewed to a
#: whole lease before it is handed out: a handler is promised
#: ``lease_seconds`` from its poll, and a held head is only renewed every
#: third of a lease (it could go out with two thirds of it left).
_RENEW_AT_HAND_OUT = 0.1


@dataclass(frozen=True)
class AgingPolicy:
    """How many levels there are and how fast waiting requests are promoted.

    ``clock`` is injectable so tests can move time without sleeping.
    """

    levels: int = 3
    aging_interval: timedelta | float = timedelta(minutes=5)
    clock: Callable[[], datetime] = field(default=utcnow, compare=False)

    def __post_init__(self) -> None:
        if type(self.levels) is not int or self.levels < 1:  # a bool is not a count
            raise ValueError(f"levels must be a positive integer, got {self.levels!r}")
        if self.levels > MAX_PRIORITY_LEVELS:
            raise ValueError(f"at most {MAX_PRIORITY_LEVELS} priority levels are supported")
        interval = self.aging_interval
        if not isinstance(interval, timedelta) and (
            isinstance(interval, bool) or not isinstance(interval, int | float)
        ):
            raise ValueError(f"aging_interval must be a timedelta or seconds, got {interval!r}")
        if not math.isfinite(self.interval_seconds) or self.interval_seconds <= 0:
            raise ValueError(f"aging_interval must be positive and finite, got {interval!r}")

    @property
    def interval_seconds(self) -> float:
        """``aging_interval`` in seconds (positive, checked at construction).
        Never raises."""
        interval = self.aging_interval
        return interval.total_seconds() if isinstance(interval, timedelta) else float(interval)

    def effective_level(
        self, level: int, enqueued_at: datetime | None, now: datetime | None = None
    ) -> int:
        """``level − ⌊waited / aging_interval⌋``, never below 0; ``level``
        itself when ``enqueued_at`` is unknown. ``now`` defaults to ``clock()``.

        Raises: TypeError if ``enqueued_at`` and ``now`` mix naive and aware
        datetimes (the library's are all aware, UTC).
        """
        if enqueued_at is None:
            return level
        waited = ((now or self.clock()) - enqueued_at).total_seconds()
        promoted = math.floor(max(waited, 0.0) / self.interval_seconds)
        return max(0, level - promoted)


class PriorityRequestQueue(RequestQueue):
    """N priority levels (0 = highest) with aging; a :class:`RequestQueue` itself.

    Guarantees: those of the queues underneath (at-least-once, dead-lettering
    per level); higher effective level first under backlog; no starvation: a
    request waiting ``k × aging_interval`` competes as ``k`` levels higher, and
    ties go to the oldest.
    """

    def __init__(
        self,
        name: str,
        queues: list[RequestQueue],
        *,
        policy: AgingPolicy,
        level_check: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        if len(queues) != policy.levels:
            raise ValueError("one queue per level is required")
        self.name = validate_name(name, "queue name")
        self.policy = policy
        self.lease_seconds = queues[0].lease_seconds
        self.max_attempts = queues[0].max_attempts
        self._queues = queues
        self._slots: list[Delivery | None] = [None] * policy.levels
        self._held_since: list[float] = [0.0] * policy.levels
        self._tasks: list[asyncio.Task[Delivery | None] | None] = [None] * policy.levels
        # Levels whose last answer here was "nothing now".
        self._empty: list[bool] = [False] * policy.levels
        self._error: BaseException | None = None  # of a level poll that ended between polls
        self._lock = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
        # Held heads being given back in the background (by the keeper, or
        # after a poll that ended without a delivery); aclose() waits for them.
        self._giving: set[asyncio.Future[Any]] = set()
        self._polls = 0  # polls in progress
        self._last_poll = 0.0  # loop time the last poll ended
        # Asked once, at the first poll: whether levels above ours exist
        # (producers using more levels strand what they enqueue there).
        self._level_check = level_check
        self._level_check_task: asyncio.Task[None] | None = None

    def set_exhausted_hook(self, hook: ExhaustedHook | None) -> None:
        """As :meth:`RequestQueue.set_exhausted_hook`, for every level."""
        super().set_exhausted_hook(hook)
        for queue in self._queues:
            queue.set_exhausted_hook(hook)

    @property
    def levels(self) -> int:
        """The number of priority levels (0 = highest); fixed for the
        lifetime of the queue. Never raises."""
        return self.policy.levels

    async def enqueue(self, request: WorkRequest, priority: int | None = None) -> WorkRequest:
        """Enqueue at ``priority`` (default: ``request.priority``).

        Guarantees: as the underlying queue's ``enqueue``; ``priority`` and
        ``enqueued_at`` travel with the request and survive redelivery.
        Raises: ValueError if ``priority`` is outside ``0..levels-1``; as
        :meth:`RequestQueue.enqueue`.
        """
        self._check_not_closed()
        level = request.priority if priority is None else priority
        self._check_level(level)
        level = int(level)  # an IntEnum's value
        if request.priority != level or type(request.priority) is not int:
            request = replace_fields(request, priority=level)
        return await self._queues[level].enqueue(request)

    async def enqueue_many(self, requests: Iterable[WorkRequest]) -> list[WorkRequest]:
        """Enqueue each request at its ``priority``; returns them stamped, in
        the order given.

        Guarantees: as :meth:`RequestQueue.enqueue_many` (every request's
        level and encoding are checked before any is stored); each level's
        requests are stored by that level's ``enqueue_many`` (its native
        batch, where it has one), the levels concurrently.
        Raises: ValueError if a ``priority`` is outside ``0..levels-1``; as
        :meth:`RequestQueue.enqueue_many`.
        """
        self._check_not_closed()
        items = work_requests(requests)
        by_level: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            self._check_level(item.priority)
            by_level.setdefault(item.priority, []).append(i)
        levels = list(by_level)
        if len(levels) > 1:
            # One level's enqueue_many checks its share before storing any;
            # across levels, everything is checked here first.
            self._encode_all(items)
        results = await asyncio.gather(
            *(self._queues[lv].enqueue_many([items[i] for i in by_level[lv]]) for lv in levels),
            return_exceptions=True,
        )
        out: list[WorkRequest | None] = [None] * len(items)
        for level, result in zip(levels, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            for i, stored in zip(by_level[level], result, strict=True):
                out[i] = stored
        return [item for item in out if item is not None]

    def _encode_all(self, requests: list[WorkRequest]) -> list[bytes]:
        """Each request encoded as its level's queue would; a level out of
        range raises ValueError (before anything is stored)."""
        out: list[bytes] = []
        for request in requests:
            self._check_level(request.priority)
            out += self._queues[request.priority]._encode_all([request])
        return out

    async def _check_levels(self, check: Callable[[], Awaitable[str | None]]) -> None:
        """Warn once if levels above this queue's exist (see
        :meth:`Transport.priority_queue`); never fails a poll."""
        try:
            warning = await check()
        except Exception as exc:  # a check that cannot be made says nothing
            log.debug(
                "priority queue %r: levels above %d not checked: %s", self.name, self.levels, exc
            )
            return
        if warning is not None:
            log.warning("%s", warning)

    async def _levels_checked(self) -> None:
        """Wait for the check of the levels above this queue's, if one was
        started (tests)."""
        if self._level_check_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._level_check_task)

    def _check_level(self, level: int) -> None:
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < self.levels:
            raise ValueError(f"priority must be in 0..{self.levels - 1}, got {level!r}")

    async def poll(self, timeout: float | None = None) -> Delivery | None:
        """Lease the request with the best effective level (see module doc).

        Guarantees and raises: as :meth:`RequestQueue.poll`.
        """
        self._check_not_closed()
        timeout = seconds(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if self._level_check is not None and self._level_check_task is None:
            self._level_check_task = asyncio.create_task(self._check_levels(self._level_check))
        self._polls += 1
        try:
            return await self._poll(loop, deadline)
        except BaseException:
            if self.max_attempts < 2 and not self._closed:
                # With a single attempt no head is held between polls (a
                # kill would dead-letter requests no handler saw): a poll
                # cancelled or failed while its levels answered gives back
                # what they took, at once rather than at the keeper's next
                # round, a third of a lease later.
                # (Not under the poll lock: aclose() waits for it, and a
                # poll waiting for its levels holds the lock until they close.)
                self._give_back_in_background(self._give_back_losers())
            raise
        finally:
            self._polls -= 1
            self._last_poll = loop.time()

    async def _poll(
        self, loop: asyncio.AbstractEventLoop, deadline: float | None
    ) -> Delivery | None:
        try:
            async with asyncio.timeout_at(deadline):
                await self._lock.acquire()
        except TimeoutError:
            return None
        try:
            if any(t is not None and not t.done() for t in self._tasks):
                # Level polls kept running since the last poll (see below).
                await self._let_level_polls_land()
            while True:
                self._check_not_closed()
                self._harvest()
                # A level still loading may hold a better head, and
                # "nothing" would read as "empty" (a drain loop of
                # poll(timeout=3) on a Kafka cold start served nothing of 15
                # waiting requests): wait until every level knows its head,
                # past the poll's timeout if need be, as a plain queue's
                # poll does; each backend bounds that wait.
                await self._levels_known(None)
                await self._poll_empty_levels()
                self._check_not_closed()
                chosen = self._choose()
                if chosen is not None:
                    best, held_since = chosen
                    if not await self._renewed(best, loop.time() - held_since):
                        continue  # its lease ran out while held: it is someone else's now
                    if self.max_attempts < 2:
                        await self._give_back_losers()
                    else:
                        # The levels that were empty keep being asked while
                        # the winner is handled: what arrives there is held
                        # for the next poll, which need not ask them again
                        # ("nothing now" costs a round trip or more: a pull
                        # held 20 ms on NATS, once per poll). Not the levels
                        # with work: a poll still running there would say
                        # nothing of a head about to arrive, and a lower
                        # level's would win.
                        self._ask_levels(_POLL_SLICE, empty_only=True)
                    return best
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return None
                self._ask_levels(_POLL_SLICE if remaining is None else min(remaining, _POLL_SLICE))
                pending = {t for t in self._tasks if t is not None}
                done, _ = await asyncio.wait(
                    pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    await self._let_level_polls_land()
        finally:
            self._lock.release()

    def _check_not_closed(self) -> None:
        """Raise ``ClosedResourceError`` once :meth:`aclose` has begun; a
        poll waiting then ends at its next step (what the levels answer it
        meanwhile is given back, see :meth:`_poll_empty_levels`)."""
        if self._closed:
            raise ClosedResourceError(f"priority queue {self.name!r} is closed")

    @staticmethod
    async def _let_level_polls_land() -> None:
        """Two loop steps: a level poll just answered (level polls answered
        by the same broker round trip finish in consecutive steps) resumes,
        then its done callback holds its head, before anything is chosen,
        so a lower level does not win by a step."""
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    def _ask_levels(self, slice_: float, *, empty_only: bool = False) -> None:
        """A background ``poll(slice_)`` of every level whose head is not
        held here nor being asked for (``empty_only``: of those whose last
        answer was "nothing now")."""
        for level in range(self.levels):
            if empty_only and not self._empty[level]:
                continue
            if self._slots[level] is None and self._tasks[level] is None:
                task = asyncio.create_task(self._queues[level].poll(slice_))
                # A level poll may lease its head after the poll that started
                # it returned: it is held (its lease kept alive) at once, not
                # left to run out in a finished task.
                task.add_done_callback(functools.partial(self._landed, level))
                self._tasks[level] = task

    async def _poll_empty_levels(self) -> None:
        """``poll(0)`` every level whose head is not held here (nor being
        polled), concurrently: a broker's "nothing now" takes a round trip or
        more (on NATS a pull held 20 ms), and asked level by level, a queue
        whose higher levels are empty paid it once per empty level on every
        poll (NATS, three levels, work only at the lowest: 43 ms a poll).
        What the others took is held even if one of them fails."""
        empty = [
            level
            for level in range(self.levels)
            if self._slots[level] is None and self._tasks[level] is None
        ]

        async def ask(level: int) -> None:
            # Held as soon as this level answers, not once the slowest has:
            # its lease is kept alive from then on (a level answering
            # seconds after another on a loaded broker left the quick
            # level's head unrenewed, and it went out with its lease run out).
            delivery = await self._queues[level].poll(0)
            if delivery is not None and self._closed:
                # Closing: given back, not held (aclose() may have given
                # the held heads back already).
                await self._give_back(delivery)
                return
            self._fill(level, delivery)

        results = await asyncio.gather(*(ask(level) for level in empty), return_exceptions=True)
        error: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                error = error or result
        if error is not None:
            raise error

    async def caught_up(self, timeout: float | None = None) -> bool:
        """Every level knows its head (see :meth:`RequestQueue.caught_up`).

        Raises: as :meth:`RequestQueue.caught_up`.
        """
        self._check_not_closed()
        loop = asyncio.get_running_loop()
        return await self._levels_known(None if timeout is None else loop.time() + timeout)

    async def _levels_known(self, deadline: float | None) -> bool:
        """Wait, until ``deadline``, for every level whose head is not held
        here to know its head (levels load concurrently, so a start costs
        one backlog load, not one per level)."""
        waiting = [q for level, q in enumerate(self._queues) if self._slots[level] is None]
        if not waiting:
            return True
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        if len(waiting) == 1:
            return await waiting[0].caught_up(timeout)
        results = await asyncio.gather(
            *(q.caught_up(timeout) for q in waiting), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return all(results)

    def _fill(self, level: int, delivery: Delivery | None) -> None:
        self._empty[level] = delivery is None
        if delivery is None:
            return
        self._slots[level] = delivery
        delivery._mark_unseen(True)
        self._held_since[level] = asyncio.get_running_loop().time()
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep_leases())

    def _harvest(self) -> None:
        for level, task in enumerate(self._tasks):
            if task is not None and task.done():
                self._landed(level, task)
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _landed(self, level: int, task: asyncio.Task[Delivery | None]) -> None:
        """A level poll ended: its head is held (or its error kept for the
        next poll). Once per task, whichever sees it first."""
        if self._tasks[level] is not task:
            return  # taken already (or by aclose)
        self._tasks[level] = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._error = exc
            return
        self._fill(level, task.result())

    async def _renewed(self, delivery: Delivery, held_for: float) -> bool:
        """Renew ``delivery``, a head about to be handed out, to a whole
        lease if it was held here for more than a tenth of one (a handler
        gets ``lease_seconds`` from its poll, as from a plain queue's).
        ``False`` if its lease was lost meanwhile (an event loop stalled past
        a renewal): it is not handed out. A renewal that fails hands it out
        as it is (most of its lease is left)."""
        if held_for <= self.lease_seconds * _RENEW_AT_HAND_OUT:
            return True
        try:
            return await delivery.extend()
        except Exception as exc:
            log.warning(
                "priority queue %r: renewing a head before handing it out failed: %s",
                self.name,
                exc,
            )
            return True

    def _choose(self) -> tuple[Delivery, float] | None:
        """The head to hand out and when it was last leased here."""
        now = self.policy.clock()
        best_level = -1
        best_key: tuple[int, datetime, int] | None = None
        for level, delivery in enumerate(self._slots):
            if delivery is None:
                continue
            enqueued = delivery.request.enqueued_at or now
            key = (self.policy.effective_level(level, enqueued, now), enqueued, level)
            if best_key is None or key < best_key:
                best_key, best_level = key, level
        if best_key is None:
            return None
        chosen = self._slots[best_level]
        self._slots[best_level] = None
        if chosen is None:
            return None
        chosen._mark_unseen(False)
        return chosen, self._held_since[best_level]

    async def _keep_leases(self) -> None:
        try:
            await self._renew_held()
        except asyncio.CancelledError:
            if not self._closed:
                await self._give_back_at_shutdown()
            raise

    async def _give_back_at_shutdown(self) -> None:
        """Cancelled without :meth:`aclose`: the event loop is ending with
        this queue open (``asyncio.run`` returning from a program that forgot
        ``aclose()``). Give the held heads back uncounted while the loop
        still runs, within :data:`_SHUTDOWN_GIVE_BACK_S`: no handler saw
        them, and left leased each would come back with one attempt more
        (a short script run again and again dead-lettered requests nobody
        handled). Where the level queue cannot act any more at that point
        (its client's own tasks are being cancelled too), the lease runs out
        and counts, as before."""
        held = self._unhold()
        if not held:
            return
        giving = asyncio.ensure_future(asyncio.gather(*(self._give_back(d) for d in held)))
        _, late = await asyncio.wait({giving}, timeout=_SHUTDOWN_GIVE_BACK_S)
        if late:
            giving.cancel()
        # Retrieved in every case: a level queue whose own tasks were
        # cancelled with this one fails here (its lease then runs out).
        await asyncio.gather(giving, return_exceptions=True)

    async def _renew_held(self) -> None:
        # Held heads are leased to this process: renew them well before expiry
        # so no other worker gets them while they wait for their turn here.
        period = max(self.lease_seconds / 3, 0.05)
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(period)
            if (
                not self._polls
                and not self._lock.locked()
                and loop.time() - self._last_poll >= period
                and any(d is not None for d in self._slots)
            ):
                # Nobody polls here (every handler busy, for minutes or
                # hours): give the heads back uncounted rather than keep them
                # from other workers; the next poll leases them again.
                held = self._unhold()
                # Shielded: aclose() cancelling the keeper meanwhile waits for
                # it (cancelled, the heads were counted by the level's close).
                await asyncio.shield(
                    self._give_back_in_background(
                        asyncio.gather(*(self._give_back(d) for d in held))
                    )
                )
                continue
            for level, delivery in enumerate(self._slots):
                if delivery is None or loop.time() - self._held_since[level] < period:
                    continue
                try:
                    kept = await delivery.extend()
                except Exception as exc:  # transient: try again next period
                    log.warning("priority queue %r: lease renewal failed: %s", self.name, exc)
                    continue
                if self._slots[level] is not delivery:
                    continue  # handed out meanwhile; the worker owns it now
                if kept:
                    self._held_since[level] = loop.time()
                else:
                    self._slots[level] = None  # lease lost: it is someone else's now

    async def stats(self) -> QueueStats:
        """Totals over all levels; a figure is ``None`` if any level does not
        report it. ``partition_lag`` is keyed ``"<level>:<partition>"``.

        Raises: as :meth:`RequestQueue.stats` (TransientTransportError), from
        the first level that fails.
        """
        parts = await asyncio.gather(*(q.stats() for q in self._queues))
        depths = [p.depth for p in parts]
        in_flight = [p.in_flight for p in parts]
        delayed = [p.delayed for p in parts]
        heads = [p.head_enqueued_at for p in parts if p.head_enqueued_at is not None]
        return QueueStats(
            queue=self.name,
            depth=None if None in depths else sum(d or 0 for d in depths),
            in_flight=None if None in in_flight else sum(i or 0 for i in in_flight),
            delayed=None if None in delayed else sum(d or 0 for d in delayed),
            dead_lettered=sum(p.dead_lettered for p in parts),
            head_enqueued_at=min(heads, default=None),
            # Each level has its own partitions: keyed "<level>:<partition>".
            partition_lag=None
            if all(p.partition_lag is None for p in parts)
            else {
                f"{level}:{partition}": lag
                for level, p in enumerate(parts)
                for partition, lag in (p.partition_lag or {}).items()
            },
        )

    async def level_stats(self) -> list[QueueStats]:
        """Per-level stats, level 0 first.

        Raises: as :meth:`RequestQueue.stats` (TransientTransportError).
        """
        return list(await asyncio.gather(*(q.stats() for q in self._queues)))

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters over every level, oldest first.

        Raises: as :meth:`RequestQueue.dead_letters` (TransientTransportError).
        """
        parts = await asyncio.gather(*(q.dead_letters(limit) for q in self._queues))
        merged = sorted(
            (
                d
                if d.dead_letter_id is None
                else d.model_copy(update={"dead_letter_id": f"{level}:{d.dead_letter_id}"})
                for level, p in enumerate(parts)
                for d in p
            ),
            key=lambda d: d.dead_lettered_at,
        )
        return merged[:limit]

    async def replace_dead_letter(self, dead_letter_id: str, request: WorkRequest) -> bool:
        """As :meth:`RequestQueue.replace_dead_letter` on the level the dead
        letter is in (its id, as :meth:`dead_letters` gives it, names the
        level); ``request`` goes to that level.

        Raises: ValueError for an id this queue did not give out; as
        :meth:`RequestQueue.replace_dead_letter`.
        """
        level, sep, inner = dead_letter_id.partition(":")
        if not sep or not level.isdigit() or int(level) >= self.levels:
            raise ValueError(f"not a dead letter id of this priority queue: {dead_letter_id!r}")
        return await self._queues[int(level)].replace_dead_letter(inner, request)

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        """Requeue dead letters (all, or those named) to their own level;
        returns how many were requeued.

        Guarantees: per level, as :meth:`RequestQueue.requeue_dead_letters`
        (enqueued again before removed from the dead letters).
        Raises: TransientTransportError (from the first level that fails;
        what the other levels requeued stays requeued).
        """
        ids = None if request_ids is None else list(request_ids)
        counts = await asyncio.gather(*(q.requeue_dead_letters(ids) for q in self._queues))
        return sum(counts)

    async def aclose(self) -> None:
        """Stop background polls, give back the held heads without counting
        an attempt (no handler saw them), close every level. Idempotent.

        Raises: nothing: errors of the level queues' close are swallowed.
        """
        if self._closed:
            return
        self._closed = True
        if self._level_check_task is not None and not self._level_check_task.done():
            self._level_check_task.cancel()
            with contextlib.suppress(BaseException):
                await self._level_check_task
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._giving:  # heads being given back in the background
            await asyncio.gather(*self._giving, return_exceptions=True)
        for level, task in enumerate(self._tasks):
            if task is None:
                continue
            self._tasks[level] = None  # its done callback leaves it to this
            task.cancel()
            with contextlib.suppress(BaseException):
                self._fill(level, await task)
        # Held heads were never handed to a handler: given back uncounted.
        # One the backend could not give back so is released by its level
        # queue's close below, which counts it.
        await asyncio.gather(*(self._give_back(d) for d in self._unhold()))
        await asyncio.gather(*(q.aclose() for q in self._queues), return_exceptions=True)

    async def _give_back_losers(self) -> None:
        """With a single attempt, heads are not held between polls: each
        has used its one attempt if this process is killed holding it (a
        kill would dead-letter requests no handler saw), so the heads that
        lost the comparison, and those level polls still running lease,
        are given back uncounted before the winner is returned."""
        for level, task in enumerate(self._tasks):
            if task is not None:
                task.cancel()  # a cancelled level poll gives back what it took
                with contextlib.suppress(BaseException):
                    await task
                self._tasks[level] = None
        await asyncio.gather(*(self._give_back(d) for d in self._unhold()))

    def _give_back_in_background(self, work: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run ``work``, a give-back of held heads, as a future that
        :meth:`aclose` waits for (whoever started it may be cancelled)."""
        future = asyncio.ensure_future(work)
        self._giving.add(future)
        future.add_done_callback(self._giving.discard)
        return future

    def _unhold(self) -> list[Delivery]:
        """The held heads, no longer held here (to be given back)."""
        held = [d for d in self._slots if d is not None]
        self._slots = [None] * self.levels
        return held

    async def _give_back(self, delivery: Delivery) -> None:
        try:
            await delivery._release_uncounted()
        except Exception as exc:  # the level queue's close releases it (counted)
            log.warning(
                "priority queue %r: a held head was not given back uncounted: %s", self.name, exc
            )
