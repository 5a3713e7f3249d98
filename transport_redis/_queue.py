"""Request queues on Redis Streams with one consumer group per queue.

Guarantees and how they are kept:

* ``enqueue`` is an ``XADD``: it returns once the server accepted the entry.
  How durable that is depends on the server's persistence: with
  ``appendonly yes`` and ``appendfsync always`` the entry is in the
  append-only file, fsynced, before the reply; with ``everysec`` (Redis's
  default) the last second may be lost by a server crash; without the AOF a
  restart loses everything. ``transport doctor`` checks both settings.
* Every lease is an entry of the group's pending-entries list (PEL), owned
  by one consumer per queue handle. A lease lasts ``lease_seconds`` of idle
  time: ``poll`` first claims (``XCLAIM``) the oldest entry idle for at least
  the lease (a crashed or closed worker's, or one given back), and only then
  reads a new one (``XREADGROUP``). ``extend`` resets the idle time
  (``XCLAIM ... JUSTID``, which neither counts a delivery nor moves the
  entry); an extension longer than the lease is renewed in the background
  while the handle lives.
* The attempt number is the entry's ``attempts`` field (deliveries before it
  was re-added) plus its PEL delivery count, which only this backend sets
  (``XCLAIM ... RETRYCOUNT``): a request given back without being handed to
  a handler (a cancelled poll, a priority queue's held head) is given back
  with its count lowered again, so it costs no attempt.
* Every state change is one Lua script (atomic on the server): a lease, an
  ack (``XACK`` + ``XDEL``), a nack (the entry is re-added at the end of the
  stream with its attempt count and error, or parked in a sorted set until
  its delay has passed, and the old entry acked and deleted), a dead letter
  (the entry moves to the dead-letter stream with the error and attempt
  count). A crash between two commands cannot lose or duplicate a request.
* Settles check the lease: the entry must still be pending for this handle's
  consumer with the delivery count it was handed out with, so a stale ack,
  nack or extend is a harmless ``False``.
* Round trips are shared, never leases: the polls of one handle waiting at
  the same time share one lease script that takes at most one lease per
  waiting poll (no prefetch); acks of one handle issued while an ack script
  is on its way go together in the next one (each checked and answered on
  its own); concurrent enqueues of one handle go in one pipeline of
  ``XADD`` (each answered on its own).

Retention: an acked entry is deleted at once, so a queue stream holds only
requests not yet acked (no ``MAXLEN`` trimming, which could drop unacked
requests). Dead letters stay until requeued or deleted by an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import redis.exceptions as rex

from transport import DeadLetter, Delivery, QueueStats, RequestQueue, WorkRequest, decode, encode
from transport.errors import (
    ClosedResourceError,
    TransientTransportError,
    TransportError,
    UndecodableMessageError,
)
from transport.kit import decode_request, replace_fields, requeued
from transport.kit import seconds as _seconds
from transport_redis._client import RedisClient, RedisContext, keys

__all__ = ["RELEASED_CONSUMER", "RedisDelivery", "RedisRequestQueue"]

log = logging.getLogger("transport.redis")

#: The consumer that owns requests given back (by a clean close, a cancelled
#: poll, a priority queue): their idle time is set so that the next poll of
#: any handle claims them at once.
RELEASED_CONSUMER = "~released"

_FIELDS = """
local function fields(arr)
  local t = {}
  for i = 1, #arr, 2 do t[arr[i]] = arr[i + 1] end
  return t
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function attempts_of(f)
  return tonumber(f.attempts or '0') or 0
end
"""

# KEYS: stream, dlq, delayed. ARGV: group, consumer, lease_ms, max_attempts,
# n (how many polls are waiting: at most n leases are taken, nothing more).
# Returns one flat array (cheap to parse): newest entry id, ms until the next
# delayed request is due or -1, the number of leases, then five values per
# lease: id, delivery count, attempt, body (nil if the entry has none),
# carried request id (nil if none); then four per entry it dead-lettered
# with its attempts used up: id, body (nil if none), error, carried request
# id (nil if none). The newest id and the delay are looked up only when fewer
# than n leases were found.
_LEASE = (
    _FIELDS
    + """
