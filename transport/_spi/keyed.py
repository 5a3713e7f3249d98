"""A keyed log: the one storage primitive the registries are built on.

Every backend has one natively — a Kafka compacted topic, a JetStream KV
bucket, a Pulsar topic read with a reader/TableView, an SQLite table with a
change log — so backends implement this small interface and get the
:class:`~transport.DeliveryRegistry` and :class:`~transport.CapabilityRegistry`
semantics from one shared implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

__all__ = ["CAUGHT_UP", "KeyedChange", "KeyedLog"]


@dataclass(frozen=True, slots=True)
class KeyedChange:
    """A write to a key; ``value`` None is a delete (tombstone)."""

    key: str
    value: bytes | None


class _CaughtUp:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CAUGHT_UP"


#: Yielded once by :meth:`KeyedLog.watch` after the state that existed when
#: the watch started has been replayed.
CAUGHT_UP = _CaughtUp()


class KeyedLog(ABC):
    """Last-writer-wins map replicated through a log.

    Keys are ``[A-Za-z0-9_.-]`` strings (callers validate); values are bytes.
    """

    @abstractmethod
    async def put(self, key: str, value: bytes) -> None:
        """Write ``value`` under ``key``.

        Guarantees: durable on return (as durable as the backend's queues).
        Raises: TransientTransportError, PermanentTransportError.
        """

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Tombstone ``key``. Deleting a missing key is not an error.

        Raises: TransientTransportError.
        """

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The latest value of ``key`` (a read of committed state).

        Raises: TransientTransportError.
        """

    @abstractmethod
    def watch(self) -> AsyncIterator[KeyedChange | object]:
        """Replay the current state (or the whole history, in write order),
        then yield :data:`CAUGHT_UP` once, then every later change, in write
        order per key, until the iterator is closed.

        Guarantees: a change written after the watch started is yielded.
        Raises: TransientTransportError while iterating.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Release resources; what was written stays in the backend.
        Idempotent. Does not raise for an unreachable backend."""
