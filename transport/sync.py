"""A blocking facade for code that is not async: the same names, no ``await``.

The event loop runs on a private daemon thread; every call is handed to it
and waited for. Safe to use from several threads at once::

    from transport import WorkRequest, sync

    with sync.connect("sqlite:///app.db") as transport:
        queue = transport.request_queue("kitchen")
        queue.enqueue(WorkRequest(task="cook", payload={"dish": "soup"}))
        delivery = queue.poll(timeout=5)
        if delivery:
            ...
            delivery.ack()
        # with an ensemble "kitchen" serving (in another process):
        response = transport.request("kitchen", "cook", {"dish": "soup"}, caller="script", timeout=30)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import warnings
from collections.abc import Coroutine, Iterable
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

from transport._runtime.network import Network
from transport._spi.config import TransportConfig
from transport._spi.connect import connect as _aconnect
from transport._spi.models import DeadLetter, HealthStatus, QueueStats, WorkRequest, WorkResponse
from transport._spi.priority import PriorityRequestQueue
from transport._spi.queue import Delivery, RequestQueue
from transport._spi.registries import DeliveryRegistry
from transport._spi.transport import Transport
from transport.errors import ClosedResourceError

__all__ = [
    "SyncDelivery",
    "SyncDeliveryRegistry",
    "SyncRequestQueue",
    "SyncTransport",
    "connect",
]

T = TypeVar("T")


_warned_running_loop = False


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="transport-sync", daemon=True
        )
        self._thread.start()
        self.stopped = False

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        global _warned_running_loop
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking transport call from inside its own event loop")
        if self.stopped:
            coro.close()
            raise ClosedResourceError("this sync transport is closed")
        if not _warned_running_loop and _in_running_loop():
            _warned_running_loop = True
            warnings.warn(
                "transport.sync called from a running event loop blocks that loop until the "
                "call returns (its tasks do not run meanwhile); use the async API there",
                RuntimeWarning,
                stacklevel=3,
            )
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            # Interrupted (Ctrl-C, a signal handler raising) or timed out: the
            # call must not go on behind the caller's back (a poll would take
            # a request nobody receives, left to its lease and counted).
            # Cancelled calls are cancellation-safe.
            if not future.done():
                future.cancel()
                with contextlib.suppress(BaseException):
                    future.result(5)
            raise

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class SyncDelivery:
    """Blocking :class:`~transport.Delivery`."""

    def __init__(self, inner: Delivery, runner: _LoopThread) -> None:
        self._inner = inner
        self._run = runner.run
        self.request = inner.request

    @property
    def attempt(self) -> int:
        return self._inner.attempt

    def ack(self) -> bool:
        return self._run(self._inner.ack())

    def nack(self, delay: float | timedelta | None = None, *, error: str | None = None) -> bool:
        return self._run(self._inner.nack(delay, error=error))

    def extend(self, seconds: float | timedelta | None = None) -> bool:
        return self._run(self._inner.extend(seconds))

    def dead_letter(self, error: str) -> bool:
        return self._run(self._inner.dead_letter(error))


class SyncRequestQueue:
    """Blocking :class:`~transport.RequestQueue` (or priority queue)."""

    def __init__(self, inner: RequestQueue, runner: _LoopThread) -> None:
        self._inner = inner
        self._runner = runner
        self.name = inner.name

    def enqueue(self, request: WorkRequest, priority: int | None = None) -> WorkRequest:
        if isinstance(self._inner, PriorityRequestQueue):
            return self._runner.run(self._inner.enqueue(request, priority))
        if priority is not None:
            raise ValueError("priority given for a queue without priority levels")
        return self._runner.run(self._inner.enqueue(request))

    def enqueue_many(self, requests: Iterable[WorkRequest]) -> list[WorkRequest]:
        return self._runner.run(self._inner.enqueue_many(list(requests)))

    def poll(self, timeout: float | None = None) -> SyncDelivery | None:
        delivery = self._runner.run(self._inner.poll(timeout))
        return None if delivery is None else SyncDelivery(delivery, self._runner)

    def stats(self) -> QueueStats:
        return self._runner.run(self._inner.stats())

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self._runner.run(self._inner.dead_letters(limit))

    def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        return self._runner.run(self._inner.requeue_dead_letters(request_ids))

    def close(self) -> None:
        self._runner.run(self._inner.aclose())


class SyncDeliveryRegistry:
    """Blocking :class:`~transport.DeliveryRegistry`."""

    def __init__(self, inner: DeliveryRegistry, runner: _LoopThread) -> None:
        self._inner = inner
        self._run = runner.run

    def register(self, request_id: str) -> str:
        self._run(self._inner.register(request_id))
        return request_id

    def complete(self, request_id: str, response: WorkResponse) -> bool:
        return self._run(self._inner.complete(request_id, response))

    def result(self, request_id: str, timeout: float | None = None) -> WorkResponse:
        async def take() -> WorkResponse:
            return await (await self._inner.wait(request_id)).result(timeout)

        return self._run(take())

    def pending(self) -> list[str]:
        async def ids() -> list[str]:
            return [p.request_id for p in await self._inner.pending()]

        return self._run(ids())


class SyncTransport:
    """Blocking :class:`~transport.Transport`; close it (or use ``with``)."""

    def __init__(self, inner: Transport, runner: _LoopThread) -> None:
        self._inner = inner
        self._runner = runner
        self._networks: dict[str, Network] = {}
        self.capabilities = inner.capabilities
        self.config = inner.config

    def request_queue(self, name: str, **kw: Any) -> SyncRequestQueue:
        return SyncRequestQueue(self._inner.request_queue(name, **kw), self._runner)

    def priority_queue(self, name: str, levels: int = 3, **kw: Any) -> SyncRequestQueue:
        return SyncRequestQueue(self._inner.priority_queue(name, levels, **kw), self._runner)

    def delivery_registry(self, name: str) -> SyncDeliveryRegistry:
        return SyncDeliveryRegistry(self._inner.delivery_registry(name), self._runner)

    def request(
        self,
        target: str | None,
        task: str,
        payload: Any = None,
        *,
        caller: str,
        timeout: float | None = None,
        **kw: Any,
    ) -> WorkResponse:
        """Send a request to an ensemble and block until its response."""
        network = self._networks.get(caller)
        if network is None:
            network = self._networks[caller] = Network(self._inner, caller=caller)
        return self._runner.run(network.request(target, task, payload, timeout=timeout, **kw))

    def health(self) -> HealthStatus:
        return self._runner.run(self._inner.health())

    def close(self) -> None:
        """Close the transport and its event-loop thread. Idempotent."""
        if self._runner.stopped:
            return
        try:
            self._runner.run(self._inner.aclose(), timeout=30)
        finally:
            self._runner.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect(url_or_config: str | TransportConfig | None = None, **overrides: Any) -> SyncTransport:
    """Blocking :func:`transport.connect`."""
    runner = _LoopThread()
    try:
        inner = runner.run(_aconnect(url_or_config, **overrides))
    except BaseException:
        runner.stop()
        raise
    return SyncTransport(inner, runner)
