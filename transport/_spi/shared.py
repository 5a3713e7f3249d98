"""Queue handles of one transport that share one queue per name.

On a backend whose queue handle takes messages ahead of its polls (Pulsar
prefetches, NATS pulls into a buffer), a program that opened a handle per
poll (``transport.request_queue("orders").poll(5)`` in a loop) left what
each handle had taken with a handle nobody polled: on Pulsar the first of
three waiting requests came and then nothing for a whole lease; on NATS
every such handle kept a subscription and a task until the transport
closed. A backend that sets ``Transport._shares_queues`` hands out light
handles (:class:`SharedQueueHandle`) over shared backend handles instead:

* the *consumer*: one backend handle for everything that polls and
  settles, created by the first poll of any handle and closed when the
  last handle that polled is closed -- so what it prefetched goes back as
  soon as nobody polls any more, even while handles that only enqueue stay
  open (an ``Ensemble`` stopping beside a producer in the same transport);
* the *producer*: one backend handle for enqueues and the dead letters,
  closed with the last handle.

Both close with the transport. Handles are held weakly (one dropped without
``aclose()`` is forgotten). Closing one of several polling handles nacks the
deliveries it handed out and did not settle (kept weakly per handle). See
``docs/contract.md``, item 23.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from transport._spi.queue import Delivery, RequestQueue
from transport._spi.queue import seconds as _seconds
from transport.errors import ClosedResourceError, TransientTransportError

if TYPE_CHECKING:
    from transport._spi.codec import RequestCodec
    from transport._spi.models import DeadLetter, QueueStats, WorkRequest

__all__ = ["SharedQueue", "SharedQueueHandle"]

#: A poll of a handle waits in slices this long, so that closing the handle
#: (while others keep the consumer open) ends its poll within one slice.
_SLICE_SECONDS = 1.0


class SharedQueue:
    """The backend handles shared by the handles of one queue (name and
    settings) of one transport, and those handles."""

    def __init__(
        self,
        key: tuple[str, float, int],
        open_queue: Callable[[], RequestQueue],
        on_last_close: Callable[[SharedQueue], None],
        operation_timeout: float = 30.0,
    ) -> None:
        self.key = key
        #: The transport's: how long a sliced poll rides out a failing backend.
        self.operation_timeout = operation_timeout
        self._open_queue = open_queue
        self._on_last_close = on_last_close
        # Weakly, in the order they came: a handle dropped without aclose()
        # (a handle per poll) is forgotten, not kept until the transport closes.
        self.handles: weakref.WeakKeyDictionary[SharedQueueHandle, None] = (
            weakref.WeakKeyDictionary()
        )
        self.polling: weakref.WeakKeyDictionary[SharedQueueHandle, None] = (
            weakref.WeakKeyDictionary()
        )
        #: Set when the transport starts closing: no consumer is opened any more.
        self.closing = False
        self.request_codec: RequestCodec | None = None
        self.consumer: RequestQueue | None = None
        self.producer: RequestQueue = self._open()

    def _open(self) -> RequestQueue:
        queue = self._open_queue()
        queue.set_exhausted_hook(self._report)
        queue.request_codec = self.request_codec
        return queue

    def _report(self, request: WorkRequest, reason: str) -> None:
        # Once, as a queue of its own reported it: to the first polling
        # handle with a hook (an Ensemble's), else to the first handle with one.
        for group in (self.polling, self.handles):
            for handle in list(group):
                if handle._exhausted_hook is not None:
                    handle._report_exhausted(request, reason)
                    return

    def handle(self) -> SharedQueueHandle:
        handle = SharedQueueHandle(self)
        self.handles[handle] = None
        return handle

    def consumer_for(self, handle: SharedQueueHandle) -> RequestQueue:
        if self.closing:
            raise ClosedResourceError(f"queue {handle.name!r} is closed")
        if self.consumer is None:
            self.consumer = self._open()
        self.polling[handle] = None
        return self.consumer

    async def release(self, handle: SharedQueueHandle) -> None:
        """``handle`` is closing: close what no open handle uses any more."""
        self.handles.pop(handle, None)
        if handle in self.polling:
            del self.polling[handle]
            consumer = self.consumer
            if consumer is not None:
                if not self.polling:
                    self.consumer = None
                    await consumer.aclose()  # gives back what it held or prefetched
                else:
                    await handle._give_back()
        if not self.handles:
            self._on_last_close(self)
            await self.producer.aclose()

    async def end_polls(self) -> None:
        """The transport is closing: polls of its handles still waiting on
        the consumer end now (ClosedResourceError), before the consumer
        and the connection close under them (a backend read cut by the
        connection closing may retry on a new connection)."""
        waiting = [task for handle in list(self.handles) for task in handle._waiting]
        for task in waiting:
            task.cancel()
        if waiting:
            await asyncio.gather(*waiting, return_exceptions=True)

    def backend_handles(self) -> list[RequestQueue]:
        return [q for q in (self.consumer, self.producer) if q is not None]


async def _release_uncounted(deliveries: list[Delivery]) -> None:
    """Give back deliveries a poll got and will not hand out (shielded: a
    cancellation of the caller meanwhile does not stop it, and is raised
    once it is done; one that fails runs out its lease)."""
    if deliveries:
        releases = asyncio.gather(
            *(d._release_uncounted() for d in deliveries), return_exceptions=True
        )
        try:
            await asyncio.shield(releases)
        except asyncio.CancelledError:
            await asyncio.wait({releases})
            raise


def _as_list(got: Any) -> list[Delivery]:
    """What a ``poll`` (a delivery or None) or ``poll_many`` (a list) returned."""
    return got if isinstance(got, list) else [got] if got is not None else []


class SharedQueueHandle(RequestQueue):
    """A :class:`RequestQueue` over the backend handles its transport shares
    for this queue (see the module docstring). Attributes it does not have
    are the consumer's (the producer's until a handle polled)."""

    def __init__(self, shared: SharedQueue) -> None:
        self._shared = shared
        producer = shared.producer
        self.name = producer.name
        self.lease_seconds = producer.lease_seconds
        self.max_attempts = producer.max_attempts
        self.max_payload_bytes = producer.max_payload_bytes
        self._handed: weakref.WeakSet[Delivery] = weakref.WeakSet()
        # Polls of this handle waiting on the consumer unsliced (see
        # _sliced): its aclose() cancels them, and they raise
        # ClosedResourceError.
        self._waiting: set[asyncio.Future[Any]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return repr(self._shared.producer)

    def __getattr__(self, name: str) -> Any:
        # Only for what this class does not define (internals of the queue).
        shared = self.__dict__.get("_shared")
        if shared is None:
            raise AttributeError(name)
        return getattr(shared.consumer or shared.producer, name)

    @property
    def request_codec(self) -> RequestCodec | None:
        return self._shared.request_codec

    @request_codec.setter
    def request_codec(self, codec: RequestCodec | None) -> None:
        shared = self._shared
        shared.request_codec = codec
        for queue in shared.backend_handles():
            queue.request_codec = codec

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"queue {self.name!r} is closed")
        self._shared.producer._check_open()

    # -- RequestQueue ------------------------------------------------------------
    async def enqueue(self, request: WorkRequest) -> WorkRequest:
        self._check_open()
        return await self._shared.producer.enqueue(request)

    async def enqueue_many(self, requests: Iterable[WorkRequest]) -> list[WorkRequest]:
        self._check_open()
        return await self._shared.producer.enqueue_many(requests)

    async def poll(self, timeout: float | None = None) -> Delivery | None:
        got = await self._sliced(lambda q, t: q.poll(t), timeout)
        if got is not None:
            self._handed.add(got)
        return got  # type: ignore[no-any-return]

    async def poll_many(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        got: list[Delivery] = await self._sliced(lambda q, t: q.poll_many(max_count, t), timeout)
        for delivery in got:
            self._handed.add(delivery)
        return got

    async def _sliced(
        self, poll: Callable[[RequestQueue, float], Any], timeout: float | None
    ) -> Any:
        self._check_open()
        timeout = _seconds(timeout)  # a negative timeout is refused, as for nack/extend
        consumer = self._shared.consumer_for(self)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        shared = self._shared
        failing_since: float | None = None
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            if len(shared.polling) > 1:
                # Others poll too: closing this handle must end this poll
                # without closing the consumer, so wait in slices.
                wait = _SLICE_SECONDS if remaining is None else min(remaining, _SLICE_SECONDS)
            else:
                # The only poller: its close closes the consumer, which ends
                # the poll; the backend's own retries keep the whole timeout.
                wait = remaining  # type: ignore[assignment]
            try:
                got = await self._poll_once(poll, consumer, wait)
            except TransientTransportError:
                # A slice that ended in an outage: the caller's poll raises
                # when its own time is up or the outage has lasted the
                # operation timeout, as the backend's poll of the whole
                # timeout would, not at the end of a one-second slice.
                now = loop.time()
                failing_since = now if failing_since is None else failing_since
                if (
                    wait == remaining
                    or (deadline is not None and now >= deadline)
                    or now - failing_since >= shared.operation_timeout
                ):
                    raise
                pause = 0.2 if deadline is None else min(0.2, max(0.0, deadline - now))
                await asyncio.sleep(pause)
                continue
            failing_since = None
            if self._closed:
                # Closed while this poll waited: what it got was never handed
                # to the caller, so it goes back uncounted.
                await _release_uncounted(_as_list(got))
                raise ClosedResourceError(f"queue {self.name!r} is closed")
            if got or (deadline is not None and loop.time() >= deadline):
                return got

    async def _poll_once(
        self,
        poll: Callable[[RequestQueue, float], Any],
        consumer: RequestQueue,
        wait: float | None,
    ) -> Any:
        """One poll of the consumer. A wait longer than a slice (a lone
        poller's) runs as a task that this handle's close cancels: the
        consumer stays open if another handle began polling meanwhile, and
        nothing else would end it. A poll ended by this handle's close, or
        by the consumer closing under it as the transport closes, raises
        ClosedResourceError, not the ``CancelledError`` of a task nobody
        cancelled."""
        task: asyncio.Future[Any] | None = None
        current = asyncio.current_task()
        # Cancellations of the caller's task before this poll (caught and
        # not uncancelled) do not make a close look like a cancellation.
        cancelled_before = 0 if current is None else current.cancelling()
        try:
            if wait is not None and wait <= _SLICE_SECONDS:
                return await poll(consumer, wait)
            task = asyncio.ensure_future(poll(consumer, wait))  # type: ignore[arg-type]
            self._waiting.add(task)
            try:
                return await task
            finally:
                self._waiting.discard(task)
        except asyncio.CancelledError:
            if task is not None and task.done() and not task.cancelled():
                # The poll got its result as the caller was cancelled: never
                # handed out, so it goes back uncounted (as the backend's own
                # poll does when cancelled), before the caller can go on to
                # close the consumer (which would count it).
                got = None if task.exception() is not None else task.result()
                await _release_uncounted(_as_list(got))
            caller_cancelled = current is not None and current.cancelling() > cancelled_before
            if (self._closed or self._shared.closing) and not caller_cancelled:
                raise ClosedResourceError(f"queue {self.name!r} is closed") from None
            raise

    async def ack_many(self, deliveries: Iterable[Delivery]) -> list[bool]:
        consumer = self._shared.consumer
        if consumer is None:  # nothing of this queue to settle: each by its own ack
            return await super().ack_many(deliveries)
        return await consumer.ack_many(deliveries)

    async def caught_up(self, timeout: float | None = None) -> bool:
        self._check_open()
        return await self._shared.consumer_for(self).caught_up(timeout)

    async def stats(self) -> QueueStats:
        self._check_open()
        shared = self._shared
        return await (shared.consumer or shared.producer).stats()

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        self._check_open()
        return await self._shared.producer.dead_letters(limit)

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        self._check_open()
        return await self._shared.producer.requeue_dead_letters(request_ids)

    async def replace_dead_letter(self, dead_letter_id: str, request: WorkRequest) -> bool:
        self._check_open()
        return await self._shared.producer.replace_dead_letter(dead_letter_id, request)

    async def _give_back(self) -> None:
        handed = list(self._handed)
        self._handed = weakref.WeakSet()
        # An already settled delivery's nack is a no-op (False).
        await asyncio.gather(*(self._give_back_one(d) for d in handed), return_exceptions=True)

    async def _give_back_one(self, delivery: Delivery) -> None:
        if delivery.attempt < self.max_attempts:
            await delivery.nack()
            return
        # Its last attempt: the nack dead-letters it. A queue of its own
        # would have found it at the next hand-out and reported it (an
        # Ensemble then answers its caller); so it is reported here.
        reason = f"not acknowledged after {delivery.attempt} deliveries (its handle was closed)"
        if await delivery.nack(error=reason):
            self._shared._report(delivery.request, reason)

    async def aclose(self) -> None:
        """Close this handle. The consumer closes with the last handle that
        polled (it gives back what it held or prefetched); otherwise the
        deliveries this handle handed out and did not settle are nacked now
        (each counted, as for a lease that ran out). The producer closes
        with the last handle."""
        if self._closed:
            return
        self._closed = True
        waiting = list(self._waiting)
        for task in waiting:
            task.cancel()
        if waiting:
            # Their backend polls end (cancellation-safe) before the consumer
            # may close under them.
            await asyncio.gather(*waiting, return_exceptions=True)
        await self._shared.release(self)
