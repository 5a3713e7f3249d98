"""Registries on Redis: one hash (the current value of every key) plus one
change stream per registry.

``put`` and ``delete`` write both in one ``MULTI``/``EXEC`` transaction, so
the hash and the change stream never disagree, even if the client dies
between the two commands: a watcher that replays the hash and then follows
the stream from the position read in the same transaction sees every change
exactly once. The change stream is trimmed by age
(``registry_change_retention``, one hour by default, ``XADD MINID ~``); the
hash is never trimmed (the shared registries delete what expires). A
watcher that falls further behind than the retention re-reads the state.

The shared :class:`~transport.DeliveryRegistry` and
:class:`~transport.CapabilityRegistry` supply the semantics; this module only
supplies the :class:`~transport.KeyedLog`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from transport import CAUGHT_UP, CapabilityRegistry, DeliveryRegistry, KeyedChange, KeyedLog
from transport.errors import ClosedResourceError, TransientTransportError
from transport_redis._client import RedisClient

__all__ = ["RedisCapabilityRegistry", "RedisDeliveryRegistry", "RedisKeyedLog"]

#: The registries are the shared implementations over :class:`RedisKeyedLog`.
RedisDeliveryRegistry = DeliveryRegistry
RedisCapabilityRegistry = CapabilityRegistry

_BLOCK_MS = 1000


def _ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


# KEYS: state hash, changes stream; ARGV: MINID cutoff (ms), the key
# claimed, the other keys deleted with it.
_CLAIM = """
if redis.call('HDEL', KEYS[1], ARGV[2]) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[1], '*', 'key', ARGV[2], 'deleted', '1')
for i = 3, #ARGV do
  if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[1], '*', 'key', ARGV[i], 'deleted', '1')
  end
end
return 1
"""


class RedisKeyedLog(KeyedLog):
    """A hash (state) and a stream (changes) as a :class:`KeyedLog`."""

    def __init__(
        self, client: RedisClient, state_key: str, changes_key: str, *, retention_seconds: float
    ) -> None:
        self._client = client
        self.state_key = state_key
        self.changes_key = changes_key
        self._retention_ms = int(retention_seconds * 1000)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"registry {self.state_key!r} is closed")
        self._client.check_open()

    async def _write(self, key: str, value: bytes | None) -> None:
        self._check_open()
        cutoff = int(time.time() * 1000) - self._retention_ms
        with self._client.errors(f"writing {self.state_key}"):
            async with self._client.redis.pipeline(transaction=True) as tx:
                if value is None:
                    tx.hdel(self.state_key, key)
                    tx.xadd(
                        self.changes_key,
                        {"key": key, "deleted": b"1"},
                        minid=cutoff,
                        approximate=True,
                    )
                else:
                    tx.hset(self.state_key, key, value)
                    tx.xadd(
                        self.changes_key,
                        {"key": key, "value": value},
                        minid=cutoff,
                        approximate=True,
                    )
                await tx.execute()

    async def put(self, key: str, value: bytes) -> None:
        await self._write(key, value)

    atomic_claims = True

    async def claim(
        self, key: str, also: Sequence[str] = (), *, position: bytes | None = None
    ) -> bool:
        """The deletes and their change records in one script: one
        claimant wins."""
        self._check_open()
        cutoff = int(time.time() * 1000) - self._retention_ms
        claimed = await self._client.run(
            _CLAIM,
            [self.state_key, self.changes_key],
            [cutoff, key, *also],
            f"writing {self.state_key}",
        )
        return bool(claimed)

    async def delete(self, key: str) -> None:
        await self._write(key, None)

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        with self._client.errors(f"reading {self.state_key}"):
            value = await self._client.redis.hget(self.state_key, key)
        return None if value is None else bytes(value)

    async def _snapshot(self) -> tuple[dict[bytes, bytes], bytes]:
        with self._client.errors(f"reading {self.state_key}"):
            async with self._client.redis.pipeline(transaction=True) as tx:
                tx.hgetall(self.state_key)
                tx.xrevrange(self.changes_key, "+", "-", count=1)
                state, newest = await tx.execute()
        return state, newest[0][0] if newest else b"0-0"

    async def watch(self) -> AsyncIterator[KeyedChange | object]:
        self._check_open()
        state, position = await self._snapshot()
        for name, current in state.items():
            yield KeyedChange(name.decode(), bytes(current))
        yield CAUGHT_UP
        redis = self._client.redis
        while True:
            self._check_open()
            with self._client.errors(f"watching {self.state_key}"):
                reply = await redis.xread({self.changes_key: position}, count=500, block=_BLOCK_MS)
            if not reply:
                continue
            entries = reply[0][1]
            if _ms(position) < time.time() * 1000 - self._retention_ms / 2:
                await self._check_not_trimmed(position)
            for entry_id, fields in entries:
                key = fields.get(b"key")
                if key is not None:
                    deleted = fields.get(b"deleted") is not None
                    value: bytes | None = None if deleted else bytes(fields.get(b"value", b""))
                    yield KeyedChange(key.decode(), value)
                position = entry_id

    async def _check_not_trimmed(self, position: bytes) -> None:
        """Raise if changes after ``position`` were trimmed away (the caller
        re-watches: the registries' replays are idempotent)."""
        with self._client.errors(f"watching {self.state_key}"):
            info = await self._client.redis.xinfo_stream(self.changes_key)
        deleted = info.get("max-deleted-entry-id")
        if deleted is None:
            return
        deleted_id = deleted.decode() if isinstance(deleted, bytes) else str(deleted)
        ms, _, seq = deleted_id.partition("-")
        pms, _, pseq = position.decode().partition("-")
        if (int(ms), int(seq or 0)) > (int(pms), int(pseq or 0)):
            raise TransientTransportError(
                f"watch of {self.state_key} fell behind the change retention; re-watch"
            )

    async def aclose(self) -> None:
        self._closed = True
