"""Registries on JetStream KV: one bucket per registry (file storage,
history 1). ``put`` returns after the server stored the value; ``delete``
writes a KV delete marker (tombstone); ``watch`` is a KV watch (an ordered
push consumer), not polling.

The shared :class:`~transport.DeliveryRegistry` and
:class:`~transport.CapabilityRegistry` supply the semantics; this module only
supplies the :class:`~transport.KeyedLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from transport import CAUGHT_UP, CapabilityRegistry, DeliveryRegistry, KeyedChange, KeyedLog
from transport.errors import ClosedResourceError, TransientTransportError
from transport_nats._errors import map_nats_errors

if TYPE_CHECKING:
    from transport_nats._transport import NatsTransport

__all__ = ["NatsCapabilityRegistry", "NatsDeliveryRegistry", "NatsKeyedLog"]

#: The registries are the shared implementations over :class:`NatsKeyedLog`.
NatsDeliveryRegistry = DeliveryRegistry
NatsCapabilityRegistry = CapabilityRegistry


class NatsKeyedLog(KeyedLog):
    """A JetStream KV bucket as a :class:`KeyedLog`."""

    def __init__(self, transport: NatsTransport, bucket: str) -> None:
        self._t = transport
        self.bucket = bucket
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def _bucket(self) -> KeyValue:
        if self._closed:
            raise ClosedResourceError(f"registry bucket {self.bucket!r} is closed")
        if self._kv is not None:
            return self._kv
        async with self._lock:
            if self._kv is None:
                opts = self._t.options
                with map_nats_errors(f"opening KV bucket {self.bucket}"):
                    # create_key_value is idempotent for an identical config.
                    self._kv = await self._t.js.create_key_value(
                        KeyValueConfig(
                            bucket=self.bucket,
                            history=1,
                            storage=StorageType.FILE,
                            replicas=opts.replicas,
                        )
                    )
            return self._kv

    async def put(self, key: str, value: bytes) -> None:
        kv = await self._bucket()
        with map_nats_errors(f"writing {self.bucket}"):
            await kv.put(key, value)

    async def delete(self, key: str) -> None:
        kv = await self._bucket()
        with map_nats_errors(f"deleting from {self.bucket}"):
            await kv.delete(key)

    async def get(self, key: str) -> bytes | None:
        kv = await self._bucket()
        with map_nats_errors(f"reading {self.bucket}"):
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:  # also KeyDeletedError
                return None
        if entry.operation in (KV_DEL, KV_PURGE):
            return None
        return entry.value or b""

    async def watch(self) -> AsyncIterator[KeyedChange | object]:
        kv = await self._bucket()
        loop = asyncio.get_running_loop()
        reconnected: asyncio.Future[None] = loop.create_future()

        def on_reconnect() -> None:
            if not reconnected.done():
                reconnected.set_result(None)

        self._t.add_reconnect_listener(on_reconnect)
        watcher: Any = None
        try:
            with map_nats_errors(f"watching {self.bucket}"):
                watcher = await kv.watchall()
            while True:
                getter = asyncio.ensure_future(watcher._updates.get())
                try:
                    await asyncio.wait({getter, reconnected}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()
                if not getter.done() or getter.cancelled():
                    # The watch's ephemeral consumer may not have survived the
                    # reconnect (a restarted server forgets it): the caller
                    # re-watches; replays are idempotent.
                    raise TransientTransportError(
                        f"watch of {self.bucket} interrupted by a reconnect; re-watch"
                    )
                entry = getter.result()
                if entry is None:
                    yield CAUGHT_UP
                elif isinstance(entry, KeyValue.Entry):
                    if entry.operation in (KV_DEL, KV_PURGE):
                        yield KeyedChange(entry.key, None)
                    else:
                        yield KeyedChange(entry.key, entry.value or b"")
                else:  # the watcher was stopped
                    raise TransientTransportError(f"watch of {self.bucket} stopped")
        finally:
            self._t.remove_reconnect_listener(on_reconnect)
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()

    async def aclose(self) -> None:
        self._closed = True
