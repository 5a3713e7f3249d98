"""A keyed log: the one storage primitive the registries are built on.

Every backend has one natively — a Kafka compacted topic, a JetStream KV
bucket, a Pulsar topic read with a reader/TableView, an SQLite table with a
change log — so backends implement this small interface and get the
:class:`~transport.DeliveryRegistry` and :class:`~transport.CapabilityRegistry`
semantics from one shared implementation.
"""

from __future__ import annotations

import asyncio
import base64
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_json

__all__ = ["CAUGHT_UP", "KeyedChange", "KeyedLog", "encode_checkpoint", "read_checkpoint"]


@dataclass(frozen=True, slots=True)
class KeyedChange:
    """A write to a key; ``value`` None is a delete (tombstone).

    ``position`` is where the change sits in the log, as an opaque token the
    same log's :meth:`KeyedLog.watch_from` (and :meth:`KeyedLog.forget`)
    accept; ``None`` where the log has no use for one.
    """

    key: str
    value: bytes | None
    position: bytes | None = None


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

    Two optional abilities bound what a reader replays:

    - ``resumable`` logs (a log that keeps its history, as a Kafka or Pulsar
      topic does until it is compacted, if ever) accept
      :meth:`watch_from` a position and store one checkpoint
      (:meth:`save_checkpoint` / :meth:`load_checkpoint`): the shared
      readers write the live state's oldest records and a resume position
      into it, and a new reader starts there instead of at the beginning.
    - logs whose deletes leave a marker forever (JetStream KV) implement
      :meth:`forget`, which the readers call for tombstones they have seen.
    """

    #: True when :meth:`watch_from` and the checkpoint methods work.
    resumable: bool = False

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

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The latest values of ``keys``, in order, each as :meth:`get`
        returns it. This default reads them concurrently; a backend that
        reads several in one step overrides it.

        Raises: TransientTransportError.
        """
        if len(keys) == 1:
            return [await self.get(keys[0])]
        return list(await asyncio.gather(*(self.get(key) for key in keys)))

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Tombstone each of ``keys``, as :meth:`delete` does; durable on
        return. This default deletes them concurrently; a backend that
        writes several in one step overrides it.

        Raises: TransientTransportError (some may have been deleted).
        """
        if len(keys) == 1:
            await self.delete(keys[0])
        else:
            await asyncio.gather(*(self.delete(key) for key in keys))

    #: True where :meth:`claim` is atomic: of processes claiming one key at
    #: once, exactly one gets ``True``.
    atomic_claims: bool = False

    async def claim(
        self, key: str, also: Sequence[str] = (), *, position: bytes | None = None
    ) -> bool:
        """Delete ``key`` if it holds a value, and the keys ``also`` (in the
        same step where the log can); whether this call deleted ``key``.
        ``position``, where known, is the :attr:`KeyedChange.position` of the
        value the caller saw: a hint that spares a read where the log deletes
        conditionally on it (a stale one costs that read).

        Where :attr:`atomic_claims` is true, concurrent claims of one value
        (by any processes) return ``True`` once. This default deletes them
        all, as :meth:`delete_many`, and returns ``True``: logs that cannot
        delete conditionally (Kafka, Pulsar) cannot tell.

        Raises: TransientTransportError (they may or may not have been deleted).
        """
        await self.delete_many([key, *also])
        return True

    @abstractmethod
    def watch(self) -> AsyncIterator[KeyedChange | object]:
        """Replay the current state (or the whole history, in write order),
        then yield :data:`CAUGHT_UP` once, then every later change, in write
        order per key, until the iterator is closed.

        Guarantees: a change written after the watch started is yielded.
        Raises: TransientTransportError while iterating.
        """

    def watch_from(self, position: bytes) -> AsyncIterator[KeyedChange | object]:
        """Like :meth:`watch`, replaying the changes from ``position`` (a
        :attr:`KeyedChange.position` of this log; that change included) on,
        in write order, each with its position. Only where ``resumable``.

        Raises: NotImplementedError where the log is not resumable.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot watch from a position")

    async def load_checkpoint(self) -> bytes | None:
        """The last checkpoint saved by :meth:`save_checkpoint` (by any
        process), ``None`` if there is none. Only where ``resumable``.

        Raises: TransientTransportError.
        """
        return None

    async def save_checkpoint(self, data: bytes) -> None:
        """Store ``data`` as the log's checkpoint (last writer wins). Only
        where ``resumable``.

        Raises: TransientTransportError, NotImplementedError.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no checkpoint")

    async def forget(self, key: str, position: bytes) -> None:
        """Remove what the log keeps of ``key`` up to ``position`` (a
        tombstone's position), where a delete leaves a marker that every
        later replay would read. A later write to ``key`` is never removed.
        Default: nothing (the log removes tombstones itself, or never holds
        them).

        Raises: TransientTransportError.
        """
        return None

    @abstractmethod
    async def aclose(self) -> None:
        """Release resources; what was written stays in the backend.
        Idempotent. Does not raise for an unreachable backend."""


def encode_checkpoint(
    resume: bytes, records: Iterable[tuple[str, bytes, bytes]], **extra: Any
) -> bytes:
    """A checkpoint as :func:`read_checkpoint` reads it: the resume position,
    the carried ``(key, position, value)`` records, and ``extra`` fields
    (ignored by readers)."""
    b64 = base64.b64encode
    return to_json(
        {
            "version": 1,
            "resume": b64(resume).decode(),
            "records": [
                [key, b64(position).decode(), b64(value).decode()]
                for key, position, value in records
            ],
            **extra,
        }
    )


def read_checkpoint(data: bytes) -> tuple[bytes, list[tuple[str, bytes, bytes]]]:
    """The resume position and the carried ``(key, position, value)`` records
    of a checkpoint as the shared readers write it
    (``{"version":1,"resume":b64,"records":[[key,b64,b64],...]}``), for a
    log that reads its own checkpoint.

    Raises: ValueError (not such a checkpoint).
    """
    try:
        fields = json.loads(data)
        if fields.get("version") != 1:
            raise ValueError(f"checkpoint version {fields.get('version')!r}")
        resume = base64.b64decode(fields["resume"], validate=True)
        records = [
            (key, base64.b64decode(position, validate=True), base64.b64decode(value, validate=True))
            for key, position, value in fields["records"]
        ]
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a checkpoint: {exc!r}") from None
    if not all(isinstance(key, str) for key, _, _ in records):
        raise ValueError("not a checkpoint: a key is not a string")
    return resume, records
