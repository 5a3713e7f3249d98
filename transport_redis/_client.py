"""The redis-py bridge: one asyncio client (a connection pool) per
transport, the key names of every object the backend stores, and Lua
scripts that survive a server restart. Used by the transport and by every
queue, registry and log (which import it from here, not from the transport
module).

Key names (``ns`` = ``TransportConfig.namespace``; every name is validated
``[A-Za-z0-9_-]`` without ``__`` before it gets here, except the library's
own ``name__p0`` level suffixes, so no ``:``, ``{``, ``}``, glob characters or
whitespace reach a key). The braces are a Redis Cluster hash tag: every key
of one queue, registry or log stream lives in the same slot, which the
multi-key Lua scripts need there.

======================================  ==========================================
queue stream (consumer group)           ``ns:q:{name}``
dead-letter stream                      ``ns:q:{name}:dlq``
delayed requests (sorted set)           ``ns:q:{name}:delayed``
registry state (hash) / changes         ``ns:kv:{kind:name}`` / ``ns:kv:{kind:name}:log``
event-log stream / its cursors (hash)   ``ns:log:{stream}`` / ``ns:log:{stream}:cursors``
event-bus channel of subject ``s``      ``ns:ev:s``
======================================  ==========================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from transport.errors import ClosedResourceError
from transport_redis._errors import map_redis_errors

if TYPE_CHECKING:
    from transport import TransportConfig
    from transport_redis._config import RedisEndpoint, RedisOptions

__all__ = ["RedisClient", "Script", "keys"]

Script = AsyncScript


class keys:
    """Key and channel names of the objects of namespace ``ns``."""

    @staticmethod
    def queue(ns: str, name: str) -> str:
        return f"{ns}:q:{{{name}}}"

    @staticmethod
    def dead_letters(ns: str, name: str) -> str:
        return f"{ns}:q:{{{name}}}:dlq"

    @staticmethod
    def delayed(ns: str, name: str) -> str:
        return f"{ns}:q:{{{name}}}:delayed"

    @staticmethod
    def registry(ns: str, kind: str, name: str) -> str:
        return f"{ns}:kv:{{{kind}:{name}}}"

    @staticmethod
    def registry_changes(ns: str, kind: str, name: str) -> str:
        return f"{ns}:kv:{{{kind}:{name}}}:log"

    @staticmethod
    def event_stream(ns: str, stream: str) -> str:
        return f"{ns}:log:{{{stream}}}"

    @staticmethod
    def event_cursors(ns: str, stream: str) -> str:
        return f"{ns}:log:{{{stream}}}:cursors"

    @staticmethod
    def channel(ns: str, subject: str) -> str:
        return f"{ns}:ev:{subject}"


class RedisClient:
    """The transport's connection pool, as the queues, registries and logs
    use it: ``redis`` for commands, :meth:`script` for Lua scripts (EVALSHA,
    loaded again after a server restart), :meth:`errors` for the one error
    mapping, and ``closed``."""

    def __init__(self, redis: aioredis.Redis, where: str, request_timeout: float) -> None:
        # Typed loosely on purpose: redis-py annotates every reply as the
        # union of its RESP2 and RESP3 shapes (and sync and async), which
        # says nothing here; the shapes this backend reads are RESP2 with
        # bytes (decode_responses off), checked by the tests.
        self.redis: Any = redis
        self.where = where
        self.request_timeout = request_timeout
        self.closed = False
        self._scripts: dict[str, AsyncScript] = {}

    def script(self, source: str) -> AsyncScript:
        """The script object of ``source`` (registered once per client)."""
        found = self._scripts.get(source)
        if found is None:
            found = self._scripts[source] = self.redis.register_script(source)
        return found

    async def run(self, source: str, keys: list[str], args: list[Any], what: str) -> Any:
        """Run a Lua script; errors mapped.

        Raises: ClosedResourceError, TransientTransportError,
        PermanentTransportError.
        """
        self.check_open()
        with self.errors(what):
            return await self.script(source)(keys=keys, args=args)

    def check_open(self) -> None:
        if self.closed:
            raise ClosedResourceError(f"the Redis client of {self.where} is closed")

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        with map_redis_errors(what, self.where):
            yield


class RedisContext:
    """What the children of one transport (queues, keyed logs, the event bus
    and log, the doctor) share: the client, the configuration, the validated
    options and the endpoint, the server's version once connected, and
    ``check_open`` (raises ``ClosedResourceError`` once the transport is
    closed). Built once by the transport; children keep it and never see the
    transport."""

    __slots__ = ("check_open", "client", "config", "endpoint", "options", "server_version")

    def __init__(
        self,
        client: RedisClient,
        config: TransportConfig,
        options: RedisOptions,
        endpoint: RedisEndpoint,
        check_open: Callable[[], None],
    ) -> None:
        self.client = client
        self.config = config
        self.options = options
        self.endpoint = endpoint
        self.check_open = check_open
        #: ``redis_version`` of the server (empty before connecting).
        self.server_version = ""
