"""Lifecycle scenarios: a forgotten ``aclose()`` (the interpreter still
exits), and messages written by another program (TESTING.md lifecycle)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from typing import Any

import pytest

from transport import Transport
from transport.testing.harness import BackendHarness

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]

#: How long after its last line a script that forgot ``aclose()`` may take
#: to exit (``asyncio.run`` cancelling what was left running).
EXIT_WITHIN_S = 5.0


class ForgottenCloseConformance:
    """Subclass it in the backend's tests, no body."""

    async def test_script_that_forgets_aclose_still_exits(
        self, harness: BackendHarness, queue_name: str
    ) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "transport.testing.forgotten_close",
            "--ensemble",
            queue_name,
            "--caller",
            f"front-{uuid.uuid4().hex[:8]}",
            "--timeout",
            str(harness.scaled(40)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=harness.subprocess_env(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        stderr_task = asyncio.ensure_future(proc.stderr.read())
        try:
            async with asyncio.timeout(harness.scaled(50)):
                line = await proc.stdout.readline()
            answered = time.monotonic()
            assert line.decode().strip() == "RESPONSE completed", (
                f"no response: {line!r}; stderr: {(await stderr_task).decode()[-2000:]}"
            )
            try:
                async with asyncio.timeout(EXIT_WITHIN_S):
                    rest = await proc.stdout.read()
                    code = await proc.wait()
            except TimeoutError:
                raise AssertionError(
                    f"the script returned from main() without aclose() but the interpreter"
                    f" had not exited {EXIT_WITHIN_S} s later"
                ) from None
            took = time.monotonic() - answered
            assert code == 0, f"exit code {code}; stderr: {(await stderr_task).decode()[-2000:]}"
            assert rest.decode().split() == ["EXITING"], rest
            assert took < EXIT_WITHIN_S
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            stderr_task.cancel()


class ForeignMessageConformance:
    """Requests written by another program straight to the broker: the id
    and the attempt count come from the backend, not from the body."""

    async def test_request_without_id_keeps_one_id_across_redeliveries(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        first_client: Transport = await make_transport()
        body = json.dumps({"task": "foreign", "payload": {"from": "elsewhere"}}).encode()
        await harness.inject_raw(first_client, queue_name, body)
        queue = first_client.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        first = await queue.poll(harness.scaled(30))
        assert first is not None, "the foreign request was never delivered"
        assert (first.request.task, first.request.payload, first.attempt) == (
            "foreign",
            {"from": "elsewhere"},
            1,
        )
        request_id = first.request.request_id
        # Released by closing its client: the same message again, decoded by
        # another client, which must derive the same id.
        await first_client.aclose()
        other = (await make_transport()).request_queue(
            queue_name, lease_seconds=harness.lease_seconds
        )
        second = await other.poll(harness.scaled(30))
        assert second is not None, "the released foreign request was never redelivered"
        assert (second.request.request_id, second.attempt) == (request_id, 2), (
            f"first delivery had id {request_id!r}"
        )
        # A nack with an error: some backends deliver a re-published copy of
        # the message; same id still.
        assert await second.nack(error="handler failed")
        third = await other.poll(harness.scaled(30))
        assert third is not None, "the nacked foreign request was never redelivered"
        assert (third.request.request_id, third.attempt) == (request_id, 3)
        assert await third.ack()

    async def test_attempt_in_the_body_is_ignored(
        self, harness: BackendHarness, queue_name: str, transport: Transport
    ) -> None:
        body = json.dumps({"request_id": "foreign-4", "task": "foreign", "attempt": 4}).encode()
        await harness.inject_raw(transport, queue_name, body)
        queue = transport.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        first = await queue.poll(harness.scaled(30))
        assert first is not None, "the foreign request was never delivered"
        assert (first.request.request_id, first.attempt) == ("foreign-4", 1)
        assert await first.nack()
        second = await queue.poll(harness.scaled(30))
        assert second is not None, "the nacked foreign request was never redelivered"
        assert (second.request.request_id, second.attempt) == ("foreign-4", 2)
        assert await second.ack()

    async def test_dead_letter_of_a_request_without_id_keeps_the_delivered_id(
        self, harness: BackendHarness, queue_name: str, transport: Transport
    ) -> None:
        body = json.dumps({"task": "foreign", "payload": {"n": 7}}).encode()
        await harness.inject_raw(transport, queue_name, body)
        queue = transport.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        delivery = await queue.poll(harness.scaled(30))
        assert delivery is not None, "the foreign request was never delivered"
        assert await delivery.dead_letter("refused by the handler")
        request_id = delivery.request.request_id
        dead = await queue.dead_letters()
        assert len(dead) == 1, f"dead letters: {dead}"
        assert dead[0].request is not None
        assert (dead[0].request_id, dead[0].request.request_id) == (request_id, request_id)
        assert await queue.requeue_dead_letters() == 1
        back = await queue.poll(harness.scaled(30))
        assert back is not None, "the requeued foreign request was never delivered"
        assert (back.request.request_id, back.attempt) == (request_id, 1)
        assert await back.ack()
