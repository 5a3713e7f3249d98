"""The NATS client bridge: request/reply on one reply subscription for the
hot paths, PubAck checks and broker object names. Used by the transport and
by every queue, registry and log (which import it from here, not from the
transport module)."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

__all__ = ["Requests", "broker_name", "check_puback"]


class Requests:
    """Request/reply on one wildcard reply subscription, for the hot paths
    (PubAcks, acknowledgements): a counter for the reply token and one sweep
    for timeouts instead of a timer per request (what ``nc.request`` does).
    Timeouts raise ``nats.errors.TimeoutError`` like ``nc.request``; a reply
    lost with a reconnect times out the same way."""

    def __init__(self, nc: NatsClient, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout
        self._prefix = ""
        self._tokens = itertools.count()
        self._waiting: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._prefix = self._nc.new_inbox() + "."
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._sweeper = asyncio.create_task(self._sweep())

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject, None)
        if entry is None or entry[0].done():
            return
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            entry[0].set_exception(nats.errors.NoRespondersError())
        else:
            entry[0].set_result(msg)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        period = min(max(self._timeout / 10, 0.01), 0.25)
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            late = [t for t, (_, deadline) in self._waiting.items() if deadline <= now]
            for token in late:
                future, _ = self._waiting.pop(token)
                if not future.done():
                    future.set_exception(nats.errors.TimeoutError())

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> Msg:
        if self._sub is None:
            raise nats.errors.ConnectionClosedError
        loop = asyncio.get_running_loop()
        token = f"{self._prefix}{next(self._tokens)}"
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = (future, loop.time() + self._timeout)
        try:
            await self._nc.publish(subject, payload, reply=token, headers=headers)
            return await future
        finally:
            self._waiting.pop(token, None)

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sub = None
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())


def check_puback(reply: Msg) -> None:
    """Raise the JetStream error carried by a PubAck, if any (what
    ``js.publish`` does, without building a PubAck object nobody reads)."""
    if b'"error"' in reply.data:
        answer = json.loads(reply.data)
        if "error" in answer:
            raise nats.js.errors.APIError.from_error(answer["error"])


def broker_name(namespace: str, *parts: str) -> str:
    """Stream/bucket name from validated parts, joined by the reserved ``__``."""
    return "__".join((namespace, *parts))
