"""The NATS request/response floor of ``python -m benchmarks.floors --nats``
on the session's server, at a tiny size: it makes the durable steps it
claims (every request acked with the server's confirmation, both keys of
every request written and then deleted, so nothing is left live) and runs
to the end beside FastStream and an ``Ensemble``. Not a timed assertion."""

from __future__ import annotations

from typing import Any

import nats.js.errors
import pytest

from benchmarks import floors

pytestmark = [pytest.mark.timeout(120)]

N = 60


async def test_the_floor_acks_every_request_and_collects_every_answer(nats_url: str) -> None:
    seen: dict[str, Any] = {}

    async def inspect(js: Any, stream: str, bucket: str) -> None:
        seen["stream"] = (await js.stream_info(stream)).state
        seen["consumer"] = await js.consumer_info(stream, "w")
        kv = await js.key_value(bucket)
        seen["bucket"] = (await js.stream_info(f"KV_{bucket}")).state
        try:
            seen["live"] = await kv.keys()
        except nats.js.errors.NoKeysError:
            seen["live"] = []

    assert await floors.nats_ensemble_floor(nats_url, N, inspect=inspect) > 0
    requests = N + 1  # and the warm-up
    assert seen["stream"].messages == 0, "a work-queue stream keeps what is not acked"
    assert seen["consumer"].num_ack_pending == 0
    assert seen["consumer"].delivered.stream_seq == requests
    assert seen["live"] == [], "every registration and answer was collected"
    # Two keys per request, each written once and deleted once (history 1:
    # the delete marker is what the bucket keeps of each).
    assert seen["bucket"].last_seq == 4 * requests
    assert seen["bucket"].messages == 2 * requests


async def test_the_floor_row_runs_beside_faststream_and_ours(nats_url: str) -> None:
    name, target, base, floor, ours = floors._nats_case(nats_url, 1000)
    assert name == "nats ensemble request/response (vs FastStream)" and target == 1.0
    for measure in (base, floor, ours):
        assert await measure() > 0
