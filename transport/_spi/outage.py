"""Logging a retry loop's outage: once when it starts, a reminder while it
lasts, once when it is over (:class:`OutageLog`)."""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["OUTAGE_LOG_INTERVAL", "OutageLog"]

#: Seconds between two "still failing" warnings of one outage (:class:`OutageLog`).
OUTAGE_LOG_INTERVAL = 30.0


class OutageLog:
    """How a loop that retries through an outage logs it: a warning at the
    first failure, a reminder every ``interval`` seconds while failures go
    on (how long, how many), every other failure at DEBUG, and one line
    when it works again (:meth:`recovered`). A worker that logged each
    failed poll wrote 45 warnings in a 10 s broker outage (four workers,
    the queue's own retries), one every 0.2 s for as long as it lasted.

    ``what`` names the loop in its lines ("ensemble kitchen: poll");
    ``fields`` are structured-log fields of every line (a call may add
    more). Event loop or one thread; no lock.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        fields: dict[str, Any] | None = None,
        interval: float = OUTAGE_LOG_INTERVAL,
        clock: Any = time.monotonic,
    ) -> None:
        self._log = logger
        self.what = what
        self._fields = fields or {}
        self.interval = interval
        self._clock = clock
        self._since: float | None = None
        self._logged = 0.0
        #: Failures since the outage began (0 when there is none).
        self.failures = 0

    @property
    def failing_for(self) -> float | None:
        """Seconds since the first failure of the current outage; ``None``
        when the last attempt worked."""
        return None if self._since is None else self._clock() - self._since

    def failed(self, exc: BaseException, then: str = "retrying", **extra: Any) -> None:
        """Log one failure; ``then`` says what the loop does next."""
        now = self._clock()
        self.failures += 1
        fields = {**self._fields, **extra} or None
        if self._since is None:
            self._since = self._logged = now
            self._log.warning("%s failed (%s); %s", self.what, exc, then, extra=fields)
        elif now - self._logged >= self.interval:
            self._logged = now
            self._log.warning(
                "%s still failing after %.0f s and %d tries (%s); %s",
                self.what,
                now - self._since,
                self.failures,
                exc,
                then,
                extra=fields,
            )
        else:
            self._log.debug("%s failed (%s); %s", self.what, exc, then, extra=fields)

    def recovered(self, **extra: Any) -> None:
        """The loop's operation worked: ends the outage (one line if any)."""
        if self._since is None:
            return
        took, tries = self._clock() - self._since, self.failures
        self._since = None
        self.failures = 0
        self._log.warning(
            "%s works again after %.1f s (%d failed tries)",
            self.what,
            took,
            tries,
            extra={**self._fields, **extra} or None,
        )
