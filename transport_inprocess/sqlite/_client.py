"""What the parts of one ``sqlite://`` transport share: the store (the
thread that owns the database connection), in-process wake-ups, the feeds of
this process's keyed-log watchers, and the namespace's stored names.

Queues, keyed logs and the event log are given a :class:`SqliteContext`,
never the transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from transport.kit import SqliteStore

__all__ = ["SqliteContext"]


class SqliteContext:
    """The shared pieces of one transport. ``check_open`` raises
    :class:`~transport.errors.ClosedResourceError` once the transport is
    closed; ``store_closed`` turns true when its store is being closed."""

    __slots__ = (
        "check_open",
        "log_watchers",
        "max_payload_bytes",
        "poll_interval",
        "prefix",
        "signals",
        "store",
        "store_closed",
    )

    def __init__(
        self,
        store: SqliteStore,
        *,
        namespace: str,
        poll_interval: float,
        max_payload_bytes: int,
        check_open: Callable[[], None],
    ) -> None:
        self.store = store
        self.signals = _Signals()
        self.log_watchers: dict[str, _LogWatchers] = {}
        # Every queue, dead letter, keyed log and event stream is stored under
        # ``<namespace>/<name>`` (``/`` cannot occur in a name), so clients of
        # one file with different namespaces share nothing.
        self.prefix = f"{namespace}/"
        self.poll_interval = poll_interval
        self.max_payload_bytes = max_payload_bytes
        self.check_open = check_open
        self.store_closed = False

    def scoped(self, name: str) -> str:
        """The stored name of queue, log or stream ``name`` in this namespace."""
        return self.prefix + name


class _Signals:
    """In-process wake-ups: a write by this transport wakes its own waiters
    at once; other processes' writes are noticed by polling."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[bool]]] = {}

    async def wait(self, name: str, timeout: float) -> bool:
        """Wait for a notification of ``name``: True if one came, False on timeout.

        The future is awaited directly, not through ``asyncio.wait_for``: on
        Python 3.11 ``wait_for`` returns the result instead of raising when a
        cancellation and a notification arrive in the same loop iteration, so
        a watch loop would lose the cancellation of ``asyncio.run``'s shutdown
        and keep the interpreter from exiting.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        waiters = self._waiters.setdefault(name, set())
        waiters.add(future)
        timer = loop.call_later(timeout, _settle, future, False)
        try:
            return await future
        finally:
            timer.cancel()
            waiters.discard(future)

    def notify(self, name: str) -> None:
        waiters = self._waiters.get(name)
        if waiters:
            for future in waiters:
                _settle(future, True)


def _settle(future: asyncio.Future[bool], notified: bool) -> None:
    if not future.done():
        future.set_result(notified)


class _Feed:
    """Changes of one keyed log read inside the transaction of this
    process's latest write to it, for this process's watchers: every change
    of the log with ``after < seq <= upto`` (complete, because the writing
    transaction held the file's write lock), so a watcher positioned at or
    after ``after`` needs no read of its own."""

    __slots__ = ("after", "rows", "upto", "writes")

    def __init__(self, after: int, upto: int, rows: list[tuple[int, str, bytes | None]]) -> None:
        self.after = after
        self.upto = upto
        self.rows = rows
        self.writes = 0  # the log's write count when published


class _LogWatchers:
    """This transport's watchers of one keyed log: their positions, and the
    latest feed."""

    __slots__ = ("feed", "positions", "writes")

    def __init__(self) -> None:
        self.positions: dict[object, int] = {}
        self.feed: _Feed | None = None
        self.writes = 0  # committed writes to the log by this transport
