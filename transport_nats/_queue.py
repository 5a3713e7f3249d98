"""JetStream request queue: one work-queue stream per queue, one durable pull
consumer shared by all its workers, one dead-letter stream.

Leases are JetStream's ack wait (``ack_wait = lease_seconds``); the attempt
is the delivery count (``metadata.num_delivered``) less the deliveries that
were no hand-out: a handle that closes with messages in its buffer (never
handed to a poll) records them in a KV bucket ``<queue>__uncounted`` (key:
stream sequence) before giving them back, as does a delivery given back
unseen by a handler (a priority queue's held head), and a message delivered more than
once has that record looked up; the record is deleted when the message is
settled. A process killed with a buffer counts those deliveries (at most
``prefetch``, or the one pulled for a poll that gave up). JetStream alone never
dead-letters (``max_deliver`` only emits an advisory and keeps the message),
so this queue does: a request nacked on its last attempt, or seen again after
its ``max_attempts``-th lease expired, is copied to the dead-letter stream
(PubAck first) and then acked away.

Pulls are issued by this module, each with its own reply subject and an
``expires`` no longer than the poll's remaining time (and ``pull_expires``),
asking for as many messages as there are polls waiting on the handle that no
open pull will serve (concurrent polls share pulls). Messages go to the
oldest waiting poll; a message that arrives when no poll waits (it gave up:
timeout, cancellation) is kept and handed to the next poll while its lease is
still good. With ``prefetch`` > 1, a poll that finds the buffer empty first
asks for what is available now (``no_wait``, up to ``prefetch``), the buffer
is topped up the same way when it falls below half, and the leases of
buffered messages are renewed (``+WPI``) while the handle is being polled.

A pull that the server never answers — it restarted and forgot it — is
abandoned after its expiry plus a grace period, and every waiting poll asks
again at once when the client reconnects, so a restarted server never leaves
a consumer silently stalled. PubAcks and acknowledgements are request/replies
on the transport's shared reply subscription (``NatsContext.requests``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections import deque
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

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
    decode_request,
    encode_dead_letter,
    error_header,
    hand_to_waiter,
    internal_name,
    replace_fields,
    requeued,
    utcnow,
    wait_within,
)
from transport.kit import seconds as _seconds
from transport_nats._client import NatsContext, check_puback
from transport_nats._errors import map_nats_errors
from transport_nats._registries import NatsKeyedLog

__all__ = ["NatsDelivery", "NatsRequestQueue"]

log = logging.getLogger("transport.nats")

_NO_WAIT_BELOW = 0.02  # a poll with less time left asks with a pull held this long


_Held = tuple[Msg, float]  # a pulled message and when it arrived (its lease start)


def _status(msg: Msg) -> str | None:
    headers = msg.headers
    if headers and not msg.data:
        return headers.get("Status")
    return None


class NatsDelivery(Delivery):
    """A message pulled from the queue's consumer, leased until settled or
    until its ack wait runs out (tracked locally, so a stale delivery reports
    ``False`` instead of acking a message another worker now holds)."""

    __slots__ = ("_keeper", "_lease_until", "_msg", "_q", "_seq", "_settled")

    def __init__(
        self, request: WorkRequest, queue: NatsRequestQueue, msg: Msg, seq: int, lease_until: float
    ):
        super().__init__(request)
        self._q = queue
        self._msg = msg
        self._seq = seq
        self._lease_until = lease_until
        self._settled = False
        self._keeper: asyncio.Task[None] | None = None

    def _usable(self) -> bool:
        if self._settled:
            return False
        if asyncio.get_running_loop().time() >= self._lease_until:
            self._finish()  # the server has redelivered it, or is about to
            return False
        return True

    def _finish(self) -> None:
        self._settled = True
        if self._q._held.get(self._seq) is self:
            del self._q._held[self._seq]
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()

    async def _settle(self, payload: bytes) -> bool:
        if not self._usable():
            return False
        self._settled = True
        try:
            await self._q._reply(self._msg, payload)
        except BaseException:
            self._settled = False
            raise
        self._finish()
        return True

    async def ack(self) -> bool:
        if not await self._settle(b"+ACK"):
            return False
        self._q._forget_uncounted(self._seq)
        return True

    async def nack(
        self, delay: float | timedelta | None = None, *, error: str | None = None
    ) -> bool:
        wait = _seconds(delay) or 0.0
        if not self._usable():
            return False
        if self.attempt >= self._q.max_attempts:
            return await self.dead_letter(error or f"nacked after {self.attempt} deliveries")
        if error:
            self._q._ctx.remember_error(self._q.stream, self._seq, error)
        if wait > 0:
            return await self._settle(b"-NAK " + json.dumps({"delay": int(wait * 1e9)}).encode())
        return await self._settle(b"-NAK")

    async def extend(self, seconds: float | timedelta | None = None) -> bool:
        wanted = _seconds(seconds) or self._q.lease_seconds
        if not self._usable():
            return False
        await self._q._reply(self._msg, b"+WPI")
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._lease_until = now + self._q.lease_window
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        if wanted > self._q.lease_seconds:
            # The server renews by one ack wait per +WPI: keep renewing until
            # the asked-for time has passed (or the delivery is settled).
            self._keeper = asyncio.create_task(self._keep(now + wanted))
        return True

    async def _keep(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        period = max(self._q.lease_seconds / 3, 0.05)
        while not self._settled:
            await asyncio.sleep(min(period, max(until - loop.time(), 0.0)))
            if self._settled or loop.time() >= until or loop.time() >= self._lease_until:
                return  # done, or the lease was already lost: renew nobody else's
            try:
                await self._q._reply(self._msg, b"+WPI")
            except TransportError as exc:
                log.warning("queue %r: lease renewal failed: %s", self._q.name, exc)
                continue
            if not self._settled:
                self._lease_until = loop.time() + self._q.lease_window

    async def dead_letter(self, error: str) -> bool:
        if not self._usable():
            return False
        self._settled = True
        try:
            await self._q._dead_letter_msg(self._msg, self.request, error, self.attempt)
        except BaseException:
            self._settled = False
            raise
        self._finish()
        return True

    async def _release_uncounted(self) -> bool:
        # JetStream counted this delivery: recorded as no hand-out in
        # <queue>__uncounted first, then given back (NAK).
        if not self._usable():
            return False
        self._settled = True
        try:
            await self._q._record_uncounted_one(self._msg)
            await self._q._reply(self._msg, b"-NAK")
        except BaseException:
            self._settled = False
            raise
        self._finish()
        return True


class NatsRequestQueue(RequestQueue):
    """See the module docstring. Guarantees as :class:`RequestQueue`."""

    def __init__(self, ctx: NatsContext, name: str, *, lease_seconds: float, max_attempts: int):
        self.name = name
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_payload_bytes = ctx.body_limit
        self._ctx = ctx
        self._opts = ctx.options
        ns = ctx.config.namespace
        self.stream = f"{ns}__{name}"
        self.subject = f"{ns}.q.{name}"
        self.dlq_stream = f"{ns}__{internal_name(name, 'dlq')}"
        self.dlq_subject = f"{ns}.dlq.{name}"
        # Deliveries JetStream counted that were no hand-out: a closing
        # handle's buffered messages, per stream sequence (see _accept).
        self._uncounted = NatsKeyedLog(ctx, f"{ns}__{internal_name(name, 'uncounted')}")
        # stream sequence -> (delivery count, deliveries that were no hand-out)
        self._uncounted_known: dict[int, tuple[int, int]] = {}
        self.durable = ctx.config.consumer_group
        # The local view of a lease ends a little before the server's, which
        # starts when it sent the message (before we received it).
        self.lease_window = lease_seconds - min(0.05 * lease_seconds, 0.25)
        self._setup_lock = asyncio.Lock()
        self._consumer_ready = False
        self._sub: Any = None
        self._inbox = ""
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        # Not with a single attempt: JetStream counts a buffered message as
        # delivered, so a kill would leave requests no handler saw exhausted.
        self._prefetch = self._opts.prefetch if max_attempts > 1 else 1
        # Open pull requests: reply token -> [messages still due, local expiry].
        self._pulls: dict[str, list[Any]] = {}
        # Polls waiting for a message, oldest first.
        self._waiters: deque[asyncio.Future[_Held | None]] = deque()
        # Messages received that no poll has taken yet, with their arrival.
        self._buffer: deque[_Held] = deque()
        self._keeper: asyncio.Task[None] | None = None
        self._last_poll = 0.0
        self._held: dict[int, NatsDelivery] = {}
        self._tokens = itertools.count()
        self._closed = False
        self._blocked_until = 0.0
        #: When this handle last sent a pull (event-loop time): a poll failing
        #: since before then has recovered in between.
        self._pulled_at = 0.0
        self._drops: set[asyncio.Task[None]] = set()
        self._bucket_opening: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<NatsRequestQueue {self.name!r} stream={self.stream}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"queue {self.name!r} is closed")
        self._ctx.check_open()

    # -- setup -------------------------------------------------------------
    async def _ensure_streams(self) -> None:
        if self._ctx.has_streams(self.stream, self.dlq_stream):
            return
        opts = self._opts
        await self._ctx.ensure_stream(
            StreamConfig(
                name=self.stream,
                subjects=[self.subject],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                discard=DiscardPolicy.OLD,
                duplicate_window=opts.duplicate_window,
                num_replicas=opts.replicas,
            )
        )
        await self._ctx.ensure_stream(
            StreamConfig(
                name=self.dlq_stream,
                subjects=[self.dlq_subject],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                duplicate_window=opts.duplicate_window,
                num_replicas=opts.replicas,
            )
        )

    async def _ensure_consumer(self) -> None:
        if self._consumer_ready:
            return
        async with self._setup_lock:
            if self._consumer_ready:
                return
            self._ctx.check_connected(f"creating consumer {self.durable} on {self.stream}")
            await self._ensure_streams()
            with map_nats_errors(f"creating consumer {self.durable} on {self.stream}"):
                await self._ctx.js.add_consumer(
                    self.stream,
                    ConsumerConfig(
                        durable_name=self.durable,
                        ack_policy=AckPolicy.EXPLICIT,
                        deliver_policy=DeliverPolicy.ALL,
                        ack_wait=self.lease_seconds,
                        max_deliver=-1,
                        max_ack_pending=self._opts.max_ack_pending,
                        num_replicas=self._opts.replicas,
                    ),
                )
                if self._sub is None:
                    self._inbox = self._ctx.nc.new_inbox()
                    self._sub = await self._ctx.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
                    self._ctx.add_reconnect_listener(self._on_reconnect)
            if self._prefetch > 1:
                # A close records the buffered messages it gives back: have
                # the bucket ready (the transport may be closing by then).
                await self._uncounted._bucket()
            self._consumer_ready = True

    # -- producing -----------------------------------------------------------
    async def _publish(self, subject: str, stream: str, body: bytes, msg_id: str) -> None:
        """Publish and wait for the PubAck, retrying transient failures with
        the same ``Nats-Msg-Id`` (the stream stores it once), for
        ``enqueue_retry_seconds`` in all: an attempt still waiting for its
        PubAck then is given up too (it may still be stored, as one whose
        PubAck was lost). The last attempt used to get its whole
        ``request_timeout`` on top: 15.5 s where 11 s are documented."""
        window = self._opts.enqueue_retry_seconds
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self._publish_once(subject, stream, body, msg_id)
            return
        except TransientTransportError as exc:
            if window <= 0:
                raise
            last: TransientTransportError = exc
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientTransportError),
            stop=stop_after_delay(window),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        )
        try:
            async with asyncio.timeout_at(started + window):
                async for attempt in retrying:
                    with attempt:
                        try:
                            await self._publish_once(subject, stream, body, msg_id)
                        except TransientTransportError as exc:
                            last = exc
                            raise
        except TimeoutError:
            raise TransientTransportError(
                f"{last} (enqueue retried for {window:g} s, enqueue_retry_seconds)"
            ) from last

    async def _publish_once(self, subject: str, stream: str, body: bytes, msg_id: str) -> None:
        self._check_open()
        # Not into the reconnect buffer: stored after this enqueue raised.
        self._ctx.check_connected(f"publishing to {stream}")
        try:
            if not self._ctx.has_streams(self.stream, self.dlq_stream):
                await self._ensure_streams()
            with map_nats_errors(f"publishing to {stream}"):
                # js.publish, without building a PubAck object nobody reads.
                try:
                    reply = await self._ctx.requests.request(
                        subject, body, {"Nats-Msg-Id": msg_id, "Nats-Expected-Stream": stream}
                    )
                except nats.errors.NoRespondersError:
                    raise nats.js.errors.NoStreamResponseError from None
                check_puback(reply)
        except TransientTransportError:
            # Re-check the streams on the next try (a restarted or wiped
            # server may have lost them).
            self._ctx.forget_stream(stream)
            raise

    async def _store_request(self, request: WorkRequest, body: bytes) -> None:
        await self._publish(self.subject, self.stream, body, request.request_id)

    # -- consuming -----------------------------------------------------------
    def _outstanding(self) -> int:
        return sum(entry[0] for entry in self._pulls.values())

    async def _on_msg(self, msg: Msg) -> None:
        status = _status(msg)
        if status is not None:
            # Status messages come on the reply subject of the pull they end.
            entry = self._pulls.pop(msg.subject, None)
            if status == "100":  # heartbeat: the pull is still open
                if entry is not None:
                    self._pulls[msg.subject] = entry
                return
            if status in ("409", "503"):
                desc = msg.headers.get("Description", "") if msg.headers else ""
                log.debug("queue %r: pull ended with %s %s", self.name, status, desc)
                # No responders / consumer deleted: check the consumer again
                # and do not hammer the server meanwhile.
                if status == "503" or "deleted" in desc.lower():
                    self._consumer_ready = False
                self._blocked_until = asyncio.get_running_loop().time() + 0.2
            self._wake_uncovered()
            return
        # A JetStream message carries its stream subject, not the pull's reply
        # subject: count it against the oldest open pull (only the total
        # matters) and hand it to the oldest waiting poll, or keep it for the
        # next poll.
        token = next(iter(self._pulls), None)
        if token is not None:
            entry = self._pulls[token]
            entry[0] -= 1
            if entry[0] <= 0:
                del self._pulls[token]
        held = (msg, asyncio.get_running_loop().time())
        if hand_to_waiter(self._waiters, held):
            return
        self._buffer.append(held)
        self._open_uncounted_soon()
        if self._prefetch > 1 and (self._keeper is None or self._keeper.done()):
            self._keeper = asyncio.get_running_loop().create_task(self._keep_buffer())

    def _wake_uncovered(self) -> None:
        """Wake the polls no open pull will serve any more, so they ask again."""
        live = [w for w in self._waiters if not w.done()]
        uncovered = len(live) - self._outstanding()
        while uncovered > 0 and live:
            live.pop().set_result(None)
            uncovered -= 1
        self._waiters = deque(live)

    def _on_reconnect(self) -> None:
        # Pull requests on a restarted server are gone: forget them and wake
        # every waiting poll, which issues a fresh one.
        self._pulls.clear()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._consumer_ready = False

    def _abandon(self, waiter: asyncio.Future[_Held | None]) -> None:
        if waiter.done():
            if (
                not waiter.cancelled()
                and waiter.exception() is None
                and (held := waiter.result()) is not None
            ):
                self._buffer.appendleft(held)
        else:
            waiter.cancel()

    async def _send_pull(self, batch: int, expires: float | None, now: float) -> None:
        """One pull request for ``batch`` messages; ``expires`` None asks the
        server to answer at once (no_wait)."""
        token = f"{self._inbox}.{next(self._tokens)}"
        request: dict[str, Any] = {"batch": batch}
        grace = min(1.0, self._opts.request_timeout)
        if expires is None:
            request["no_wait"] = True
            until = now + grace
        else:
            request["expires"] = max(int(expires * 1e9), 1_000_000)
            until = now + expires + grace
        # Not into the reconnect buffer: sent after reconnecting, a pull
        # would take messages for a poll that has long given up.
        self._ctx.check_connected(f"pulling from {self.stream}")
        self._pulls[token] = [batch, until]
        try:
            with map_nats_errors(f"pulling from {self.stream}"):
                await self._ctx.nc.publish(
                    self._next_subject, json.dumps(request).encode(), reply=token
                )
        except BaseException:
            self._pulls.pop(token, None)
            raise
        self._pulled_at = now

    def _purge_pulls(self, now: float) -> None:
        """Forget pulls the server should long have answered."""
        for token in [t for t, entry in self._pulls.items() if entry[1] < now]:
            del self._pulls[token]

    async def _keep_buffer(self) -> None:
        """Renew the leases of prefetched messages no poll has taken yet, as
        long as this handle is being polled (a handle nobody polls for a lease
        lets them go back to the other workers)."""
        loop = asyncio.get_running_loop()
        period = max(self.lease_window / 3, 0.05)
        while self._buffer and not self._closed:
            await asyncio.sleep(period)
            now = loop.time()
            # Drop what the server has taken back already (its lease ran out).
            self._buffer = deque(h for h in self._buffer if now < h[1] + self.lease_window)
            if now - self._last_poll > self.lease_seconds:
                continue
            due = [
                h for h in self._buffer if now - h[1] >= period and now < h[1] + self.lease_window
            ]
            if not due:
                continue
            results = await asyncio.gather(
                *(self._reply(msg, b"+WPI") for msg, _ in due), return_exceptions=True
            )
            renewed = {id(h[0]) for h, r in zip(due, results, strict=True) if r is None}
            if renewed:
                self._buffer = deque(
                    (msg, now) if id(msg) in renewed else (msg, received)
                    for msg, received in self._buffer
                )

    async def _accept(self, msg: Msg, received: float) -> NatsDelivery | None:
        """Turn a pulled message into a delivery, or dead-letter it."""
        try:
            meta = msg.metadata
        except nats.errors.Error:
            log.warning("queue %r: ignoring a message without JetStream metadata", self.name)
            return None
        seq = meta.sequence.stream
        try:
            attempt = meta.num_delivered - await self._uncounted_of(seq, meta.num_delivered)
        except BaseException:
            self._buffer.appendleft((msg, received))  # not lost to a cancelled poll
            raise
        if attempt > self.max_attempts:
            request: WorkRequest | None
            try:
                request = decode_request(msg.data, self.stream, seq)
            except UndecodableMessageError:
                request = None
            error = self._ctx.last_errors.pop((self.stream, seq), None) or (
                f"not acknowledged after {attempt - 1} deliveries (lease expired)"
            )
            await self._dead_letter_msg(msg, request, error, attempt - 1)
            self._report_exhausted(request, error)
            return None
        try:
            request = decode_request(msg.data, self.stream, seq)
        except UndecodableMessageError as exc:
            await self._dead_letter_msg(msg, None, str(exc), attempt)
            return None
        if request.attempt != attempt:
            request = replace_fields(request, attempt=attempt)
        delivery = NatsDelivery(request, self, msg, seq, received + self.lease_window)
        self._held[seq] = delivery
        self._open_uncounted_soon()
        return delivery

    async def _uncounted_of(self, seq: int, delivered: int) -> int:
        """Deliveries of message ``seq`` that were no hand-out (sent to a
        handle that closed with it in its buffer)."""
        known = self._uncounted_known.get(seq)
        if known is not None and known[0] == delivered:
            return known[1]  # not delivered again since: no other handle wrote
        if delivered <= 1:
            return 0
        raw = await self._uncounted.get(str(seq))
        try:
            count = min(max(int(raw or b"0"), 0), delivered - 1)
        except ValueError:
            count = 0
        if count:
            self._uncounted_known[seq] = (delivered, count)
        return count

    def _forget_uncounted(self, seq: int) -> None:
        """Drop the record of a settled message (in the background: a
        failure leaves a stale record of a message that is gone)."""
        if self._uncounted_known.pop(seq, None) is None:
            return

        async def drop() -> None:
            try:
                await self._uncounted.delete(str(seq))
            except TransportError as exc:
                log.info("queue %r: uncounted-delivery record not dropped: %s", self.name, exc)

        task = asyncio.get_running_loop().create_task(drop())
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    def _open_uncounted_soon(self) -> None:
        """A close gives buffered messages back, and a delivery no handler
        saw may be given back, each recorded first: open that bucket now
        (the transport may be closing by then)."""
        if self._bucket_opening is None:
            self._bucket_opening = asyncio.get_running_loop().create_task(self._open_uncounted())

    async def _open_uncounted(self) -> None:
        try:
            await self._uncounted._bucket()
        except TransportError as exc:
            self._bucket_opening = None  # the next buffered message tries again
            log.info("queue %r: opening %s: %s", self.name, self._uncounted.bucket, exc)

    async def _record_uncounted(self, msgs: list[Msg]) -> None:
        """Before a closing handle gives back messages it never handed out,
        record that JetStream's delivery of each was no hand-out."""

        results = await asyncio.gather(
            *(self._record_uncounted_one(m) for m in msgs), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                log.warning(
                    "queue %r: a buffered request given back at close keeps an attempt: %s",
                    self.name,
                    result,
                )

    async def _record_uncounted_one(self, msg: Msg) -> None:
        """Record that JetStream's current delivery of ``msg`` was no hand-out."""
        opening = self._bucket_opening
        if opening is not None and not opening.done():
            await wait_within(asyncio.shield(opening), self._opts.request_timeout)
        meta = msg.metadata
        seq = meta.sequence.stream
        count = await self._uncounted_of(seq, meta.num_delivered) + 1
        await self._uncounted.put(str(seq), str(count).encode())
        self._uncounted_known[seq] = (meta.num_delivered, count)

    async def _from_buffer(self) -> NatsDelivery | None:
        loop = asyncio.get_running_loop()
        while self._buffer:
            msg, received = self._buffer.popleft()
            if loop.time() >= received + self.lease_window:
                continue  # its lease ran out while nobody polled: redelivered by the server
            delivery = await self._accept(msg, received)
            if delivery is not None:
                return delivery
        return None

    async def _refill(self, now: float) -> None:
        """With ``prefetch`` > 1, ask for more before the buffer runs dry."""
        if self._prefetch <= 1 or now < self._blocked_until or not self._consumer_ready:
            return
        room = self._prefetch - len(self._buffer) - self._outstanding()
        if room >= self._prefetch // 2:
            await self._send_pull(room, None, now)  # what is there now, no more

    async def _poll_more(self, first: Delivery, count: int) -> list[Delivery]:
        """The rest of a ``poll_many`` batch: what is buffered, then one pull
        for the rest, held by the server as briefly as a ``poll(0)``'s (a
        pull for many, where concurrent ``poll(0)`` calls would each send
        their own). A failure ends the batch (the next call meets it)."""
        more: list[Delivery] = []
        loop = asyncio.get_running_loop()
        try:
            while len(more) < count and self._buffer:
                delivery = await self._from_buffer()
                if delivery is None:
                    break
                more.append(delivery)
            need = count - len(more)
            now = loop.time()
            if need <= 0 or self._closed or not self._consumer_ready or now < self._blocked_until:
                return more
            waiters: list[asyncio.Future[_Held | None]] = [
                loop.create_future() for _ in range(need)
            ]
            self._waiters.extend(waiters)
            try:
                await self._send_pull(need, _NO_WAIT_BELOW, now)
                grace = min(1.0, self._opts.request_timeout)
                # Each waiter gets a message, or None once the pull has
                # ended (its status wakes the waiters it no longer covers).
                await asyncio.wait(waiters, timeout=_NO_WAIT_BELOW + grace)
            except BaseException:
                for waiter in waiters:
                    self._abandon(waiter)  # a message it got goes back to the buffer
                raise
            held: list[_Held] = []
            for waiter in waiters:
                if (
                    waiter.done()
                    and not waiter.cancelled()
                    and waiter.exception() is None  # closed meanwhile
                    and waiter.result() is not None
                ):
                    held.append(waiter.result())  # type: ignore[arg-type]
                else:
                    self._abandon(waiter)
            for index, item in enumerate(held):
                try:
                    delivery = await self._accept(*item)
                except BaseException:
                    self._buffer.extend(held[index + 1 :])  # the next poll takes them
                    raise
                if delivery is not None:
                    more.append(delivery)
        except Exception as exc:
            log.debug("queue %r: poll_many stopped after %d: %s", self.name, len(more) + 1, exc)
        return more

    async def poll(self, timeout: float | None = None) -> NatsDelivery | None:
        self._check_open()
        timeout = _seconds(timeout)  # a negative timeout is refused, as for nack/extend
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(timeout, 0.0)
        backoff = 0.05
        failing_since: float | None = None
        while True:
            try:
                return await self._poll_until(deadline)
            except TransientTransportError as exc:
                # The server is restarting or unreachable: keep trying while
                # the caller is willing to wait, up to the operation timeout
                # (the README's promise for a broker that does not answer);
                # report it then, or when the poll's own time is up.
                self._check_open()
                self._consumer_ready = False
                now = loop.time()
                down = self._ctx.down_since
                if down is not None:
                    # From when this outage began (a poll waiting on a pull
                    # notices only when it asks again); an earlier outage
                    # this poll rode out does not count.
                    failing_since = min(down, now)
                elif failing_since is None or self._pulled_at > failing_since:
                    failing_since = now  # failing while connected, or again after recovering
                if (deadline is not None and now + backoff >= deadline) or (
                    now + backoff - failing_since >= self._ctx.operation_timeout
                ):
                    raise
                # The caller is told if it lasts (the poll raises): not a warning each time.
                log.debug("queue %r: poll retrying after: %s", self.name, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def _poll_until(self, deadline: float | None) -> NatsDelivery | None:
        await self._ensure_consumer()
        loop = asyncio.get_running_loop()
        may_ask = True  # even poll(0) asks the server once
        first = True
        while True:
            self._last_poll = now = loop.time()
            delivery = await self._from_buffer()
            if delivery is not None:
                await self._refill(now)
                return delivery
            remaining = None if deadline is None else deadline - now
            if not may_ask and remaining is not None and remaining <= 0:
                # Empty, or cut off: a poll that ends while the connection is
                # down says so instead of answering "no request".
                self._ctx.check_connected(f"polling {self.stream}")
                return None
            may_ask = False
            if now < self._blocked_until:
                pause = self._blocked_until - now
                await asyncio.sleep(pause if remaining is None else max(min(pause, remaining), 0))
                self._check_open()
                await self._ensure_consumer()
                continue
            self._purge_pulls(now)
            grace = min(1.0, self._opts.request_timeout)
            short = remaining is not None and remaining < _NO_WAIT_BELOW
            expires: float | None
            if short:
                # Little or no time left (poll(0)): a pull the server holds
                # for _NO_WAIT_BELOW, not a no_wait one: right after a
                # publish's PubAck the consumer may not have counted the new
                # message yet, and a no_wait pull then answers "none" although
                # the request is there (seen under load).
                expires = _NO_WAIT_BELOW
                wait = expires + grace
            else:
                expires = (
                    self._opts.pull_expires
                    if remaining is None
                    else min(remaining, self._opts.pull_expires)
                )
                # Wait for the answer to this pull (its expiry status comes
                # back about then), but never past the poll's own deadline.
                wait = expires + grace if remaining is None else min(expires + grace, remaining)
            # Ask for as many as there are polls waiting that no open pull will
            # serve (one pull for many concurrent polls). With a prefetch, the
            # first ask takes what is there now, up to the prefetch (no_wait:
            # nothing stays open to catch requests nobody polls for); only
            # then a waiting pull, for the waiting polls alone.
            outstanding = self._outstanding()
            need = sum(1 for w in self._waiters if not w.done()) + 1 - outstanding
            room = self._prefetch - len(self._buffer) - outstanding
            if first and self._prefetch > 1 and need > 0 and room > 1:
                await self._send_pull(max(need, room), None, now)
                wait = grace if remaining is None else min(grace, max(remaining, grace / 10))
            elif need > 0 or short:
                await self._send_pull(max(need, 1), expires, now)
            first = False
            waiter: asyncio.Future[_Held | None] = loop.create_future()
            self._waiters.append(waiter)
            held: _Held | None = None
            try:
                async with asyncio.timeout(wait):
                    held = await waiter
            except TimeoutError:
                self._abandon(waiter)
            except BaseException:
                self._abandon(waiter)
                raise
            if held is not None:
                delivery = await self._accept(*held)
                if delivery is not None:
                    return delivery
                may_ask = True  # that one was dead-lettered: look for the next
            self._check_open()
            if not self._consumer_ready:
                await self._ensure_consumer()

    # -- settling ------------------------------------------------------------
    async def _reply(self, msg: Msg, payload: bytes) -> None:
        """Send an ack-type reply and wait for the server's confirmation."""
        assert msg.reply
        with map_nats_errors(f"acknowledging on {self.stream}"):
            await self._ctx.requests.request(msg.reply, payload)

    async def _dead_letter_msg(
        self, msg: Msg, request: WorkRequest | None, error: str, attempts: int
    ) -> None:
        seq = msg.metadata.sequence.stream
        record = DeadLetter(
            queue=self.name,
            request_id=request.request_id if request else None,
            request=request,
            raw=None if request else msg.data,
            error=error_header(error),  # at most 4 KiB: the record stays under the limit
            attempts=attempts,
        )
        # Message id from the source sequence: retrying the copy stores it once.
        await self._publish(
            self.dlq_subject,
            self.dlq_stream,
            encode_dead_letter(record, self.max_payload_bytes),
            f"dlq-{self.stream}-{seq}",
        )
        await self._reply(msg, b"+ACK")
        self._ctx.last_errors.pop((self.stream, seq), None)
        self._forget_uncounted(seq)

    # -- inspection ----------------------------------------------------------
    async def stats(self) -> QueueStats:
        self._check_open()
        await self._ensure_streams()
        js = self._ctx.js
        with map_nats_errors(f"stats of {self.stream}"):
            info = await js.stream_info(self.stream)
            dead = await js.stream_info(self.dlq_stream)
            try:
                consumer = await js.consumer_info(self.stream, self.durable)
                leased = consumer.num_ack_pending or 0
                # The next request the consumer has not delivered yet.
                head_seq = (consumer.delivered.stream_seq or 0) + 1
            except nats.js.errors.NotFoundError:
                leased = 0
                head_seq = info.state.first_seq or 1
            head = await self._head_enqueued_at(head_seq) if info.state.messages else None
        messages = info.state.messages or 0
        # Prefetched requests no poll took yet are leased for the server but
        # waiting for this process's workers (other processes' buffers are
        # not known here).
        buffered = min(len(self._buffer), leased)
        leased -= buffered
        # The head too: the server's next undelivered request is younger
        # than the ones this handle prefetched and no poll took yet.
        now = asyncio.get_running_loop().time()
        for msg, received in self._buffer:
            if now >= received + self.lease_window:
                continue  # the server has taken it back
            try:
                at = decode(WorkRequest, msg.data or b"").enqueued_at
            except UndecodableMessageError:
                continue
            if at is not None and (head is None or at < head):
                head = at
        return QueueStats(
            queue=self.name,
            depth=max(messages - leased, 0),
            # Leased includes nacked-with-delay requests and expired leases
            # not yet redelivered: JetStream counts all of them as ack-pending.
            in_flight=leased,
            delayed=None,
            dead_lettered=dead.state.messages or 0,
            head_enqueued_at=head,
        )

    async def _head_enqueued_at(self, seq: int) -> datetime | None:
        """``enqueued_at`` of the first request at or after stream sequence
        ``seq`` (None if there is none or it cannot be read)."""
        try:
            raw = await self._ctx.js.get_msg(self.stream, seq=seq, subject=self.subject, next=True)
        except nats.js.errors.NotFoundError:
            return None
        try:
            return decode(WorkRequest, raw.data or b"").enqueued_at
        except UndecodableMessageError:
            return None

    async def _dead_records(self) -> Any:
        """Yield (sequence, record) of the dead-letter stream, oldest first."""
        seq = 1
        js = self._ctx.js
        while True:
            with map_nats_errors(f"reading {self.dlq_stream}"):
                try:
                    raw = await js.get_msg(
                        self.dlq_stream, seq=seq, subject=self.dlq_subject, next=True
                    )
                except nats.js.errors.NotFoundError:
                    return
            assert raw.seq is not None
            seq = raw.seq + 1
            try:
                record = decode(DeadLetter, raw.data or b"")
            except UndecodableMessageError:
                log.warning(
                    "%s: skipping unreadable dead-letter record %d", self.dlq_stream, raw.seq
                )
                continue
            yield raw.seq, record

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        self._check_open()
        await self._ensure_streams()
        out: list[DeadLetter] = []
        if limit <= 0:
            return out
        async for seq, record in self._dead_records():
            out.append(record.model_copy(update={"dead_letter_id": str(seq)}))
            if len(out) >= limit:
                break
        return out

    async def replace_dead_letter(self, dead_letter_id: str, request: WorkRequest) -> bool:
        self._check_open()
        await self._ensure_streams()
        if not dead_letter_id.isdigit():
            return False
        seq = int(dead_letter_id)
        with map_nats_errors(f"reading {self.dlq_stream}"):
            try:
                await self._ctx.js.get_msg(self.dlq_stream, seq=seq)
            except nats.js.errors.NotFoundError:
                return False
        repaired = requeued(request)
        if repaired.enqueued_at is None:
            repaired = replace_fields(repaired, enqueued_at=utcnow())
        # A distinct message id, as for a requeue: the request's own id may
        # still be inside the stream's duplicate window (the repaired request
        # keeps it), and JetStream would swallow the publish as a duplicate.
        body = encode(repaired, self.max_payload_bytes)
        await self._publish(self.subject, self.stream, body, f"{request.request_id}-replace-{seq}")
        # Already gone (removed meanwhile by another replace): the request is
        # enqueued all the same.
        with (
            map_nats_errors(f"removing dead letter from {self.dlq_stream}"),
            contextlib.suppress(nats.js.errors.NotFoundError),
        ):
            await self._ctx.js.delete_msg(self.dlq_stream, seq)
        return True

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        self._check_open()
        await self._ensure_streams()
        wanted = None if request_ids is None else set(request_ids)
        moved = 0
        async for seq, record in self._dead_records():
            request = record.request
            if request is None or (wanted is not None and request.request_id not in wanted):
                continue
            body = encode(requeued(request))
            # A distinct message id: the original id may still be inside the
            # duplicate window, and the requeue must not be swallowed.
            await self._publish(
                self.subject, self.stream, body, f"{request.request_id}-requeue-{seq}"
            )
            with map_nats_errors(f"removing dead letter from {self.dlq_stream}"):
                await self._ctx.js.delete_msg(self.dlq_stream, seq)
            moved += 1
        return moved

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ctx.remove_reconnect_listener(self._on_reconnect)
        self._pulls.clear()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                # The poll waiting on it raises this (a cancelled future would
                # surface as a CancelledError in a task nobody cancelled).
                waiter.set_exception(ClosedResourceError(f"queue {self.name!r} is closed"))
        if self._keeper is not None:
            self._keeper.cancel()
        # Hand unsettled deliveries back now, not after their ack wait.
        held = list(self._held.values())
        self._held.clear()
        nc = self._ctx.nc
        for delivery in held:
            delivery._finish()
        if self._sub is not None:
            # Drained, not just unsubscribed: a message the server sent
            # before it saw the UNSUB (a redelivery of one just given back
            # to a pull still open) lands in the buffer and is given back
            # below; dropped, it would wait out its ack wait and count.
            with contextlib.suppress(Exception):
                await wait_within(self._sub.drain(), self._opts.request_timeout)
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        now = asyncio.get_running_loop().time()
        unhanded = [m for m, received in self._buffer if now < received + self.lease_window]
        msgs = [d._msg for d in held] + [m for m, _ in self._buffer]
        self._buffer.clear()
        if self._bucket_opening is not None and not self._bucket_opening.done():
            with contextlib.suppress(Exception):
                await wait_within(self._bucket_opening, self._opts.request_timeout)
        if unhanded and not nc.is_closed:
            # JetStream counted their delivery to this handle, which handed
            # them to nobody: recorded first, so their next attempt is exact.
            with contextlib.suppress(TimeoutError):
                await wait_within(self._record_uncounted(unhanded), self._opts.request_timeout)
        if msgs and not nc.is_closed:
            with contextlib.suppress(Exception):
                for msg in msgs:
                    if msg.reply:
                        await nc.publish(msg.reply, b"-NAK")
                await wait_within(
                    self._ctx.round_trip(self._opts.request_timeout), self._opts.request_timeout
                )
        if self._drops:
            await asyncio.wait(set(self._drops), timeout=self._opts.request_timeout)
        await self._uncounted.aclose()
