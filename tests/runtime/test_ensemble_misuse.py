"""Common mistakes with the Ensemble's task API fail with a message that
says what to write instead."""

from __future__ import annotations

import pytest

from transport import Ensemble, Network, connect


async def test_task_without_parentheses_is_refused_at_once() -> None:
    transport = await connect("memory://misuse-a")
    try:
        ensemble = Ensemble("misuse", transport=transport)
        with pytest.raises(TypeError, match=r"@ensemble.task\(\)"):

            @ensemble.task  # type: ignore[arg-type]
            async def cook(ctx: object) -> int:
                return 1

        assert ensemble.tasks == {}
    finally:
        await transport.aclose()


async def test_a_plain_def_handler_fails_the_request_at_once_saying_why() -> None:
    transport = await connect("memory://misuse-b")
    try:
        ensemble = Ensemble("misuse", transport=transport)

        @ensemble.task("cook")
        def cook(ctx: object) -> dict[str, int]:  # not async
            return {"ok": 1}

        caller = Network(transport, caller="misuse-caller")
        async with ensemble:
            response = await caller.request("misuse", "cook", {}, timeout=10)
        assert response.status == "failed"
        assert "async def" in (response.error or ""), response.error
        [dead] = await transport.request_queue("misuse").dead_letters()
        assert dead.attempts == 1  # not retried
    finally:
        await transport.aclose()