local stream, dlq, delayed = KEYS[1], KEYS[2], KEYS[3]
local group, me = ARGV[1], ARGV[2]
local lease_ms, max_attempts = tonumber(ARGV[3]), tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 100)
for _, member in ipairs(due) do
  local m = cmsgpack.unpack(member)
  local args = {stream, '*', 'body', m[2], 'attempts', m[3]}
  if m[4] ~= '' then args[#args + 1] = 'error'; args[#args + 1] = m[4] end
  if m[5] ~= '' then args[#args + 1] = 'request_id'; args[#args + 1] = m[5] end
  redis.call('XADD', unpack(args))
  redis.call('ZREM', delayed, member)
end
local got, dead = {}, {}
local function lease(id, count, attempt, f)
  got[#got + 1] = {id, count, attempt, f.body or false, f.request_id or false}
end
local function reply(newest, wait)
  local out = {newest, wait, #got}
  for _, g in ipairs(got) do
    for i = 1, 5 do out[#out + 1] = g[i] end
  end
  for _, d in ipairs(dead) do
    for i = 1, 4 do out[#out + 1] = d[i] end
  end
  return out
end
local looked = 0
while #got < n and looked < 100 do
  local p = redis.call('XPENDING', stream, group, 'IDLE', lease_ms, '-', '+', n - #got)
  if #p == 0 then break end
  for _, item in ipairs(p) do
    looked = looked + 1
    local id, count = item[1], tonumber(item[4])
    local e = redis.call('XRANGE', stream, id, id)
    if #e == 0 then
      redis.call('XACK', stream, group, id)
    else
      local f = fields(e[1][2])
      local done = attempts_of(f) + count
      if done >= max_attempts then
        local err = f.error or ('not acknowledged after ' .. done .. ' deliveries (lease expired)')
        redis.call('XADD', dlq, '*', 'body', f.body or '', 'error', err,
          'attempts', tostring(done), 'request_id', f.request_id or '', 'source', id)
        redis.call('XACK', stream, group, id)
        redis.call('XDEL', stream, id)
        dead[#dead + 1] = {id, f.body or false, err, f.request_id or false}
      else
        redis.call('XCLAIM', stream, group, me, 0, id, 'RETRYCOUNT', count + 1, 'JUSTID')
        lease(id, count + 1, done + 1, f)
      end
    end
  end
end
if #got < n then
  local r = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', n - #got,
    'STREAMS', stream, '>')
  if r then
    for _, e in ipairs(r[1][2]) do
      local f = fields(e[2])
      lease(e[1], 1, attempts_of(f) + 1, f)
    end
  end
end
if #got >= n then return reply('0-0', -1) end
local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
local nxt = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
local wait = -1
if #nxt > 0 then wait = math.max(tonumber(nxt[2]) - now, 0) end
if #last > 0 then return reply(last[1][1], wait) end
return reply('0-0', wait)
"""
)

# The lease check every settle starts with. ARGV: group, consumer, id, count.
_OWNED = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] or tonumber(p[1][4]) ~= tonumber(ARGV[4]) then
  return 0
end
"""

# Acks of one handle, checked one by one. ARGV: group, consumer, then an
# entry id and its delivery count per ack. Returns 1 or 0 per ack.
_ACK = """
local group, me = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], group, id, id, 1)
  if #p == 0 or p[1][2] ~= me or tonumber(p[1][4]) ~= tonumber(ARGV[i + 1]) then
    out[#out + 1] = 0
  else
    redis.call('XACK', KEYS[1], group, id)
    redis.call('XDEL', KEYS[1], id)
    out[#out + 1] = 1
  end
end
return out
"""

# KEYS: stream, dlq, delayed. ARGV: group, consumer, id, count, delay_ms,
# error, dead (1/0), max_attempts, delivered request id.
_NACK = (
    _FIELDS
    + _OWNED
    + """
local stream, dlq, delayed = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[3]
local e = redis.call('XRANGE', stream, id, id)
redis.call('XACK', stream, ARGV[1], id)
if #e == 0 then return 0 end
local f = fields(e[1][2])
local done = attempts_of(f) + tonumber(ARGV[4])
local err = ARGV[6]
if err == '' then err = f.error or '' end
local rid = ARGV[9]
if rid == '' then rid = f.request_id or '' end
local delay = tonumber(ARGV[5])
if ARGV[7] == '1' or done >= tonumber(ARGV[8]) then
  if err == '' then err = 'nacked after ' .. done .. ' deliveries' end
  redis.call('XADD', dlq, '*', 'body', f.body or '', 'error', err,
    'attempts', tostring(done), 'request_id', rid, 'source', id)
elseif delay > 0 then
  redis.call('ZADD', delayed, now_ms() + delay,
    cmsgpack.pack({id, f.body or '', tostring(done), err, rid}))
else
  local args = {stream, '*', 'body', f.body or '', 'attempts', tostring(done)}
  if err ~= '' then args[#args + 1] = 'error'; args[#args + 1] = err end
  if rid ~= '' then args[#args + 1] = 'request_id'; args[#args + 1] = rid end
  redis.call('XADD', unpack(args))
end
redis.call('XDEL', stream, id)
return 1
"""
)

# ARGV: group, consumer, id, count, idle_ms (the lease then ends after
# lease - idle_ms).
_EXTEND = (
    _OWNED
    + """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3],
  'IDLE', ARGV[5], 'RETRYCOUNT', ARGV[4], 'JUSTID')
return 1
"""
)

# ARGV: group, consumer, id, count, count after the release.
_RELEASE = (
    _OWNED
    + f"""
redis.call('XCLAIM', KEYS[1], ARGV[1], '{RELEASED_CONSUMER}', 0, ARGV[3],
  'TIME', 1, 'RETRYCOUNT', ARGV[5], 'JUSTID')
return 1
"""
)

# ARGV: group, consumer. The consumer is deleted only if nothing is pending
# for it (a deleted consumer's pending entries would never be redelivered).
_DELETE_CONSUMER = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""

# ARGV: group, idle_ms. Consumers of crashed handles stay in the group (a
# clean close deletes its own): those with nothing pending that have not
# been seen for idle_ms are deleted. Nothing is lost: a deleted consumer had
# nothing pending, and a live handle's next read makes its consumer again.
_PRUNE = """
local gone = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if tonumber(info.pending) == 0 and tonumber(info.idle) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info.name)
    gone = gone + 1
  end
end
return gone
"""

# KEYS: stream, dlq, delayed. ARGV: group, lease_ms.
_STATS = (
    _FIELDS
    + f"""
local stream, dlq, delayed = KEYS[1], KEYS[2], KEYS[3]
local group = ARGV[1]
local len = redis.call('XLEN', stream)
local nd = redis.call('ZCARD', delayed)
local ndlq = redis.call('XLEN', dlq)
local pending, released = 0, 0
local heads = {{}}
local s = redis.pcall('XPENDING', stream, group)
if type(s) == 'table' and s.err then
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #first > 0 then heads[#heads + 1] = first[1][2] end
else
  pending = s[1]
  if s[4] then
    for _, c in ipairs(s[4]) do
      if c[1] == '{RELEASED_CONSUMER}' then released = tonumber(c[2]) end
    end
  end
  local last = '0-0'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = fields(g)
    if info.name == group then last = info['last-delivered-id'] end
  end
  local n = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
  if #n > 0 then heads[#heads + 1] = n[1][2] end
  local x = redis.call('XPENDING', stream, group, 'IDLE', ARGV[2], '-', '+', 1)
  if #x > 0 then
    local e = redis.call('XRANGE', stream, x[1][1], x[1][1])
    if #e > 0 then heads[#heads + 1] = e[1][2] end
  end
end
return {{len, nd, ndlq, pending, released, heads}}
"""
)

# KEYS: stream, dlq. ARGV: dead-letter entry ids.
_REQUEUE = (
    _FIELDS
    + """
local moved = 0
for i = 1, #ARGV, 2 do
  local e = redis.call('XRANGE', KEYS[2], ARGV[i], ARGV[i])
  if #e > 0 then
    local f = fields(e[1][2])
    local args = {KEYS[1], '*', 'body', ARGV[i + 1]}
    if f.request_id and f.request_id ~= '' then
      args[#args + 1] = 'request_id'; args[#args + 1] = f.request_id
    end
    redis.call('XADD', unpack(args))
    redis.call('XDEL', KEYS[2], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""
)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _pairs(flat: list[Any]) -> dict[str, bytes]:
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _entry_time(entry_id: str) -> datetime:
    return datetime.fromtimestamp(int(entry_id.split("-", 1)[0]) / 1000, UTC)


def consumer_name() -> str:
    """A consumer name unique to one queue handle (host, process, random)."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_.")[:40]
    return f"{host or 'host'}-{os.getpid()}-{secrets.token_hex(4)}"


#: What one lease attempt gives a poll: a delivery, ``None`` (an undecodable
#: entry was dead-lettered: look again) or (newest entry id, ms until the next
#: delayed request is due or -1).
_Leased: TypeAlias = "RedisDelivery | tuple[str, int] | None"


class RedisDelivery(Delivery):
    """One leased entry: its id and the delivery count it was handed out
    with (the lease's identity, checked by every settle)."""

    __slots__ = ("_count", "_entry", "_queue", "_settled")

    def __init__(
        self, request: WorkRequest, queue: RedisRequestQueue, entry: str, count: int
    ) -> None:
        super().__init__(request)
        self._queue = queue
        self._entry = entry
        self._count = count
        self._settled = False

    async def ack(self) -> bool:
        if self._settled:
            return False
        done = await self._queue._ack(self)
        self._settled = True
        return done

    async def nack(
        self, delay: float | timedelta | None = None, *, error: str | None = None
    ) -> bool:
        wait = _seconds(delay) or 0.0
        if self._settled:
            return False
        done = await self._queue._nack(self, wait, error or "", dead=False)
        self._settled = True
        return done

    async def extend(self, seconds: float | timedelta | None = None) -> bool:
        span = _seconds(seconds)
        if self._settled:
            return False
        return await self._queue._extend(self, span)

    async def dead_letter(self, error: str) -> bool:
        if self._settled:
            return False
        done = await self._queue._nack(self, 0.0, error, dead=True)
        self._settled = True
        return done

    async def _release_uncounted(self) -> bool:
        if self._settled:
            return False
        done = await self._queue._release(self, uncounted=True)
        self._settled = True
        return done


class RedisRequestQueue(RequestQueue):
    """A Redis stream with one consumer group (``TransportConfig.consumer_group``)
    shared by every worker of the queue; each handle is one consumer."""

    def __init__(
        self, ctx: RedisContext, name: str, *, lease_seconds: float, max_attempts: int
    ) -> None:
        self.name = name
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_payload_bytes = ctx.config.max_payload_bytes
        self._ctx = ctx
        self._client: RedisClient = ctx.client
        ns = ctx.config.namespace
        self.stream = keys.queue(ns, name)
        self.dlq = keys.dead_letters(ns, name)
        self.delayed = keys.delayed(ns, name)
        self.group = ctx.config.consumer_group
        self.consumer = consumer_name()
        self._lease_ms = max(int(lease_seconds * 1000), 1)
        self._claim_interval = ctx.options.claim_interval
        self._group_ready = False
        self._closed = False
        self._held: dict[str, RedisDelivery] = {}
        # Deliveries extended beyond one lease: renewed until this loop time.
        self._extended: dict[str, float] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._maybe_orphans = False
        self._leasing: set[asyncio.Future[Any]] = set()
        # Polls waiting for the lease script (one call at a time leases for
        # every poll waiting when it starts), enqueues waiting for the next
        # pipeline, acks waiting for the next ack script.
        self._poll_waiters: list[asyncio.Future[_Leased]] = []
        self._leaser: asyncio.Task[None] | None = None
        self._adds: list[tuple[bytes, asyncio.Future[None]]] = []
        self._adder: asyncio.Task[None] | None = None
        self._adding = False
        self._acks: list[tuple[RedisDelivery, asyncio.Future[bool]]] = []
        self._acker: asyncio.Task[None] | None = None

    # -- helpers ----------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"queue {self.name!r} is closed")
        self._ctx.check_open()

    def _interrupt(self, waiting: Iterable[asyncio.Future[Any]], what: str) -> None:
        """Answer every call still waiting on an interrupted shared round
        trip with :meth:`_interrupted`."""
        for future in waiting:
            if not future.done():
                future.set_exception(self._interrupted(what))

    def _interrupted(self, what: str) -> TransportError:
        """The error a call waiting on a shared round trip gets when the
        task making it was cancelled (a close that timed out, a loop shutting
        down): the call itself was not cancelled, so it gets an error of the
        queue's, never a cancellation of its own or no answer at all. The
        round trip may have taken effect (as one whose reply was lost)."""
        if self._closed:
            return ClosedResourceError(f"queue {self.name!r} is closed")
        return TransientTransportError(f"{what} on {self.name}: the shared call was cancelled")

    @property
    def _keys(self) -> list[str]:
        return [self.stream, self.dlq, self.delayed]

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        with self._client.errors(f"creating consumer group of queue {self.name}"):
            try:
                # From the start of the stream: requests enqueued before any
                # worker existed are delivered.
                await self._client.redis.xgroup_create(
                    self.stream, self.group, id="0", mkstream=True
                )
            except rex.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._group_ready = True
        try:
            await self._client.run(
                _PRUNE,
                [self.stream],
                [self.group, int(self._ctx.options.idle_consumer_seconds * 1000)],
                f"pruning idle consumers of {self.name}",
            )
        except TransportError as exc:  # housekeeping only
            log.debug("queue %r: pruning idle consumers failed: %s", self.name, exc)

    async def _script(self, source: str, keys_: list[str], args: list[Any], what: str) -> Any:
        """Run a queue script; a consumer group lost with a server restart
        without persistence is made again once."""
        await self._ensure_group()
        try:
            return await self._client.run(source, keys_, args, what)
        except TransportError as exc:
            if "NOGROUP" not in str(exc):
                raise
        self._group_ready = False
        await self._ensure_group()
        return await self._client.run(source, keys_, args, what)

    # -- enqueue ----------------------------------------------------------
    async def _store_request(self, request: WorkRequest, body: bytes) -> None:
        """Returns once the server accepted this request's ``XADD``.
        Concurrent enqueues of one handle share a pipeline (one round trip,
        one fsync with ``appendfsync always``); each ``XADD`` is its own
        command, so one failing fails only its own enqueue. A cancelled
        enqueue may still have been stored (as a single ``XADD`` may)."""
        self._client.check_open()
        if (self._adder is None or self._adder.done()) and not self._adding:
            # Nothing on its way: this XADD goes at once, by itself.
            self._adding = True
            try:
                with self._client.errors(f"enqueue to {self.name}"):
                    await self._client.redis.xadd(self.stream, {"body": body})
            finally:
                self._adding = False
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._adds.append((body, done))
        if self._adder is None or self._adder.done():
            self._adder = asyncio.ensure_future(self._add_rounds())
            self._background.add(self._adder)
            self._adder.add_done_callback(self._background.discard)
        await done

    async def _add_rounds(self) -> None:
        batch: list[tuple[bytes, asyncio.Future[None]]] = []
        try:
            while self._adds:
                batch, self._adds = [a for a in self._adds if not a[1].done()], []
                if not batch:
                    continue
                try:
                    if len(batch) == 1:
                        with self._client.errors(f"enqueue to {self.name}"):
                            replies: list[Any] = [
                                await self._client.redis.xadd(self.stream, {"body": batch[0][0]})
                            ]
                    else:
                        with self._client.errors(f"enqueue to {self.name}"):
                            pipe = self._client.redis.pipeline(transaction=False)
                            for body, _ in batch:
                                pipe.xadd(self.stream, {"body": body})
                            replies = await pipe.execute(raise_on_error=False)
                except Exception as exc:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                for (_, done), reply in zip(batch, replies, strict=True):
                    if done.done():
                        continue
                    if isinstance(reply, Exception):
                        try:
                            with self._client.errors(f"enqueue to {self.name}"):
                                raise reply
                        except Exception as exc:
                            done.set_exception(exc)
                    else:
                        done.set_result(None)
        except BaseException:
            self._interrupt((done for _, done in [*batch, *self._adds]), "enqueue")
            self._adds = []
            raise
        finally:
            self._adder = None

    # -- poll -------------------------------------------------------------
    async def poll(self, timeout: float | None = None) -> RedisDelivery | None:
        self._check_open()
        wait_for = _seconds(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if wait_for is None else loop.time() + wait_for
        if self._maybe_orphans:
            await self._sweep_orphans()
        while True:
            found = await self._lease_shielded()
            if isinstance(found, RedisDelivery):
                return found
            if found is None:  # dead-lettered an undecodable entry: look again
                continue
            newest, due_ms = found
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0.001:
                return None
            pause = (
                self._claim_interval if remaining is None else min(remaining, self._claim_interval)
            )
            if due_ms >= 0:
                pause = min(pause, due_ms / 1000 + 0.001)
            await self._wait_for_new(newest, pause)
            self._check_open()

    async def _poll_more(self, first: Delivery, count: int) -> list[Delivery]:
        """The rest of a :meth:`poll_many` in one lease script, not as that
        many polls. A failing script is not raised (the first is handed out;
        the next call meets the error); a call cancelled meanwhile gives
        ``first`` and what the script leased back uncounted."""
        more = asyncio.ensure_future(self._lease(count))
        try:
            leased, _ = await asyncio.shield(more)
        except asyncio.CancelledError:
            more.add_done_callback(self._give_back_leased)
            self._spawn(first._release_uncounted())
            raise
        except TransportError:
            return []
        return [d for d in leased if d is not None]

    def _give_back_leased(self, done: asyncio.Future[Any]) -> None:
        """Leases of a ``poll_many`` cancelled while its script ran: back,
        uncounted (no handler saw them)."""
        if done.cancelled() or done.exception() is not None:
            return
        leased, _ = done.result()
        for delivery in leased:
            if delivery is not None:
                self._spawn(delivery._release_uncounted())

    async def _wait_for_new(self, newest: str, pause: float) -> None:
        """Block until an entry newer than ``newest`` exists or ``pause``
        passed: a plain ``XREAD`` (no group), so cancelling it loses nothing."""
        block = max(int(pause * 1000), 1)
        with self._client.errors(f"polling {self.name}"):
            await self._client.redis.xread({self.stream: newest}, count=1, block=block)

    async def _lease_shielded(self) -> _Leased:
        """One lease for this poll: a delivery, ``None`` (look again) or
        (newest entry id, ms until a delayed request is due).

        The polls of a handle waiting at the same time share one lease
        script (``n`` = the number waiting, so nothing is leased that no
        poll asked for). The script runs to its end even if the poll is
        cancelled: a lease taken for a poll that gave up goes to another
        waiting poll or is given back uncounted."""
        found: asyncio.Future[_Leased] = asyncio.get_running_loop().create_future()
        self._poll_waiters.append(found)
        if self._leaser is None or self._leaser.done():
            self._leaser = asyncio.ensure_future(self._lease_rounds())
            self._leasing.add(self._leaser)
            self._leaser.add_done_callback(self._leasing.discard)
        try:
            return await found
        except asyncio.CancelledError:
            # Handed a lease in the same step as the cancellation.
            if found.done() and not found.cancelled() and found.exception() is None:
                orphan = found.result()
                if isinstance(orphan, RedisDelivery):
                    self._spawn(orphan._release_uncounted())
            raise

    async def _lease_rounds(self) -> None:
        try:
            while True:
                asked = [f for f in self._poll_waiters if not f.done()]
                self._poll_waiters = list(asked)
                if not asked:
                    return
                try:
                    leased, idle = await self._lease(len(asked))
                except Exception as exc:
                    for f in asked:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                waiting = iter([f for f in self._poll_waiters if not f.done()])
                for item in leased:
                    taker = next(waiting, None)
                    if taker is not None:
                        taker.set_result(item)
                    elif isinstance(item, RedisDelivery):
                        self._spawn(item._release_uncounted())
                for f in asked:
                    if not f.done():
                        f.set_result(idle)
        except BaseException:
            self._maybe_orphans = True  # the script may have leased for them
            self._interrupt(self._poll_waiters, "polling")
            raise
        finally:
            self._poll_waiters = [f for f in self._poll_waiters if not f.done()]
            self._leaser = None

    def _spawn(self, coro: Any) -> None:
        async def quietly() -> None:
            with contextlib.suppress(TransportError):
                await coro

        task = asyncio.ensure_future(quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lease(self, n: int) -> tuple[list[RedisDelivery | None], tuple[str, int]]:
        """Up to ``n`` leases (``None`` for an undecodable entry, which is
        dead-lettered), and (newest entry id, ms until a delayed request is
        due) for the polls left without one."""
        try:
            reply = await self._script(
                _LEASE,
                self._keys,
                [self.group, self.consumer, self._lease_ms, self.max_attempts, n],
                f"polling {self.name}",
            )
        except TransientTransportError:
            # The script may have run and its reply been lost: an entry may
            # be pending for this consumer that nobody holds.
            self._maybe_orphans = True
            raise
        end = 3 + 5 * int(reply[2])
        dead = reply[end:]
        for i in range(0, len(dead) - 3, 4):
            self._report_dead(*dead[i : i + 4])
        leased: list[RedisDelivery | None] = []
        try:
            for i in range(3, end, 5):
                leased.append(await self._delivery(*reply[i : i + 5]))
        except BaseException:
            # Dead-lettering an undecodable entry failed: the leases of this
            # reply are handed to no poll; the next poll gives them back.
            for delivery in leased:
                if delivery is not None:
                    self._forget(delivery)
            self._maybe_orphans = True
            raise
        return leased, (_text(reply[0]), int(reply[1]))

    def _report_dead(
        self, raw_entry: Any, body: bytes | None, error: Any, carried: bytes | None
    ) -> None:
        """Report an entry the lease script dead-lettered with its attempts
        used up (an undecodable one has nobody to answer)."""
        if body is None:
            return
        with contextlib.suppress(UndecodableMessageError):
            request = decode_request(
                body,
                "redis",
                self.stream,
                _text(raw_entry),
                carried_id=_text(carried) if carried else None,
            )
            self._report_exhausted(request, _text(error))

    async def _delivery(
        self,
        raw_entry: Any,
        raw_count: Any,
        raw_attempt: Any,
        body: bytes | None,
        carried: bytes | None,
    ) -> RedisDelivery | None:
        entry, count, attempt = _text(raw_entry), int(raw_count), int(raw_attempt)
        try:
            if body is None:
                raise UndecodableMessageError("stream entry has no 'body' field")
            request = decode_request(
                body, "redis", self.stream, entry, carried_id=_text(carried) if carried else None
            )
        except UndecodableMessageError as exc:
            placeholder = WorkRequest(task="undecodable")
            await self._nack(
                RedisDelivery(placeholder, self, entry, count),
                0.0,
                str(exc),
                dead=True,
                carried="",
            )
            log.warning(
                "queue %r: dead-lettered an undecodable entry %s: %s", self.name, entry, exc
            )
            return None
        delivery = RedisDelivery(replace_fields(request, attempt=attempt), self, entry, count)
        self._held[entry] = delivery
        return delivery

    async def _sweep_orphans(self) -> None:
        """Give back (uncounted) entries pending for this consumer that no
        delivery of this handle holds: leases whose reply was lost."""
        try:
            with self._client.errors(f"checking leases of {self.name}"):
                pending = await self._client.redis.xpending_range(
                    self.stream, self.group, "-", "+", 1000, consumername=self.consumer
                )
        except TransportError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # No consumer group, so nothing pending for this consumer: the
            # lease that failed was the queue's first, during an outage
            # (the group was never made), or the server restarted without
            # its data. The next lease makes the group. This read raised
            # NOGROUP at every poll, as a permanent error, for good.
            self._group_ready = False
            self._maybe_orphans = False
            return
        for item in pending:
            entry = _text(item["message_id"])
            if entry in self._held:
                continue
            count = int(item["times_delivered"])
            await self._client.run(
                _RELEASE,
                [self.stream],
                [self.group, self.consumer, entry, count, max(count - 1, 0)],
                f"giving back a lease of {self.name}",
            )
        self._maybe_orphans = False

    # -- settling ----------------------------------------------------------
    def _lease_args(self, delivery: RedisDelivery) -> list[Any]:
        return [self.group, self.consumer, delivery._entry, delivery._count]

    async def _ack(self, delivery: RedisDelivery) -> bool:
        """Acks of this handle issued while an ack script is on its way go
        together in the next one (each checked on its own)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks.append((delivery, done))
        if self._acker is None or self._acker.done():
            self._acker = asyncio.ensure_future(self._ack_rounds())
            self._background.add(self._acker)
            self._acker.add_done_callback(self._background.discard)
        return await done

    async def _ack_rounds(self) -> None:
        batch: list[tuple[RedisDelivery, asyncio.Future[bool]]] = []
        try:
            while self._acks:
                batch, self._acks = self._acks, []
                args: list[Any] = [self.group, self.consumer]
                for delivery, _ in batch:
                    args += [delivery._entry, delivery._count]
                try:
                    replies = await self._client.run(
                        _ACK, [self.stream], args, f"settling on {self.name}"
                    )
                except Exception as exc:
                    for delivery, done in batch:
                        self._forget(delivery)
                        if not done.done():
                            done.set_exception(exc)
                    continue
                for (delivery, done), reply in zip(batch, replies, strict=True):
                    self._forget(delivery)
                    if not done.done():
                        done.set_result(bool(int(reply)))
        except BaseException:
            self._interrupt((done for _, done in [*batch, *self._acks]), "settling")
            self._acks = []
            raise
        finally:
            self._acker = None

    def _forget(self, delivery: RedisDelivery) -> None:
        if self._held.get(delivery._entry) is delivery:
            del self._held[delivery._entry]
        self._extended.pop(delivery._entry, None)

    async def _nack(
        self,
        delivery: RedisDelivery,
        delay: float,
        error: str,
        *,
        dead: bool,
        carried: str | None = None,
    ) -> bool:
        """Nack or dead-letter; ``carried``: the request id the re-added
        entry or dead letter keeps (default: the delivered one)."""
        reply = await self._client.run(
            _NACK,
            self._keys,
            [
                *self._lease_args(delivery),
                int(delay * 1000),
                error,
                1 if dead else 0,
                self.max_attempts,
                delivery.request.request_id if carried is None else carried,
            ],
            f"{'dead-lettering' if dead else 'nacking'} on {self.name}",
        )
        self._forget(delivery)
        return bool(int(reply))

    async def _release(self, delivery: RedisDelivery, *, uncounted: bool) -> bool:
        count = max(delivery._count - 1, 0) if uncounted else delivery._count
        reply = await self._client.run(
            _RELEASE,
            [self.stream],
            [*self._lease_args(delivery), count],
            f"giving back a lease of {self.name}",
        )
        self._forget(delivery)
        return bool(int(reply))

    async def _extend(self, delivery: RedisDelivery, span: float | None) -> bool:
        span = self.lease_seconds if span is None else span
        loop = asyncio.get_running_loop()
        if span > self.lease_seconds:
            # Longer than one lease: renewed in the background while this
            # handle lives (a crashed worker's lease still runs out).
            self._extended[delivery._entry] = loop.time() + span
            if self._keeper is None:
                self._keeper = asyncio.create_task(self._keep_extended())
            idle = 0
        else:
            self._extended.pop(delivery._entry, None)
            idle = int((self.lease_seconds - span) * 1000)
        reply = await self._client.run(
            _EXTEND,
            [self.stream],
            [*self._lease_args(delivery), idle],
            f"extending a lease on {self.name}",
        )
        if not int(reply):
            self._forget(delivery)
        return bool(int(reply))

    async def _keep_extended(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(max(self.lease_seconds / 3, 0.05))
            for entry, until in list(self._extended.items()):
                delivery = self._held.get(entry)
                if delivery is None:
                    self._extended.pop(entry, None)
                    continue
                left = until - loop.time()
                idle = (
                    0
                    if left > self.lease_seconds
                    else int((self.lease_seconds - max(left, 0)) * 1000)
                )
                if left <= self.lease_seconds:
                    self._extended.pop(entry, None)
                try:
                    reply = await self._client.run(
                        _EXTEND,
                        [self.stream],
                        [*self._lease_args(delivery), idle],
                        f"extending a lease on {self.name}",
                    )
                except TransportError as exc:
                    log.warning("queue %r: lease renewal failed: %s", self.name, exc)
                    continue
                if not int(reply):
                    self._extended.pop(entry, None)

    # -- inspection -------------------------------------------------------
    async def stats(self) -> QueueStats:
        self._check_open()
        length, delayed, dead, pending, released, heads = await self._client.run(
            _STATS, self._keys, [self.group, self._lease_ms], f"stats of {self.name}"
        )
        in_flight = int(pending) - int(released)
        enqueued: list[datetime] = []
        for flat in heads:
            body = _pairs(flat).get("body")
            if body is None:
                continue
            with contextlib.suppress(UndecodableMessageError):
                request = decode(WorkRequest, body)
                if request.enqueued_at is not None:
                    enqueued.append(request.enqueued_at)
        return QueueStats(
            queue=self.name,
            depth=int(length) + int(delayed) - in_flight,
            in_flight=in_flight,
            delayed=int(delayed),
            dead_lettered=int(dead),
            head_enqueued_at=min(enqueued) if enqueued else None,
        )

    async def _dead_entries(self, limit: int | None) -> list[tuple[str, dict[str, bytes]]]:
        self._check_open()
        with self._client.errors(f"reading dead letters of {self.name}"):
            rows = await self._client.redis.xrange(self.dlq, "-", "+", count=limit)
        return [(_text(entry), {_text(k): v for k, v in fields.items()}) for entry, fields in rows]

    def _dead_letter(self, entry: str, fields: dict[str, bytes]) -> DeadLetter:
        body = fields.get("body", b"")
        request_id = _text(fields.get("request_id", b"")) or None
        request = None
        with contextlib.suppress(UndecodableMessageError):
            request = decode_request(
                body, "redis", self.stream, _text(fields.get("source", b"")), carried_id=request_id
            )
        try:
            attempts = int(_text(fields.get("attempts", b"0")))
        except ValueError:
            attempts = 0
        return DeadLetter(
            queue=self.name,
            request_id=request.request_id if request is not None else request_id,
            request=request,
            raw=None if request is not None else bytes(body),
            error=_text(fields.get("error", b"")),
            attempts=attempts,
            dead_lettered_at=_entry_time(entry),
            dead_letter_id=entry,
        )

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return [self._dead_letter(e, f) for e, f in await self._dead_entries(limit)]

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        wanted = None if request_ids is None else set(request_ids)
        moving = []
        for entry, fields in await self._dead_entries(None):
            record = self._dead_letter(entry, fields)
            if record.request is None:
                continue  # undecodable dead letters stay where they are
            if wanted is not None and record.request_id not in wanted:
                continue
            # Each goes back as a first delivery, marked as requeued.
            moving += [entry, encode(requeued(record.request))]
        if not moving:
            return 0
        moved = await self._client.run(
            _REQUEUE, [self.stream, self.dlq], moving, f"requeueing dead letters of {self.name}"
        )
        return int(moved)

    async def replace_dead_letter(self, dead_letter_id: str, request: WorkRequest) -> bool:
        self._check_open()
        with self._client.errors(f"reading dead letters of {self.name}"):
            try:
                found = await self._client.redis.xrange(
                    self.dlq, dead_letter_id, dead_letter_id, count=1
                )
            except rex.ResponseError:  # not a stream entry id
                return False
        if not found:
            return False
        await self.enqueue(requeued(request))
        with self._client.errors(f"removing dead letter {dead_letter_id} of {self.name}"):
            await self._client.redis.xdel(self.dlq, dead_letter_id)
        return True

    # -- close --------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._client.closed:
            return
        try:
            async with asyncio.timeout(self._client.request_timeout * 2):
                if self._leasing:
                    await asyncio.gather(*self._leasing, return_exceptions=True)
                if self._background:
                    await asyncio.gather(*self._background, return_exceptions=True)
                # Handed out and not settled: back for redelivery, counted
                # (a handler had it).
                held, self._held = list(self._held.values()), {}
                for delivery in held:
                    with contextlib.suppress(TransportError):
                        await self._release(delivery, uncounted=False)
                        delivery._settled = True
                if self._group_ready:
                    # Anything else pending for this consumer was never
                    # handed out (a lost reply): back uncounted; then the
                    # consumer itself goes, so groups do not collect them.
                    with contextlib.suppress(TransportError):
                        await self._sweep_orphans()
                        await self._client.run(
                            _DELETE_CONSUMER,
                            [self.stream],
                            [self.group, self.consumer],
                            f"closing a consumer of {self.name}",
                        )
        except TimeoutError:
            log.info("queue %r: close did not finish; leases run out by themselves", self.name)
