"""Settling what a program leaves open when it ends without ``aclose()``."""

from __future__ import annotations

import atexit
import contextlib
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["AtExit"]

T = TypeVar("T")


class AtExit(Generic[T]):
    """Objects to settle at interpreter exit, within ``seconds`` for all.

    A backend adds an object when it starts holding something a clean
    ``aclose()`` would give back (counts reserved ahead, a group membership)
    and discards it when it closes. At exit, ``settle(obj, deadline)`` runs
    for each object still here (``deadline`` on :func:`time.monotonic`),
    then ``then()``; their exceptions are suppressed, since nothing can be
    raised to a program that has already returned. Strong references: such
    a program has dropped its own.
    """

    def __init__(
        self,
        seconds: float,
        settle: Callable[[T, float], None],
        then: Callable[[], None] | None = None,
    ) -> None:
        self.seconds = seconds
        self._settle = settle
        self._then = then
        self._items: set[T] = set()
        atexit.register(self.run)

    def add(self, item: T) -> None:
        self._items.add(item)

    def discard(self, item: T) -> None:
        self._items.discard(item)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)

    def run(self) -> None:
        """Settle every object still here (what the exit hook does)."""
        deadline = time.monotonic() + self.seconds
        for item in list(self._items):
            with contextlib.suppress(Exception):
                self._settle(item, deadline)
        if self._then is not None:
            with contextlib.suppress(Exception):
                self._then()
