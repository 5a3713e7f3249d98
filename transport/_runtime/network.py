"""The client side: send requests to other ensembles and await the answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

from transport._ops.tracing import TRACEPARENT, child_traceparent, current_traceparent
from transport._runtime.outbox import Outbox
from transport._spi.models import Capability, WorkRequest, WorkResponse
from transport._spi.naming import validate_name
from transport._spi.priority import PriorityRequestQueue
from transport._spi.queue import RequestQueue
from transport._spi.registries import CapabilityRegistry, DeliveryRegistry, PendingDelivery
from transport._spi.transport import Transport
from transport.errors import TransientTransportError, TransportError

__all__ = ["Network", "NoProviderError"]

log = logging.getLogger("transport.network")


#: How long withdrawing the registration of a request not sent may take.
_WITHDRAW_S = 5.0


class NoProviderError(TransportError, LookupError):
    """No live ensemble advertises the requested task."""


class Network:
    """A caller's view of the ensemble network.

    ``caller`` names its delivery registry (inbox): responses to its requests
    are routed there, so after a restart a new ``Network`` with the same
    ``caller`` re-attaches with :meth:`pending` / :meth:`collect`.

    Targets are ensemble names, or ``None`` to pick any live provider of the
    task from the capability registry. The target's queue and priority levels
    come from its advertisement; an ensemble not advertised now is reached
    where its last advertisement this network saw said (it is restarting),
    else at the queue of its name with ``default_levels`` levels.
    Priorities default to the middle level.

    With an ``outbox``, :meth:`send` keeps working while the broker is
    unreachable: a request for a named ensemble is stored locally (for its
    queue with ``default_levels``) and the outbox registers the caller's
    pending record and sends the request once the broker is back; the handle
    returned waits for that record and its response.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        caller: str,
        outbox: Outbox | None = None,
        default_levels: int = 1,
        register_timeout: float = 5.0,
    ) -> None:
        self.transport = transport
        self.caller = validate_name(caller, "caller name")
        self.outbox = outbox
        self.default_levels = default_levels
        #: With an outbox: how long ``send`` tries to look the target up and
        #: to register the pending record on the broker before leaving that
        #: to the outbox.
        self.register_timeout = register_timeout
        self._inbox: DeliveryRegistry | None = None
        self._capabilities: CapabilityRegistry | None = None
        self._queues: dict[tuple[str, int], RequestQueue] = {}
        #: Per target ensemble: the queue and levels of its last advertisement
        #: seen, used while it is not advertised (a restart between two runs).
        self._known: dict[str, tuple[str, int]] = {}

    @property
    def inbox(self) -> DeliveryRegistry:
        """This caller's delivery registry (named ``caller``), opened on first
        use and then reused; responses to every request sent through this
        network are recorded there.

        Raises: ClosedResourceError if the transport is closed (first use).
        """
        if self._inbox is None:
            self._inbox = self.transport.delivery_registry(self.caller)
        return self._inbox

    @property
    def capabilities(self) -> CapabilityRegistry:
        """The deployment's capability registry, opened on first use and
        then reused (where targets are looked up).

        Raises: ClosedResourceError if the transport is closed (first use).
        """
        if self._capabilities is None:
            self._capabilities = self.transport.capability_registry()
        return self._capabilities

    async def discover(self, task: str) -> list[Capability]:
        """Live (unexpired) providers of ``task``, sorted by ensemble name;
        empty if there are none.

        Guarantees: eventually consistent (as :meth:`CapabilityRegistry.lookup`):
        an advertisement made elsewhere shows up once the registry has seen it.
        Raises: InvalidNameError for a bad task name; ClosedResourceError;
        PermanentTransportError if the registry cannot be read at all (auth,
        configuration). A transient outage before the registry's first load
        makes the call wait (it retries) rather than raise.
        """
        return await self.capabilities.lookup(task)

    async def _resolve(self, target: str | None, task: str) -> tuple[str, int]:
        providers = await self.capabilities.lookup(task)
        if target is not None:
            validate_name(target, "ensemble name")
            providers = [p for p in providers if p.ensemble == target]
            if not providers:
                # Not advertised now (restarting, or never): where it was
                # last seen, so a request keeps its level across a restart.
                return self._known.get(target, (target, self.default_levels))
        if not providers:
            raise NoProviderError(f"no live ensemble advertises task {task!r}")
        chosen = random.choice(providers)
        where = (chosen.queue or chosen.ensemble, chosen.priority_levels)
        self._known[chosen.ensemble] = where
        return where

    def _queue(self, name: str, levels: int) -> RequestQueue:
        queue = self._queues.get((name, levels))
        if queue is None:
            if levels > 1:
                queue = self.transport.priority_queue(name, levels=levels)
            else:
                queue = self.transport.request_queue(name)
            self._queues[(name, levels)] = queue
        return queue

    async def send(
        self,
        target: str | None,
        task: str,
        payload: Any = None,
        *,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> PendingDelivery:
        """Send a request and return a handle to collect the response later
        (fire-and-forget until you await it).

        Guarantees: the pending record is durable before the request is sent,
        so the response is never lost, even if this process restarts.
        Raises: NoProviderError, ValueError (bad priority), the queue's errors.
        """
        try:
            if self.outbox is None or target is None:
                queue_name, levels = await self._resolve(target, task)
            else:
                # The registry's first load waits through an outage (it
                # retries): bounded here, so the outbox can take over.
                async with asyncio.timeout(self.register_timeout):
                    queue_name, levels = await self._resolve(target, task)
        except (TransientTransportError, TimeoutError):
            if self.outbox is None or target is None:
                raise
            # Broker unreachable: the outbox holds the request for the named
            # ensemble, at its queue with the default levels.
            validate_name(target, "ensemble name")
            queue_name, levels = target, self.default_levels
        level = levels // 2 if priority is None else priority
        if not isinstance(level, int) or isinstance(level, bool):  # "1", 1.0, True
            raise ValueError(f"priority must be an int, got {level!r}")
        level = int(level)  # an IntEnum's value
        if not 0 <= level < levels:
            unseen = target is not None and target not in self._known
            hint = (
                " (no live ensemble advertises its levels and this caller never saw them: "
                "pass Network(default_levels=N))"
                if unseen
                else ""
            )
            raise ValueError(
                f"priority must be in 0..{levels - 1} for {queue_name!r}, got {level}{hint}"
            )
        headers = dict(headers or {})
        headers.setdefault(TRACEPARENT, child_traceparent(current_traceparent()))
        request = WorkRequest(
            task=task,
            payload=payload,
            reply_to=self.caller,
            priority=level,
            headers=headers,
            **({"request_id": request_id} if request_id else {}),
            **fields,
        )
        # A re-send under an id that is live returns the existing record:
        # a failed or cancelled re-send must not withdraw it (it deleted the
        # first send's response).
        live = bool(request_id) and await self.inbox._is_registered(request.request_id)
        if self.outbox is None:
            queue = self._queue(queue_name, levels)
            try:
                pending = await self.inbox.register(request.request_id)
                if isinstance(queue, PriorityRequestQueue):
                    await queue.enqueue(request, priority=level)
                else:
                    await queue.enqueue(request)
            except BaseException:
                # Not sent, or the caller gave up (a timeout or a cancelled
                # task is not a kill): its registration would stay pending
                # until the registry's TTL (days), listed by pending() after
                # every restart and never answered. (If the broker stored the
                # request after all, the ensemble finds no registration and
                # does not run it.)
                if not live:
                    await self._withdraw(request.request_id)
                raise
            return pending
        deferred = False
        try:
            async with asyncio.timeout(self.register_timeout):
                pending = await self.inbox.register(request.request_id)
        except (TransientTransportError, TimeoutError) as exc:
            # Broker unreachable: the outbox registers the pending record
            # before it sends the request, so the response still finds us.
            log.info(
                "caller %s: %s is registered through the outbox (%s)",
                self.caller,
                request.request_id,
                exc or "timed out",
            )
            deferred = True
            pending = PendingDelivery(self.inbox, request.request_id, registration_deferred=True)
        try:
            await self.outbox.enqueue(queue_name, request, levels=levels, register=deferred)
        except BaseException:
            if not deferred and not live:
                await self._withdraw(request.request_id)
            raise
        return pending

    async def _withdraw(self, request_id: str) -> None:
        """Discard the registration of a request that was not sent, within
        :data:`_WITHDRAW_S` (best effort: a broker that is down keeps it)."""
        with contextlib.suppress(TransportError, TimeoutError):
            async with asyncio.timeout(_WITHDRAW_S):
                await self.inbox.discard(request_id)

    async def request(
        self,
        target: str | None,
        task: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> WorkResponse:
        """Send a request and wait for its response.

        Raises: DeliveryTimeoutError (the request stays pending: collect it
        later), NoProviderError, and as :meth:`send`.
        """
        pending = await self.send(target, task, payload, **kw)
        return await pending.result(timeout)

    async def pending(self) -> list[PendingDelivery]:
        """Handles on this caller's requests still awaiting collection
        (pending or answered, not yet collected), oldest first — how a
        restarted caller re-attaches.

        Guarantees: includes every request whose :meth:`send` returned (its
        record was durable first), unless collected or expired since.
        Raises: ClosedResourceError; PermanentTransportError if the inbox
        cannot be read at all. A transient outage before the inbox's first
        load makes the call wait (it retries) rather than raise.
        """
        return await self.inbox.pending()

    async def collect(self, request_id: str, timeout: float | None = None) -> WorkResponse:
        """The response to an earlier request of this caller (possibly sent by
        a previous run of this process), waiting up to ``timeout`` for it.

        Guarantees: as :meth:`PendingDelivery.result`: on timeout the request
        stays pending and can be collected later; once collected, the record
        is tombstoned.
        Raises: InvalidNameError for a malformed id; UnknownDeliveryError if
        no live record exists (never sent by this caller, already collected,
        or expired); DeliveryTimeoutError; ClosedResourceError;
        TransientTransportError if the collection cannot be recorded.
        """
        return await (await self.inbox.wait(request_id)).result(timeout)
