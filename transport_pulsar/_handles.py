"""Queue handles of one transport share one consumer per queue.

On Pulsar a consumer holds the messages it prefetched until it acks them or
closes: a program that opened a handle per poll (``transport.request_queue(
"orders").poll(5)`` in a loop) left each message but the first with a
consumer nobody polled, for a whole lease. So :meth:`PulsarTransport.
request_queue` hands out light handles over one shared queue (its consumer,
producer and hand-out counts) per name and settings; the queue closes with
the last of its handles, or with the transport.

A handle's own state is its open flag and its exhausted-request hook; the
deliveries it handed out are marked with it (``PulsarDelivery._owner``):
closing a handle while others stay open gives back those it had not settled,
as a lease that ran out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from transport import Delivery, QueueStats, RequestQueue, WorkRequest
from transport.errors import ClosedResourceError
from transport.kit import seconds as _seconds

if TYPE_CHECKING:
    from transport._spi.codec import RequestCodec
    from transport._spi.models import DeadLetter
    from transport_pulsar._queue import PulsarDelivery, PulsarRequestQueue

__all__ = ["PulsarQueueHandle", "SharedQueue"]

#: A poll of a handle waits in slices this long, so that closing the handle
#: (while others keep the shared queue open) ends its poll within one slice.
_SLICE_SECONDS = 1.0


class SharedQueue:
    """One :class:`PulsarRequestQueue` and the open handles on it."""

    __slots__ = ("core", "handles", "on_last_close")

    def __init__(
        self, core: PulsarRequestQueue, on_last_close: Callable[[SharedQueue], None]
    ) -> None:
        self.core = core
        self.handles: set[PulsarQueueHandle] = set()
        self.on_last_close = on_last_close
        core.set_exhausted_hook(self._report)

    def _report(self, request: WorkRequest, reason: str) -> None:
        # The shared queue reports to the hook of every open handle.
        for handle in list(self.handles):
            handle._report_exhausted(request, reason)

    def handle(self) -> PulsarQueueHandle:
        handle = PulsarQueueHandle(self)
        self.handles.add(handle)
        return handle


class PulsarQueueHandle(RequestQueue):
    """A :class:`~transport.RequestQueue` over a queue shared by the handles
    of one transport (see the module docstring). Attributes it does not
    have are the shared queue's."""

    def __init__(self, shared: SharedQueue) -> None:
        self._shared = shared
        self._core = shared.core
        self.name = self._core.name
        self.lease_seconds = self._core.lease_seconds
        self.max_attempts = self._core.max_attempts
        self.max_payload_bytes = self._core.max_payload_bytes
        self._closed = False

    def __repr__(self) -> str:
        return repr(self._core)

    def __getattr__(self, name: str) -> Any:
        # Only for what this class does not define (internals of the queue).
        return getattr(self.__dict__["_core"], name)

    @property
    def request_codec(self) -> RequestCodec | None:
        return self._core.request_codec

    @request_codec.setter
    def request_codec(self, codec: RequestCodec | None) -> None:
        self._core.request_codec = codec

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"queue {self.name!r} is closed")
        self._core._check_open()

    # -- RequestQueue ------------------------------------------------------------
    async def enqueue(self, request: WorkRequest) -> WorkRequest:
        self._check_open()
        return await self._core.enqueue(request)

    async def enqueue_many(self, requests: Iterable[WorkRequest]) -> list[WorkRequest]:
        self._check_open()
        return await self._core.enqueue_many(requests)

    async def poll(self, timeout: float | None = None) -> PulsarDelivery | None:
        got = await self._sliced(lambda t: self._core.poll(t), timeout)
        if got is None:
            return None
        return self._own(got)  # type: ignore[return-value]

    async def poll_many(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        got = await self._sliced(lambda t: self._core.poll_many(max_count, t), timeout)
        return [self._own(d) for d in got or []]

    async def _sliced(self, poll: Callable[[float], Any], timeout: float | None) -> Any:
        self._check_open()
        timeout = _seconds(timeout)  # a negative timeout is refused, as for nack/extend
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = _SLICE_SECONDS if deadline is None else deadline - loop.time()
            got = await poll(max(0.0, min(remaining, _SLICE_SECONDS)))
            if self._closed:
                # Closed while this poll waited: what it got was never handed
                # to the caller, so it goes back uncounted.
                for delivery in got if isinstance(got, list) else [got] if got else []:
                    with contextlib.suppress(Exception):
                        await delivery._release_uncounted()
                raise ClosedResourceError(f"queue {self.name!r} is closed")
            if got or (deadline is not None and loop.time() >= deadline):
                return got

    def _own(self, delivery: Delivery) -> Delivery:
        delivery._owner = self  # type: ignore[attr-defined]
        return delivery

    async def ack_many(self, deliveries: Iterable[Delivery]) -> list[bool]:
        return await self._core.ack_many(deliveries)

    async def caught_up(self, timeout: float | None = None) -> bool:
        self._check_open()
        return await self._core.caught_up(timeout)

    async def stats(self) -> QueueStats:
        self._check_open()
        return await self._core.stats()

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        self._check_open()
        return await self._core.dead_letters(limit)

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        self._check_open()
        return await self._core.requeue_dead_letters(request_ids)

    async def replace_dead_letter(self, dead_letter_id: str, request: WorkRequest) -> bool:
        self._check_open()
        return await self._core.replace_dead_letter(dead_letter_id, request)

    async def aclose(self) -> None:
        """Close this handle: the shared queue closes with its last handle
        (its consumer gives every unsettled message back); otherwise the
        deliveries this handle handed out and did not settle are given back
        now, as if their leases had run out."""
        if self._closed:
            return
        self._closed = True
        shared = self._shared
        shared.handles.discard(self)
        if not shared.handles:
            shared.on_last_close(shared)
            await self._core.aclose()
            return
        self._core._give_up_owned_by(self)
