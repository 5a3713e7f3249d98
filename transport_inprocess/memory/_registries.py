"""``MemoryKeyedLog``: the keyed log behind both registries, a dict of the
in-process broker with its watchers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from transport import CAUGHT_UP, KeyedChange, KeyedLog
from transport_inprocess.memory._client import _Broker, _call_soon, _LogState

__all__ = ["MemoryKeyedLog"]


class MemoryKeyedLog(KeyedLog):
    def __init__(self, broker: _Broker, name: str) -> None:
        self._broker = broker
        with broker.lock:
            state = broker.logs.get(name)
            if state is None:
                state = broker.logs[name] = _LogState()
        self._state = state

    def _publish(self, change: KeyedChange) -> None:
        for loop, queue in list(self._state.watchers):
            try:
                _call_soon(loop, queue.put_nowait, change)
            except RuntimeError:
                self._state.watchers.remove((loop, queue))

    async def put(self, key: str, value: bytes) -> None:
        with self._broker.lock:
            self._state.data[key] = value
            self._publish(KeyedChange(key, value))

    async def delete(self, key: str) -> None:
        await self.delete_many((key,))

    async def get(self, key: str) -> bytes | None:
        return (await self.get_many((key,)))[0]

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        with self._broker.lock:
            data = self._state.data
            return [data.get(key) for key in keys]

    atomic_claims = True

    async def claim(
        self, key: str, also: Sequence[str] = (), *, position: bytes | None = None
    ) -> bool:
        with self._broker.lock:
            if self._state.data.pop(key, None) is None:
                return False
            self._publish(KeyedChange(key, None))
            for other in also:
                if self._state.data.pop(other, None) is not None:
                    self._publish(KeyedChange(other, None))
            return True

    async def delete_many(self, keys: Sequence[str]) -> None:
        with self._broker.lock:
            for key in keys:
                if self._state.data.pop(key, None) is not None:
                    self._publish(KeyedChange(key, None))

    async def watch(self) -> AsyncIterator[KeyedChange | object]:
        queue: asyncio.Queue[KeyedChange] = asyncio.Queue()
        entry = (asyncio.get_running_loop(), queue)
        with self._broker.lock:
            snapshot = list(self._state.data.items())
            self._state.watchers.append(entry)
        try:
            for key, value in snapshot:
                yield KeyedChange(key, value)
            yield CAUGHT_UP
            while True:
                yield await queue.get()
        finally:
            with self._broker.lock:
                if entry in self._state.watchers:
                    self._state.watchers.remove(entry)

    async def aclose(self) -> None:
        return None
