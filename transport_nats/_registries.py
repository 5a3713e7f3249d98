"""Registries on JetStream KV: one bucket per registry (file storage,
history 1). ``put`` returns after the server stored the value; ``delete``
writes a KV delete marker (tombstone), which a registry's view removes a
minute after it saw it (``forget``: a subject purge below the marker), so a
later watch replays what is live, not every key ever deleted; ``watch`` is a
KV watch (an ordered push consumer), not polling.

The shared :class:`~transport.DeliveryRegistry` and
:class:`~transport.CapabilityRegistry` supply the semantics; this module only
supplies the :class:`~transport.KeyedLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue, _is_key_valid

from transport import CAUGHT_UP, CapabilityRegistry, DeliveryRegistry, KeyedChange, KeyedLog
from transport.errors import (
    ClosedResourceError,
    PermanentTransportError,
    TransientTransportError,
)
from transport_nats._client import NatsContext, check_puback
from transport_nats._errors import map_nats_errors

__all__ = ["NatsCapabilityRegistry", "NatsDeliveryRegistry", "NatsKeyedLog"]

# JetStream err_code: "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058
#: JetStream: the expected last subject sequence did not match.
_WRONG_LAST_SEQUENCE = 10071
#: Conditional deletes a claim tries while the key keeps changing under it.
_CLAIM_TRIES = 4
_RECONNECTED = object()  # put in a watcher's queue when the client reconnects

#: The registries are the shared implementations over :class:`NatsKeyedLog`.
NatsDeliveryRegistry = DeliveryRegistry
NatsCapabilityRegistry = CapabilityRegistry


class NatsKeyedLog(KeyedLog):
    """A JetStream KV bucket as a :class:`KeyedLog`."""

    def __init__(self, ctx: NatsContext, bucket: str) -> None:
        self._ctx = ctx
        self.bucket = bucket
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._prefix = ""

    async def _bucket(self) -> KeyValue:
        if self._closed:
            raise ClosedResourceError(f"registry bucket {self.bucket!r} is closed")
        if self._kv is not None:
            return self._kv
        async with self._lock:
            if self._kv is None:
                opts = self._ctx.options
                with map_nats_errors(f"opening KV bucket {self.bucket}"):
                    # create_key_value is idempotent for an identical config.
                    # Direct gets (one request, raw reply) only on a single
                    # replica: a follower could answer with a stale value.
                    config = KeyValueConfig(
                        bucket=self.bucket,
                        history=1,
                        storage=StorageType.FILE,
                        replicas=opts.replicas,
                        direct=opts.replicas == 1 or None,
                    )
                    try:
                        self._kv = await self._ctx.js.create_key_value(config)
                    except nats.js.errors.BadRequestError as exc:
                        if exc.err_code != _STREAM_NAME_IN_USE:
                            raise
                        # A bucket made with other settings (an older
                        # release): use it as it is.
                        self._kv = await self._ctx.js.key_value(self.bucket)
                self._prefix = f"$KV.{self.bucket}."
            return self._kv

    async def put(self, key: str, value: bytes) -> None:
        await self._publish(key, value, None, "writing")

    async def delete(self, key: str) -> None:
        # A delete marker: an empty body with the operation in its headers.
        await self._publish(key, b"", {KV_OP: KV_DEL}, "deleting from")

    async def _publish(
        self, key: str, value: bytes, headers: dict[str, str] | None, doing: str
    ) -> None:
        """What ``kv.put``/``kv.delete`` do (a JetStream publish to the key's
        subject), on the shared replies rather than nats-py's request path
        (a new inbox token, future and timeout per request)."""
        await self._bucket()
        if not _is_key_valid(key):
            raise PermanentTransportError(f"{doing} {self.bucket}: invalid key")
        # Not into the reconnect buffer (written after this call raised):
        # a short reconnect is waited out, a longer one raises.
        await self._ctx.wait_connected(f"{doing} {self.bucket}")
        with map_nats_errors(f"{doing} {self.bucket}"):
            check_puback(await self._ctx.requests.request(self._prefix + key, value, headers))

    atomic_claims = True

    async def claim(
        self, key: str, also: Sequence[str] = (), *, position: bytes | None = None
    ) -> bool:
        """A delete marker published only if the key's last message is the
        value seen (``Nats-Expected-Last-Subject-Sequence``: ``position``,
        the revision the caller's view applied, else the one read now): of
        concurrent claimants, one wins; the others' markers are refused. The
        keys ``also`` are deleted alongside (whoever wins deletes them too).
        A refused marker is tried again at the value read then, as long as
        the key holds one (a value written again since the hint)."""
        kv = await self._bucket()
        if not _is_key_valid(key):
            raise PermanentTransportError(f"deleting from {self.bucket}: invalid key")
        revision = int(position) if position is not None and position.isdigit() else None
        for _ in range(_CLAIM_TRIES):
            # Before any of its writes: a marker sent into the reconnect
            # buffer while the deletes beside it raised would take the
            # response after the caller was told the claim failed.
            await self._ctx.wait_connected(f"deleting from {self.bucket}")
            if revision is None:
                with map_nats_errors(f"reading {self.bucket}"):
                    try:
                        entry = await kv.get(key)
                    except nats.js.errors.KeyNotFoundError:  # also KeyDeletedError
                        return False
                if entry.operation in (KV_DEL, KV_PURGE) or not entry.revision:
                    return False
                revision = entry.revision
            headers = {KV_OP: KV_DEL, "Nats-Expected-Last-Subject-Sequence": str(revision)}
            with map_nats_errors(f"deleting from {self.bucket}"):
                replies = await asyncio.gather(
                    self._ctx.requests.request(self._prefix + key, b"", headers),
                    *(self.delete(other) for other in also),
                )
                also = ()
                try:
                    check_puback(replies[0])  # type: ignore[arg-type]
                except nats.js.errors.APIError as exc:
                    if exc.err_code != _WRONG_LAST_SEQUENCE:
                        raise
                    revision = None  # claimed, or written again, since: look
                    continue
            return True
        raise TransientTransportError(
            f"deleting from {self.bucket}: {key!r} changed under every claim ({_CLAIM_TRIES})"
        )

    async def get(self, key: str) -> bytes | None:
        kv = await self._bucket()
        if getattr(kv, "_direct", False):
            return await self._direct_get(key)
        with map_nats_errors(f"reading {self.bucket}"):
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:  # also KeyDeletedError
                return None
        if entry.operation in (KV_DEL, KV_PURGE):
            return None
        return entry.value or b""

    async def _direct_get(self, key: str) -> bytes | None:
        """The latest value by a direct get (one request; the value comes back
        as the reply's body, the KV operation in its headers) — kv.get
        without building an entry and parsing its timestamp."""
        if not _is_key_valid(key):
            raise PermanentTransportError(f"reading {self.bucket}: invalid key")
        subject = self._prefix + key
        with map_nats_errors(f"reading {self.bucket}"):
            reply = await self._ctx.requests.request(
                f"$JS.API.DIRECT.GET.KV_{self.bucket}.{subject}", b""
            )
            headers = reply.headers or {}
            if not reply.data and (status := headers.get("Status")):
                if status == "404":
                    return None
                raise nats.js.errors.APIError.from_msg(reply)
        if headers.get("Nats-Subject") != subject:
            return None
        if headers.get("KV-Operation") in (KV_DEL, KV_PURGE):
            return None
        return reply.data or b""

    async def watch(self) -> AsyncIterator[KeyedChange | object]:
        kv = await self._bucket()
        interrupted = False
        watcher: Any = None

        def on_reconnect() -> None:
            # Wake the reader without a task per entry: a marker in the
            # watcher's queue (or, if that is full, the flag seen next).
            nonlocal interrupted
            interrupted = True
            if watcher is not None:
                with contextlib.suppress(asyncio.QueueFull):
                    watcher._updates.put_nowait(_RECONNECTED)

        self._ctx.add_reconnect_listener(on_reconnect)
        try:
            with map_nats_errors(f"watching {self.bucket}"):
                # Caught up once the entry at the stream's last sequence (as
                # of now) is seen: nats-py signals "no more pending" from the
                # new consumer's num_pending, which right after its creation
                # can still be 0 with entries on their way (seen under load:
                # a restarted caller found none of its pending records).
                state = (await self._ctx.js.stream_info(kv._stream)).state
                target = state.last_seq if state.messages else 0
                watcher = await kv.watchall()
            caught_up = False
            while True:
                entry = await watcher._updates.get() if not interrupted else _RECONNECTED
                if interrupted or entry is _RECONNECTED:
                    # The watch's ephemeral consumer may not have survived the
                    # reconnect (a restarted server forgets it): the caller
                    # re-watches; replays are idempotent.
                    raise TransientTransportError(
                        f"watch of {self.bucket} interrupted by a reconnect; re-watch"
                    )
                if entry is None:  # nats-py's marker: trusted only for an empty stream
                    if not caught_up and target == 0:
                        caught_up = True
                        yield CAUGHT_UP
                elif isinstance(entry, KeyValue.Entry):
                    position = str(entry.revision).encode() if entry.revision else None
                    if entry.operation in (KV_DEL, KV_PURGE):
                        yield KeyedChange(entry.key, None, position)
                    else:
                        yield KeyedChange(entry.key, entry.value or b"", position)
                    # Caught up at the stream's last sequence as of the start,
                    # or at the last entry the new consumer had to deliver
                    # (``delta``, from the server, per message): the last
                    # sequence itself may be a removed tombstone.
                    if not caught_up and ((entry.revision or 0) >= target or entry.delta == 0):
                        caught_up = True
                        yield CAUGHT_UP
                else:  # the watcher was stopped
                    raise TransientTransportError(f"watch of {self.bucket} stopped")
        finally:
            self._ctx.remove_reconnect_listener(on_reconnect)
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()

    async def forget(self, key: str, position: bytes) -> None:
        """Remove a delete marker (and anything older) of ``key``: a KV
        delete leaves one message per key that every later watch replays.
        A purge of the key's subject below the marker's sequence + 1, so a
        later write to the key stays. Live watchers have seen the marker by
        then (the registries call this a minute after they saw it)."""
        kv = await self._bucket()
        if not _is_key_valid(key):
            raise PermanentTransportError(f"purging {self.bucket}: invalid key")
        await self._ctx.wait_connected(f"purging {self.bucket}")
        with map_nats_errors(f"removing a delete marker from {self.bucket}"):
            await self._ctx.js.purge_stream(
                kv._stream, seq=int(position) + 1, subject=self._prefix + key
            )

    async def aclose(self) -> None:
        self._closed = True
