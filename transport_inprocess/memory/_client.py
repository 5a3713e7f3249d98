"""The in-process broker of ``memory://``: one per (URL name, namespace) in a
process, holding every queue's messages, every keyed log's values, the event
bus's subscribers and the event log's streams, behind one lock. Queues,
keyed logs and the event bus and log are given their broker (or its part),
never the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transport import DeadLetter, KeyedChange, LogEvent
from transport.kit import EventInbox

__all__ = ["reset_memory"]


@dataclass(slots=True, eq=False)
class _Msg:
    data: bytes
    request_id: str | None
    attempts: int = 0
    last_error: str | None = None
    # Identity of a foreign message (a body may carry no request id).
    ident: int = 0


@dataclass(slots=True, eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    popped: bool = False  # taken off the waiters deque by _notify_one
    closed: bool = False  # woken because its handle closed (no work came)


@dataclass
class _QueueState:
    ready: deque[_Msg] = field(default_factory=deque)
    delayed: list[tuple[float, int, _Msg]] = field(default_factory=list)
    inflight: dict[int, tuple[_Msg, float]] = field(default_factory=dict)
    leases: list[tuple[float, int]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    waiters: deque[_Waiter] = field(default_factory=deque)


class _Broker:
    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.queues: dict[str, _QueueState] = {}
        self.logs: dict[str, _LogState] = {}
        self.bus = BusState()
        self.events = LogState()

    def queue(self, name: str) -> _QueueState:
        state = self.queues.get(name)
        if state is None:
            state = self.queues[name] = _QueueState()
        return state


# One broker per (URL name, namespace): clients of one ``memory://name`` with
# different ``TransportConfig.namespace`` share nothing.
_BROKERS: dict[tuple[str, str], _Broker] = {}
_BROKERS_LOCK = threading.Lock()


def _broker(name: str, namespace: str) -> _Broker:
    with _BROKERS_LOCK:
        broker = _BROKERS.get((name, namespace))
        if broker is None:
            broker = _BROKERS[(name, namespace)] = _Broker(name)
        return broker


def reset_memory(name: str | None = None) -> None:
    """Forget the state of broker ``name``, every namespace of it (all
    brokers if ``None``)."""
    with _BROKERS_LOCK:
        if name is None:
            _BROKERS.clear()
        else:
            for key in [key for key in _BROKERS if key[0] == name]:
                del _BROKERS[key]


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """``loop.call_soon_threadsafe(fn, *args)``, without its self-pipe write
    (a syscall and an extra loop iteration) when ``loop`` runs this thread.

    Raises: RuntimeError if ``loop`` is closed.
    """
    if asyncio._get_running_loop() is loop:
        loop.call_soon(fn, *args)
    else:
        loop.call_soon_threadsafe(fn, *args)


def _set_none(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _wake(waiter: _Waiter) -> None:
    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
        _call_soon(waiter.loop, _set_none, waiter.future)


def _notify_one(state: _QueueState) -> None:
    # Caller holds the broker lock.
    while state.waiters:
        waiter = state.waiters.popleft()
        waiter.popped = True
        if not waiter.future.done():
            _wake(waiter)
            return


@dataclass
class _LogState:
    data: dict[str, bytes] = field(default_factory=dict)
    watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[KeyedChange]]] = field(
        default_factory=list
    )


class _Inbox:
    """A thread-safe hand-off into one subscriber's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue = EventInbox("a memory:// subscription")

    def put(self, item: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            return False
        return True


@dataclass(eq=False)
class _Sub:
    pattern: str
    group: str | None
    inbox: _Inbox


@dataclass
class BusState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    subs: list[_Sub] = field(default_factory=list)
    turn: itertools.count[int] = field(default_factory=itertools.count)


@dataclass
class LogState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    streams: dict[str, list[LogEvent]] = field(default_factory=dict)
    cursors: dict[tuple[str, str], int] = field(default_factory=dict)
    waiters: dict[str, list[_Inbox]] = field(default_factory=dict)
