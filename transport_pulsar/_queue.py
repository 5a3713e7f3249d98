"""``PulsarRequestQueue``: a persistent topic shared by a queue's workers
through one Shared (or Key_Shared) subscription.

How the :class:`~transport.RequestQueue` contract maps onto Pulsar:

* enqueue: a non-batched send keyed by the request's ``ordering_key`` if
  set, else its ``request_id`` (a Key_Shared subscription hands the
  messages of one key to one consumer, in order); returns on the broker's
  send receipt. The first enqueue of a handle makes sure the subscription
  exists (a zero-permit subscribe), so nothing is trimmed before a worker
  arrives.
* poll: a message from the subscription, leased locally for
  ``lease_seconds``. Leases are client-side timers: Pulsar's own ackTimeout
  has a 10 s minimum and cannot be renewed per message. On expiry the
  message is negatively acknowledged, so the broker redelivers it to any
  worker; a worker that dies loses its connection and the broker redelivers
  everything it held at once.
* attempt: ``ae-attempts`` property (deliveries before a republish) +
  this message's hand-outs so far + 1. Hand-outs are counted by the queue,
  not by the broker: the broker's redelivery count is no measure of them
  (pulsar-lite also counts a message a consumer only prefetched; Apache
  Pulsar does not count a delivery whose consumer disconnected, and forgets
  every count when the subscription's last consumer leaves). Before a
  message is handed to a poll its hand-out count is written to a keyed
  topic ``<queue>__attempts`` (key: the message id), after looking it up
  there (every message, whatever its redelivery count): the count is
  written as this worker's view has it, then the view is read until it
  has applied that write, and written again if another worker's count for
  the message showed up meanwhile (see ``_count``); the entry is
  tombstoned when the message is settled. A poll cancelled
  between counting and handing out keeps its count locally, and a clean
  close withdraws it; a delivery given back unseen by a handler (a
  priority queue's held head) has its count lowered first. An ack with no
  poll in progress also counts the next messages in line ahead (one; up
  to four while acks come faster than one per 5 ms), beside the ack, so
  that the polls that hand them out need not wait for a write; a clean
  close withdraws what was not handed out. A worker killed counts at most one hand-out per poll in
  progress, and one per message counted ahead, that did not happen.
* ack: individual acknowledgement, sent at once (no client-side ack
  grouping); returns on the broker's ack receipt (with the option
  ``ack_receipts=False``: once handed to the connection, unconfirmed).
  nack(): negative acknowledgement;
  nack(delay) or nack(error=): a copy carrying the attempt count, the error,
  the request id delivered (``ae-request-id``: a foreign body without one
  keeps the id derived from the original message id) and a not-before time
  is published (``deliverAfter``), then the original
  is acked. The not-before time is also enforced by the client, for
  brokers without delayed delivery.
* dead letters: a keyed topic ``<queue>__dlq`` holding :class:`DeadLetter`
  records, written before the source message is acked; requeue enqueues
  first, then tombstones the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from transport import (
    DeadLetter,
    Delivery,
    QueueStats,
    RequestQueue,
    WorkRequest,
    decode,
    encode,
)
from transport.errors import (
    ClosedResourceError,
    TransientTransportError,
    TransportError,
    UndecodableMessageError,
)
from transport.kit import (
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_NOT_BEFORE,
    HEADER_REQUEST_ID,
    LEGACY_ERROR_HEADERS,
    InFlight,
    ack_each,
    acked_or_raise,
    decode_request,
    error_header,
    internal_name,
    replace_fields,
    requeued,
    retrieve,
    wait_within,
)
from transport.kit import seconds as _seconds
from transport_pulsar._client import (
    AsyncConsumer,
    AsyncProducer,
    Message,
    PulsarContext,
    _undo_at_exit,
)
from transport_pulsar._errors import map_pulsar_errors
from transport_pulsar._registries import KeyedTopic

__all__ = ["PulsarDelivery", "PulsarRequestQueue", "attempts_name"]

log = logging.getLogger("transport.pulsar")

ATTEMPTS_PROPERTY = HEADER_ATTEMPTS
ERROR_PROPERTY = HEADER_ERROR
NOT_BEFORE_PROPERTY = HEADER_NOT_BEFORE
REQUEST_ID_PROPERTY = HEADER_REQUEST_ID
_JOIN_GRACE_SECONDS = 0.2
#: After a hand-out, how long the broker may take to dispatch the next
#: message on the permit it returned (see PulsarRequestQueue.caught_up).
_DISPATCH_GRACE_SECONDS = 0.2
#: While polls find nothing, the broker is asked for this queue's topic (a
#: lookup, one round trip) at most this often, with this timeout: the
#: client's consumer says "connected" until its keepalive gives up, about
#: 60 s after a broker went silent with the connection open (hung, or cut
#: off by a partition), and polls answered "empty" all that time.
_PROBE_EVERY_SECONDS = 5.0
_PROBE_TIMEOUT_SECONDS = 5.0
# Hand-outs counted ahead (see PulsarRequestQueue._reserve_next): one, or
# up to _RESERVE_MAX while acks follow each other within _HOT_GAP_SECONDS
# (a loop faster than a count write; a steadily slow one holds no more).
_RESERVE_MAX = 4
# Changes to the hand-out counts between two checkpoints of a worker's view.
_COUNTS_CHECKPOINT_EVERY = 10_000
_HOT_GAP_SECONDS = 0.005

_LEASED, _SETTLING, _SETTLED, _EXPIRED = "leased", "settling", "settled", "expired"
_tiebreak = itertools.count()


def attempts_name(queue: str) -> str:
    """The name (``kind`` prefix left to the caller) of the topic holding the
    hand-out counts of ``queue``; its checkpoints are in
    ``checkpoint_name(attempts_name(queue))``."""
    return internal_name(queue, "attempts")


def _message_key(message: Message) -> str:
    return str(message.message_id())


def _merge_count(held: bytes | None, new: bytes | None) -> bytes | None:
    """The count a reader holds after ``new`` (see ``_count_value``): a
    tombstone or a set count replaces; a claim replaces a smaller count
    only, so a worker that wrote a count from a stale view never lowered
    the count another worker stored."""
    if new is None or held is None or b'"set":1' in new:
        return new
    return new if _parse_count(new) > _parse_count(held) else held


def _parse_count(raw: bytes | None) -> int:
    if not raw:
        return 0
    try:
        loaded = json.loads(raw)
        return max(int(loaded["n"]), 0) if isinstance(loaded, dict) else 0
    except (ValueError, KeyError, TypeError):
        return 0


class PulsarDelivery(Delivery):
    __slots__ = ("_expires", "_last_error", "_message", "_queue", "_state", "_timer")

    def __init__(
        self,
        request: WorkRequest,
        queue: PulsarRequestQueue,
        message: Message,
        last_error: str | None,
    ):
        super().__init__(request)
        self._queue = queue
        self._message = message
        self._last_error = last_error
        self._state = _LEASED
        self._expires = 0.0
        self._timer: asyncio.TimerHandle | None = None

    async def ack(self) -> bool:
        return await self._queue._ack(self)

    async def nack(
        self, delay: float | timedelta | None = None, *, error: str | None = None
    ) -> bool:
        return await self._queue._nack(self, _seconds(delay) or 0.0, error)

    async def extend(self, seconds: float | timedelta | None = None) -> bool:
        return self._queue._extend(self, _seconds(seconds))

    async def dead_letter(self, error: str) -> bool:
        return await self._queue._settle_dead(self, error)

    async def _release_uncounted(self) -> bool:
        return await self._queue._release_uncounted(self)


class PulsarRequestQueue(RequestQueue):
    def __init__(
        self,
        ctx: PulsarContext,
        name: str,
        *,
        topic: str,
        dlq_topic: str,
        attempts_topic: str,
        attempts_checkpoint_topic: str,
        lease_seconds: float,
        max_attempts: int,
    ) -> None:
        self.name = name
        self.topic = topic
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_payload_bytes = ctx.config.max_payload_bytes
        self._ctx = ctx
        self._opts = ctx.settings.options
        self._client = ctx.client
        self._timeout = self._opts.operation_timeout_seconds
        self._close_timeout = self._opts.close_timeout_seconds
        self._dlq = KeyedTopic(
            ctx.client, dlq_topic, timeout=self._timeout, close_timeout=self._close_timeout
        )
        # Hand-out counts per message id (see the module docstring).
        self._attempts = KeyedTopic(
            ctx.client,
            attempts_topic,
            timeout=self._timeout,
            close_timeout=self._close_timeout,
            # A new worker's first lookup reads from the last checkpoint,
            # not the topic's whole history.
            checkpoint_topic=attempts_checkpoint_topic,
            checkpoint_every=_COUNTS_CHECKPOINT_EVERY,
            merge=_merge_count,
        )
        # Counts written for hand-outs that did not happen (a poll cancelled
        # or failed after counting): used by the next hand-out of the
        # message, withdrawn on close.
        self._counted: dict[str, int] = {}
        # Writes of counts started ahead (see _reserve_next), by message id:
        # the poll that hands the message out awaits it, or writes again if
        # it failed (as for the counts in _unconfirmed).
        self._count_writes: dict[str, asyncio.Future[None]] = {}
        self._unconfirmed: set[str] = set()  # counts whose write may not have been stored
        # Messages being counted (by the view their watch started on), and
        # changes to their counts by other workers seen meanwhile (see
        # _count); this handle's own counts carry its token.
        self._watch_generation: dict[str, int] = {}
        self._foreign: dict[str, bytes | None] = {}
        self._token = uuid.uuid4().hex[:12].encode()
        self._mark = b'"by":"%s"' % self._token
        self._attempts.observer = self._observe
        self._admitting: set[str] = set()
        self._last_ack = 0.0
        self._producer: AsyncProducer | None = None
        self._consumer: AsyncConsumer | None = None
        self._handed_out_at = float("-inf")  # loop time of the last hand-out
        # The broker's last sign of life seen by an idle poll (loop time),
        # the lookup asking for one, and whether the last one went unanswered.
        self._answered_at = float("-inf")
        self._probe: asyncio.Future[None] | None = None
        self._silent = False
        self._lock = asyncio.Lock()
        self._creating: InFlight[str] = InFlight()
        # Leased and held-back messages by message id: after a reconnect the
        # broker dispatches every unacked message again, also to this
        # consumer; a copy of one we still hold is dropped, not handed out twice.
        self._held: dict[str, PulsarDelivery] = {}
        self._delayed: list[tuple[float, int, Message]] = []
        self._delayed_ids: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<PulsarRequestQueue {self.name!r} topic={self.topic!r}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"queue {self.name!r} is closed")
        self._ctx.check_open()

    # -- connections ---------------------------------------------------------
    async def _get_producer(self) -> AsyncProducer:
        # Concurrent first enqueues share one creation: with the broker down,
        # each used to wait out its own operation timeout behind the lock,
        # one after the other (20 enqueues: over 200 s instead of 30 s).
        if self._producer is None:
            await self._creating.run("producer", self._create_producer)
        assert self._producer is not None
        return self._producer

    async def _create_producer(self) -> None:
        async with self._lock:
            if self._producer is None:
                await self._ctx.ensure_subscription(self.topic)
                self._producer = await self._ctx.retrying(
                    lambda: self._client.create_producer(self.topic)
                )

    async def _get_consumer(self) -> AsyncConsumer:
        if self._consumer is not None:
            return self._consumer
        async with self._lock:
            if self._consumer is None:
                consumer = await self._ctx.retrying(lambda: self._ctx.subscribe(self.topic))
                consumer.on_drop = self._dropped
                self._consumer = consumer
            return self._consumer

    # -- RequestQueue --------------------------------------------------------
    async def _store_request(self, request: WorkRequest, body: bytes) -> None:
        producer = await self._get_producer()
        await producer.send(body, key=request.message_key)

    async def poll(self, timeout: float | None = None) -> PulsarDelivery | None:
        self._check_open()
        timeout = _seconds(timeout)  # a negative timeout is refused, as for nack/extend
        joining = self._consumer is None
        consumer = await self._get_consumer()
        loop = asyncio.get_running_loop()
        if joining and timeout is not None:
            # Right after joining, waiting work is still on its way from the
            # broker: even poll(0) gives the first dispatch a moment, so that
            # "nothing" means an empty queue, not a consumer still warming up.
            timeout = max(timeout, _JOIN_GRACE_SECONDS)
        deadline = None if timeout is None else loop.time() + timeout
        # A poll that ends while the broker is unreachable says so, instead
        # of answering "no request" (a worker could not tell an outage from
        # an idle queue); ``poll(None)`` once it has been down for the
        # operation timeout.
        down_since: float | None = None
        while True:
            self._check_open()
            message = self._due_delayed()
            if message is None:
                now = loop.time()
                # Waits without a deadline wake every few seconds (a local
                # wait, no round trip) to look at the connection, every
                # second while it is down.
                remaining = (
                    (1.0 if down_since is not None else 5.0)
                    if deadline is None
                    else max(deadline - now, 0.0)
                )
                if self._delayed:
                    remaining = min(remaining, max(self._delayed[0][0] - time.time(), 0.0))
                message = await consumer.next(remaining)
            if message is None:
                now = loop.time()
                if consumer.connected() and self._broker_answers(now):
                    down_since = None
                else:
                    down_since = now if down_since is None else down_since
                    if (deadline is not None and now >= deadline) or (
                        now - down_since >= self._timeout
                    ):
                        raise TransientTransportError(
                            f"polling {self.topic}: the broker is unreachable (the client is "
                            "reconnecting)"
                        )
                if deadline is not None and now >= deadline:
                    return None
                continue
            self._answered_at, self._silent = loop.time(), False  # a message: it answers
            delivery = await self._admit(consumer, message)
            if delivery is not None:
                self._handed_out_at = loop.time()
                return delivery

    def _broker_answers(self, now: float) -> bool:
        """For a poll that found nothing: False once a lookup of this queue's
        topic went unanswered (until one is answered or a message comes);
        starts a lookup when the last sign of life is older than
        :data:`_PROBE_EVERY_SECONDS` and none is on its way."""
        if self._probe is None and now - self._answered_at >= _PROBE_EVERY_SECONDS:
            self._probe = asyncio.ensure_future(self._lookup())
        return not self._silent

    async def _lookup(self) -> None:
        try:
            await self._client.topic_partitions(self.topic, timeout=_PROBE_TIMEOUT_SECONDS)
        except (TransportError, TimeoutError):
            self._silent = True
        else:
            self._answered_at, self._silent = asyncio.get_running_loop().time(), False
        finally:
            self._probe = None

    async def caught_up(self, timeout: float | None = None) -> bool:
        """As :meth:`RequestQueue.caught_up`. ``poll(0)`` answers from what
        the consumer has received, and right after a hand-out the broker is
        still dispatching the next message on the permit that hand-out
        returned (with the default prefetch of 1 nothing else is held): a
        priority queue asking then took an empty receive queue for an empty
        level and served a lower one (seen under load). So until
        :data:`_DISPATCH_GRACE_SECONDS` after the last hand-out this waits for
        a message to arrive (kept in line), also past a shorter ``timeout``:
        like the first poll after joining, a priority queue's ``poll(0)``
        may take that long, and then answers right (a ``poll(0)`` loop
        draining a queue does not stop early).

        Raises: ClosedResourceError.
        """
        self._check_open()
        _seconds(timeout)  # a negative timeout is refused, as for poll
        consumer = self._consumer
        if consumer is None:
            return True  # the first poll gives the first dispatch a moment (join grace)
        left = self._handed_out_at + _DISPATCH_GRACE_SECONDS - asyncio.get_running_loop().time()
        if left > 0:
            await consumer.wait_ready(left)
        return True

    async def _poll_more(self, first: Delivery, count: int) -> list[Delivery]:
        """The rest of a ``poll_many`` batch: the delayed copies due now and
        the messages the consumer has received or holds prefetched, taken
        without waiting and counted together (their count writes in flight
        at once, each read back once the view has them); a message whose
        count could not be stored goes back to the front of the line, as
        for a failed ``poll``, and is not raised."""
        consumer = self._consumer
        if consumer is None or self._closed:
            return []
        messages: list[Message] = []
        while len(messages) < count and (due := self._due_delayed()) is not None:
            messages.append(due)
        if len(messages) < count:
            messages += consumer.take_now(count - len(messages))
        if not messages:
            return []
        started: set[int] = set()

        async def admit(index: int, message: Message) -> PulsarDelivery | None:
            started.add(index)  # from here on _admit gives it back if it fails
            return await self._admit(consumer, message)

        try:
            admitted = await asyncio.gather(
                *(admit(i, message) for i, message in enumerate(messages)),
                return_exceptions=True,
            )
        except BaseException:
            # Cancelled: gather ends once every admission has ended; one
            # cancelled before it started never took its message in hand.
            for i in reversed(range(len(messages))):
                if i not in started:
                    consumer.push_back(messages[i])
            raise
        more: list[Delivery] = []
        for result in admitted:
            if isinstance(result, PulsarDelivery):
                more.append(result)
            elif isinstance(result, BaseException):
                log.debug("queue %r: poll_many: one not handed out: %s", self.name, result)
        if more:
            self._handed_out_at = asyncio.get_running_loop().time()
        return more

    async def ack_many(self, deliveries: Iterable[Delivery]) -> list[bool]:
        """As :meth:`RequestQueue.ack_many`: this queue's deliveries are
        acknowledged together (every ack sent before the first receipt is
        awaited; each returns on its own receipt, as :meth:`Delivery.ack`),
        with the next messages' counts written ahead once for the batch;
        any other delivery by its own ``ack``."""
        items = list(deliveries)
        results: list[bool | BaseException] = [False] * len(items)
        mine: list[tuple[int, PulsarDelivery]] = []
        others: list[int] = []
        for i, delivery in enumerate(items):
            if isinstance(delivery, PulsarDelivery) and delivery._queue is self:
                if self._begin_settle(delivery):
                    mine.append((i, delivery))
            else:
                others.append(i)
        if mine:
            self._count_next_ahead()
        acks = asyncio.gather(
            *(self._acknowledge(delivery) for _, delivery in mine), return_exceptions=True
        )
        for (i, _), result in zip(mine, await acks, strict=True):
            results[i] = result
        for i, result in zip(others, await ack_each(items[i] for i in others), strict=True):
            results[i] = result
        return acked_or_raise(results)

    async def _acknowledge(self, delivery: PulsarDelivery) -> bool:
        """Acknowledge a delivery whose settling has begun; its lease ends
        with the receipt (or stays, the ack failed)."""
        ok = False
        try:
            assert self._consumer is not None
            await self._consumer.acknowledge(delivery._message, self._timeout)
            ok = True
        finally:
            self._finish_settle(delivery, ok)
        return True

    def _due_delayed(self) -> Message | None:
        if self._delayed and self._delayed[0][0] <= time.time():
            message = heapq.heappop(self._delayed)[2]
            self._delayed_ids.discard(_message_key(message))
            return message
        return None

    async def _admit(self, consumer: AsyncConsumer, message: Message) -> PulsarDelivery | None:
        """Turn a received message into a leased delivery, or handle it
        (hold until due, dead-letter) and return ``None``. Its hand-out is
        counted durably first; a poll cancelled meanwhile gives the message
        back to the consumer's buffer (it is never lost between receive and
        lease)."""
        key = _message_key(message)
        if key in self._held or key in self._delayed_ids or key in self._admitting:
            return None  # a redispatch (after a reconnect) of a message we hold
        properties = message.properties()
        not_before = properties.get(NOT_BEFORE_PROPERTY)
        if not_before:
            with contextlib.suppress(ValueError):
                due = int(not_before) / 1000
                if due > time.time():
                    heapq.heappush(self._delayed, (due, next(_tiebreak), message))
                    self._delayed_ids.add(key)
                    return None
        try:
            before = int(properties.get(ATTEMPTS_PROPERTY, "0"))
        except ValueError:
            before = 0
        self._admitting.add(key)
        try:
            return await self._count_and_lease(consumer, message, key, before)
        except BaseException:
            consumer.push_back(message)
            raise
        finally:
            self._admitting.discard(key)

    async def _count(self, key: str, message: Message) -> int:
        """Store the hand-out count of ``message`` before it is handed out
        (a worker killed while holding it has used an attempt); the number
        of hand-outs before this one, by any worker.

        The count is looked up in the view of ``<queue>__attempts``, even
        at redelivery count 0: Apache Pulsar does not count a delivery whose
        consumer disconnected (a killed worker's message comes back at the
        count it had) and forgets every count when the subscription's last
        consumer leaves. The view may lag; instead of asking the broker for
        the topic's end first, the count is written and the view read until
        it has applied that write: a count another worker stored for the
        message came before it (that worker wrote it before its hand-out,
        which was before the broker gave the message to us), so it has been
        seen then, and if it differs from the one assumed the count is
        written again before the hand-out. A count written is a claim that
        readers merge as the larger (``_merge_count``), so one written from
        a stale view never lowers a count stored before it, even if this
        worker dies before its correction. Kept locally (``_counted``) until
        handed out; a write or read cancelled or failed is made again by the
        next poll of the message. The count topic unreadable fails the poll:
        nothing is handed out without its count."""
        attempts = self._attempts
        counted = self._counted.get(key)
        if counted is not None and key not in self._unconfirmed:
            return counted - 1  # stored for a hand-out that did not happen
        if attempts.view is None:
            # The first lookup: from the last checkpoint (or the topic's
            # start). Not readable: the poll fails, nothing is handed out.
            await attempts.synced()
        view = attempts.view
        assert view is not None
        if counted is None or self._watch_generation.get(key) != attempts.generation:
            # Changes by other workers from here on are merged onto the
            # count the view holds now (_observe).
            held = view.get(key)
            if counted is None or held is None or self._mark not in held:
                self._foreign[key] = held
            self._watch_generation[key] = attempts.generation
        handed = counted - 1 if counted is not None else _parse_count(view.get(key))
        self._counted[key] = handed + 1
        self._unconfirmed.add(key)
        self._check_open()  # closed meanwhile: nothing more is written
        written = await attempts.write(key, self._count_value(handed + 1))
        await attempts.read_through(written)
        # Every count written before ours is in the view now, among them one
        # by a worker that held the message before; ours is a claim readers
        # merge as the larger, so a stale guess never lowered a count.
        stored = _parse_count(self._foreign.get(key))
        if stored < handed and self._watch_generation.get(key) != attempts.generation:
            # The view was rebuilt meanwhile (a checkpoint's records are not
            # seen as changes): what was merged may be short, so never lower.
            stored = handed
        if stored != handed:
            self._check_open()
            self._counted[key] = stored + 1
            # Lowered (a count withdrawn by its worker after we read it):
            # set; raised: claimed, as every count.
            await attempts.write(key, self._count_value(stored + 1, set_=stored < handed))
            handed = stored
        self._unconfirmed.discard(key)
        return handed

    def _count_value(self, handed: int, *, set_: bool = False) -> bytes:
        """A hand-out count as written: a claim (readers keep the larger of
        it and the count they hold), or with ``set_`` the count itself (a
        withdrawal, a lowering)."""
        if set_:
            return b'{"n":%d,"by":"%s","set":1}' % (handed, self._token)
        return b'{"n":%d,"by":"%s"}' % (handed, self._token)

    def _observe(self, key: str, value: bytes | None) -> None:
        """A change the count view applied: one for a message being counted
        here, not written by this handle, is merged for :meth:`_count`."""
        if key in self._watch_generation and (value is None or self._mark not in value):
            self._foreign[key] = _merge_count(self._foreign.get(key), value)

    def _stop_watching(self, key: str) -> None:
        self._foreign.pop(key, None)
        self._watch_generation.pop(key, None)

    async def _count_and_lease(
        self, consumer: AsyncConsumer, message: Message, key: str, before: int
    ) -> PulsarDelivery | None:
        counted_ahead = await self._counted_ahead(key)
        if counted_ahead is not None:
            handed = counted_ahead - 1
        else:
            handed = await self._count(key, message)
        attempt = before + handed + 1
        properties = message.properties()
        last_error = properties.get(ERROR_PROPERTY) or None
        for legacy in LEGACY_ERROR_HEADERS:  # a copy written by an earlier release
            last_error = last_error or properties.get(legacy) or None
        data = bytes(message.data())
        try:
            request = decode_request(
                data, self.topic, key, carried_id=properties.get(REQUEST_ID_PROPERTY)
            )
        except UndecodableMessageError as exc:
            record = DeadLetter(
                queue=self.name,
                request_id=None,
                request=None,
                raw=data,
                error=str(exc),
                attempts=attempt,
            )
            self._unreserve(key)
            self._background(self._dead_letter_message(message, record))
            return None
        if attempt > self.max_attempts:
            # Delivered max_attempts times already and never settled (the
            # worker died holding it): it goes to the dead letters instead.
            deliveries = attempt - 1
            record = DeadLetter(
                queue=self.name,
                request_id=request.request_id,
                request=replace_fields(request, attempt=deliveries),
                error=last_error or f"not acknowledged after {deliveries} deliveries",
                attempts=deliveries,
            )
            self._unreserve(key)
            self._background(self._dead_letter_message(message, record))
            self._report_exhausted(record.request, record.error)
            return None
        self._check_open()  # closed meanwhile: the close withdraws the count
        del self._counted[key]
        self._stop_watching(key)
        if request.attempt != attempt:
            request = replace_fields(request, attempt=attempt)
        delivery = PulsarDelivery(request, self, message, last_error)
        self._lease(delivery, self.lease_seconds)
        self._held[key] = delivery
        return delivery

    async def _counted_ahead(self, key: str) -> int | None:
        """The count stored ahead for ``key`` (see :meth:`_reserve_next`),
        after waiting for that write; ``None`` if it was not counted ahead,
        or that lookup or write failed (the poll counts it again)."""
        ahead = self._count_writes.get(key)
        if ahead is None:
            return None
        if ahead.done() and (ahead.cancelled() or ahead.exception() is not None):
            # Counted ahead, but that write failed (stored or not): write again.
            self._count_writes.pop(key, None)
            self._unconfirmed.add(key)
            return None
        try:
            await asyncio.shield(ahead)
        except asyncio.CancelledError:
            if not ahead.cancelled():
                raise  # this poll was cancelled: the write goes on for the next one
            self._count_writes.pop(key, None)
            self._unconfirmed.add(key)
            raise TransientTransportError(
                f"queue {self.name!r}: a hand-out count write was cancelled"
            ) from None
        except BaseException:
            self._count_writes.pop(key, None)
            self._unconfirmed.add(key)  # it may or may not be stored: write again
            raise
        self._count_writes.pop(key, None)
        return None if key in self._unconfirmed else self._counted.get(key)

    def _reserve_next(self) -> None:
        """Count hand-outs ahead: the messages next in line (received, or
        prefetched by the client) get their counts written now, while an
        ack is on its way, so the polls that hand them out find them
        counted instead of waiting for a write. Only when no poll is in
        progress (a worker settling, then polling: concurrent polls overlap
        their writes with each other anyway), only messages not held back
        for a not-before time (each count looked up, then written), and at
        most ``_reserve_depth()`` not handed out yet. A clean close withdraws
        the reservations not handed out; a worker killed over-counts them
        by one each, as a broker counts a prefetched message redelivered."""
        consumer = self._consumer
        if (
            consumer is None
            or self._closed
            or self._admitting
            or consumer.waiting()
            or self.max_attempts < 2
        ):
            # Polls in progress overlap their count writes with each other
            # already: counting ahead would add work, not hide a wait. With
            # a single attempt, a count ahead that a killed worker leaves
            # behind would dead-letter a request no handler saw.
            return
        reserved = len(self._count_writes)  # counted ahead, not handed out yet
        room = self._reserve_depth() - reserved
        if room <= 0:
            return
        for message in consumer.ahead(reserved + room):
            if room <= 0:
                break
            key = _message_key(message)
            if (
                key in self._counted
                or key in self._count_writes
                or key in self._held
                or key in self._admitting
            ):
                continue
            if consumer.is_stale(message) or message.properties().get(NOT_BEFORE_PROPERTY):
                continue  # dropped / maybe held back: counted when handed out
            write = self._count_writes[key] = asyncio.ensure_future(self._count_ahead(key, message))
            write.add_done_callback(retrieve)
            room -= 1

    async def _count_ahead(self, key: str, message: Message) -> None:
        """Look up and store the hand-out count of a message next in line
        (see :meth:`_reserve_next`); nothing once the queue is closed or the
        reservation was dropped meanwhile."""
        self._check_open()
        if self._count_writes.get(key) is not asyncio.current_task():
            return
        _undo_at_exit.add(self)  # a program ending without aclose() withdraws it too
        await self._count(key, message)

    def _reserve_depth(self) -> int:
        """One ahead; up to ``_RESERVE_MAX`` while acks come faster than
        one per ``_HOT_GAP_SECONDS``."""
        now = asyncio.get_running_loop().time()
        hot = now - self._last_ack < _HOT_GAP_SECONDS
        self._last_ack = now
        return _RESERVE_MAX if hot else 1

    def _unreserve(self, key: str) -> None:
        """A counted message that is not handed out but settled otherwise
        (dead-lettered): its count goes with the message."""
        self._counted.pop(key, None)
        self._count_writes.pop(key, None)
        self._unconfirmed.discard(key)
        self._stop_watching(key)

    def _dropped(self, message: Message) -> None:
        """The consumer dropped a copy of a message acked already (see
        ``AsyncConsumer.on_drop``): a count written for it ahead is dropped
        too, and tombstoned."""
        key = _message_key(message)
        if key in self._counted:
            self._unreserve(key)
            self._background(self._drop_count(key))

    # -- leases ----------------------------------------------------------------
    def _lease(self, delivery: PulsarDelivery, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        if delivery._timer is not None:
            delivery._timer.cancel()
        delivery._expires = loop.time() + seconds
        delivery._timer = loop.call_at(delivery._expires, self._expire, delivery)

    def _expire(self, delivery: PulsarDelivery) -> None:
        if delivery._state != _LEASED:
            return
        delivery._state = _EXPIRED
        delivery._timer = None
        self._release(delivery)
        if self._closed or self._consumer is None:
            return
        if delivery.attempt >= self.max_attempts:
            record = self._record(
                delivery,
                delivery._last_error
                or f"not acknowledged after {delivery.attempt} deliveries (lease expired)",
            )
            self._background(self._dead_letter_message(delivery._message, record))
            self._report_exhausted(delivery.request, record.error)
        else:
            self._give_back(delivery._message)

    def _release(self, delivery: PulsarDelivery) -> None:
        key = _message_key(delivery._message)
        if self._held.get(key) is delivery:
            del self._held[key]

    def _give_back(self, message: Message) -> None:
        if self._consumer is None:
            return
        try:
            self._consumer.negative_acknowledge(message)
        except TransportError as exc:  # redelivered when the consumer closes
            log.warning("queue %r: could not hand a message back: %s", self.name, exc)

    def _extend(self, delivery: PulsarDelivery, seconds: float | None) -> bool:
        if delivery._state != _LEASED or self._closed:
            return False
        self._lease(delivery, seconds or self.lease_seconds)
        return True

    def _begin_settle(self, delivery: PulsarDelivery) -> bool:
        if delivery._state != _LEASED or self._closed:
            return False
        delivery._state = _SETTLING
        return True

    def _finish_settle(self, delivery: PulsarDelivery, ok: bool, *, gone: bool = True) -> None:
        """``gone``: the message was acknowledged (its hand-out count is
        dropped); else given back to the broker (the count stays)."""
        if ok:
            delivery._state = _SETTLED
            if delivery._timer is not None:
                delivery._timer.cancel()
                delivery._timer = None
            self._release(delivery)
            if gone:
                self._forget_count(delivery._message)
            return
        # The settle failed: the lease is still ours until it runs out.
        delivery._state = _LEASED
        if asyncio.get_running_loop().time() >= delivery._expires:
            self._expire(delivery)

    # -- settling ----------------------------------------------------------------
    async def _ack(self, delivery: PulsarDelivery) -> bool:
        if not self._begin_settle(delivery):
            return False
        self._count_next_ahead()
        return await self._acknowledge(delivery)

    def _count_next_ahead(self) -> None:
        """:meth:`_reserve_next` beside an ack: the next polls' counts,
        written while the ack is on its way. An optimisation only: if it
        fails, the polls count instead."""
        try:
            self._reserve_next()
        except Exception as exc:
            log.debug("queue %r: no hand-out counted ahead: %s", self.name, exc)

    async def _nack(self, delivery: PulsarDelivery, delay: float, error: str | None) -> bool:
        if delivery.attempt >= self.max_attempts:
            return await self._settle_dead(
                delivery,
                error or delivery._last_error or f"nacked after {delivery.attempt} deliveries",
            )
        if not self._begin_settle(delivery):
            return False
        ok = False
        give_back = not delay and error is None
        try:
            assert self._consumer is not None
            if give_back:
                self._consumer.negative_acknowledge(delivery._message)
            else:
                await self._republish(delivery, delay, error)
                await self._consumer.acknowledge(delivery._message, self._timeout)
            ok = True
        finally:
            self._finish_settle(delivery, ok, gone=not give_back)
        return True

    async def _release_uncounted(self, delivery: PulsarDelivery) -> bool:
        """Give back a delivery no handler saw: its hand-out count in
        ``<queue>__attempts`` is lowered first, then the message is
        negatively acknowledged."""
        if not self._begin_settle(delivery):
            return False
        ok = False
        try:
            message = delivery._message
            try:
                before = int(message.properties().get(ATTEMPTS_PROPERTY, "0"))
            except ValueError:
                before = 0
            handed = delivery.attempt - before - 1  # hand-outs before this one
            written = await self._attempts.write(
                _message_key(message), self._count_value(handed, set_=True) if handed > 0 else None
            )
            # Read back before the message is given back: a later count of it
            # by this handle must not take the count it lowered for its own.
            if self._attempts.view is not None:
                await self._attempts.read_through(written)
            assert self._consumer is not None
            self._consumer.negative_acknowledge(message)
            ok = True
        finally:
            self._finish_settle(delivery, ok, gone=False)
        return True

    async def _republish(self, delivery: PulsarDelivery, delay: float, error: str | None) -> None:
        properties = {
            ATTEMPTS_PROPERTY: str(delivery.attempt),
            REQUEST_ID_PROPERTY: delivery.request.request_id,
        }
        reason = error if error is not None else delivery._last_error
        if reason:
            properties[ERROR_PROPERTY] = error_header(reason)
        if delay:
            properties[NOT_BEFORE_PROPERTY] = str(int((time.time() + delay) * 1000))
        producer = await self._get_producer()
        await producer.send(
            bytes(delivery._message.data()),
            key=delivery.request.message_key,
            properties=properties,
            deliver_after=delay or None,
        )

    def _record(self, delivery: PulsarDelivery, error: str) -> DeadLetter:
        return DeadLetter(
            queue=self.name,
            request_id=delivery.request.request_id,
            request=delivery.request,
            error=error,
            attempts=delivery.attempt,
        )

    async def _settle_dead(self, delivery: PulsarDelivery, error: str) -> bool:
        if not self._begin_settle(delivery):
            return False
        ok = False
        try:
            await self._dead_letter_message(
                delivery._message, self._record(delivery, error), give_back=False
            )
            ok = True
        finally:
            self._finish_settle(delivery, ok, gone=False)  # dropped by _dead_letter_message
        return True

    async def _dead_letter_message(
        self, message: Message, record: DeadLetter, give_back: bool = True
    ) -> None:
        """Store the record, then ack the source message (a crash in between
        leaves a duplicate dead letter, never a lost request)."""
        try:
            key = f"{record.request_id or 'raw'}.{uuid.uuid4().hex}"
            await self._dlq.write(key, encode(record))
            assert self._consumer is not None
            await self._consumer.acknowledge(message, self._timeout)
            self._forget_count(message)
        except TransportError:
            if give_back:  # background: try again on the next delivery
                log.warning(
                    "queue %r: dead-lettering failed; the message will come back", self.name
                )
                self._give_back(message)
                return
            raise

    def _forget_count(self, message: Message) -> None:
        """Tombstone the hand-out count of an acknowledged message (in the
        background: a failure leaves a stale entry, never a wrong count)."""
        self._background(self._drop_count(_message_key(message)))

    async def _drop_count(self, key: str) -> None:
        try:
            await self._attempts.write(key, None)
        except TransportError as exc:
            log.info("queue %r: hand-out count not dropped: %s", self.name, exc)

    async def _withdraw_counts(self) -> None:
        """Withdraw the counts of hand-outs that did not happen (after the
        writes of them still on their way: the withdrawal must land last)."""
        in_flight = [w for w in self._count_writes.values() if not w.done()]
        if in_flight:
            # Sent ones stay in order on the producer; this waits for writes
            # not yet sent, then withdraws all the same.
            await asyncio.wait(in_flight, timeout=max(self._close_timeout / 2, 0.1))
        counted, self._counted = self._counted, {}
        # A count not read back yet was claimed on a view that may have been
        # stale: read the topic to its end first, to withdraw it to the count
        # other workers stored; if that fails it stays (one hand-out too many
        # at most), as lowering it blindly could take away such a count.
        unsure = [key for key in counted if key in self._unconfirmed]
        if unsure:
            try:
                await self._attempts.synced()
            except TransportError as exc:
                log.warning(
                    "queue %r: %d hand-out counts not withdrawn (%s)", self.name, len(unsure), exc
                )
            else:
                self._resolve_unsure(unsure, counted)
        writes = [
            self._attempts.write(key, self._count_value(n - 1, set_=True) if n > 1 else None)
            for key, n in counted.items()
            if key not in self._unconfirmed
        ]
        results = await asyncio.gather(*writes, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.warning("queue %r: a hand-out count was not withdrawn: %s", self.name, result)

    def _resolve_unsure(self, unsure: list[str], counted: dict[str, int]) -> None:
        """Counts not read back, once the view has read the topic to its
        end: each is withdrawn to what other workers stored for the
        message, unless the view was rebuilt since its watch began (what
        was merged may be short: it stays, one hand-out too many at most)."""
        generation = self._attempts.generation
        for key in unsure:
            if self._watch_generation.get(key) == generation:
                counted[key] = _parse_count(self._foreign.get(key)) + 1
                self._unconfirmed.discard(key)

    def _undo_at_exit(self, deadline: float) -> None:
        """At interpreter exit, for a handle never closed: withdraw the counts
        of hand-outs that did not happen (as :meth:`_withdraw_counts`, without
        an event loop, until ``deadline``), so that a program that forgot
        ``aclose()`` does not use up attempts of requests it never handled."""
        if self._closed:
            return
        counted = dict(self._counted)
        unsure = [key for key in counted if key in self._unconfirmed]
        if unsure and self._attempts.catch_up_at_exit(deadline):  # see _withdraw_counts
            self._resolve_unsure(unsure, counted)
        for key, n in counted.items():
            if time.monotonic() >= deadline:
                return
            if key in self._unconfirmed:
                continue
            value = self._count_value(n - 1, set_=True) if n > 1 else None
            self._attempts.write_at_exit(key, value, deadline)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- dead letters and stats ----------------------------------------------------
    async def _dead_records(self) -> list[tuple[str, DeadLetter]]:
        out = []
        for key, raw in (await self._dlq.snapshot()).items():
            try:
                out.append((key, decode(DeadLetter, raw)))
            except UndecodableMessageError:
                log.warning(
                    "queue %r: skipping an unreadable dead-letter record %r", self.name, key
                )
        return out

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        self._check_open()
        return [
            record.model_copy(update={"dead_letter_id": key})
            for key, record in await self._dead_records()
        ][:limit]

    async def replace_dead_letter(self, dead_letter_id: str, request: WorkRequest) -> bool:
        self._check_open()
        if not any(key == dead_letter_id for key, _ in await self._dead_records()):
            return False
        await self.enqueue(requeued(request))
        await self._dlq.write(dead_letter_id, None)
        return True

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        self._check_open()
        wanted = None if request_ids is None else set(request_ids)
        moved = 0
        for key, record in await self._dead_records():
            if record.request is None or (wanted is not None and record.request_id not in wanted):
                continue
            await self.enqueue(requeued(record.request))
            await self._dlq.write(key, None)
            moved += 1
        return moved

    async def stats(self) -> QueueStats:
        """Depth is the subscription's backlog (every request not yet acked,
        leased ones included), from the admin REST API if ``admin_url`` is
        set, else from the broker's consumer-stats command; ``None`` if the
        broker offers neither (pulsar-lite). ``delayed`` counts the delayed
        requests this handle holds; ``in_flight`` is the broker's count of
        dispatched-but-unacked messages where the admin API reports it.

        ``head_enqueued_at`` (only with ``admin_url``) is the ``enqueued_at``
        of the subscription's first unacknowledged message in publish order,
        as the admin API's peek (``.../subscription/{sub}/position/1``) reads
        it: messages acked out of order are skipped, a leased one or a
        delayed copy not yet due counts (like the backlog). Without the
        admin API it is ``None``: the binary protocol gives a client no way
        to read the subscription's position, and this process's consumer
        sees only what the broker dispatched to it (capability
        ``queue_head`` is false then).

        Raises: TransientTransportError (broker or admin API unreachable,
        timeout).
        """
        self._check_open()
        dead = len(await self._dead_records())
        admin = self._opts.admin_url
        depth: int | None
        in_flight: int | None = None
        head: datetime | None = None
        if admin is not None:
            depth, in_flight = await self._admin_backlog(admin)
            if depth:
                head = await self._admin_head(admin)
        else:
            depth = await self._ctx.subscription_backlog(self.topic)
        return QueueStats(
            queue=self.name,
            depth=depth,
            in_flight=in_flight,
            delayed=len(self._delayed),
            dead_lettered=dead,
            head_enqueued_at=head,
        )

    def _admin_headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        token = self._ctx.config.token
        if token is not None:
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        return headers

    async def _admin_head(self, admin: str) -> datetime | None:
        """``enqueued_at`` of the first unacknowledged message of the queue
        subscription, peeked through the admin API; None if there is none
        (HTTP 404) or its body is not a request."""
        import urllib.error
        import urllib.request

        path = self.topic.removeprefix("persistent://")
        sub = quote(self._ctx.config.consumer_group, safe="")
        url = f"{admin.rstrip('/')}/admin/v2/persistent/{quote(path)}/subscription/{sub}/position/1"
        headers = self._admin_headers("application/octet-stream")

        def fetch() -> tuple[bytes, str] | None:
            req = urllib.request.Request(url, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self._timeout) as response:
                    if response.status == 204:
                        return None
                    return response.read(), response.headers.get("X-Pulsar-Message-ID", "")
            except urllib.error.HTTPError as exc:
                if exc.code == 404:  # nothing unacknowledged (or no subscription yet)
                    return None
                raise

        try:
            found = await self._client.run_blocking(fetch, self._timeout + 1)
        except (OSError, ValueError, TimeoutError) as exc:
            raise TransientTransportError(
                f"queue {self.name!r}: admin peek failed: {type(exc).__name__}"
            ) from exc
        if found is None:
            return None
        body, message_id = found
        try:
            return decode_request(body, self.topic, message_id).enqueued_at
        except UndecodableMessageError:
            return None  # dead-lettered when a worker reaches it

    async def _admin_backlog(self, admin: str) -> tuple[int, int | None]:
        import urllib.request

        path = self.topic.removeprefix("persistent://")
        url = f"{admin.rstrip('/')}/admin/v2/persistent/{quote(path)}/stats"
        headers = self._admin_headers("application/json")
        group = self._ctx.config.consumer_group

        def fetch() -> tuple[int, int | None]:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=self._timeout) as response:
                data = json.load(response)
            sub = data.get("subscriptions", {}).get(group)
            if sub is None:
                return 0, 0
            return int(sub.get("msgBacklog", 0)), sub.get("unackedMessages")

        try:
            result: tuple[int, int | None] = await self._client.run_blocking(
                fetch, self._timeout + 1
            )
        except (OSError, ValueError, TimeoutError) as exc:
            raise TransientTransportError(
                f"queue {self.name!r}: admin stats failed: {type(exc).__name__}"
            ) from exc
        return result

    # -- closing -----------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        _undo_at_exit.discard(self)
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        for delivery in list(self._held.values()):
            if delivery._timer is not None:
                delivery._timer.cancel()
            delivery._state = _EXPIRED
        self._held.clear()
        self._delayed.clear()
        self._delayed_ids.clear()
        if self._counted:
            with contextlib.suppress(TimeoutError):
                await wait_within(self._withdraw_counts(), self._close_timeout)
        for write in self._count_writes.values():
            write.cancel()
        self._count_writes.clear()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._close_timeout)
        # The counts written (withdrawals above) reach the broker before the
        # consumer gives its messages back: one landing after another worker
        # counted a message again would take that count away.
        with map_pulsar_errors(f"close {self.topic}"), contextlib.suppress(TransportError):
            await self._attempts.aclose()
        # Closing the consumer hands every unsettled message back at once.
        if self._consumer is not None:
            await self._consumer.close(self._close_timeout)
        if self._producer is not None:
            await self._producer.close(self._close_timeout)
        with map_pulsar_errors(f"close {self.topic}"), contextlib.suppress(TransportError):
            await self._dlq.aclose()
