"""The queue conformance scenarios on a ``Key_Shared`` subscription
(option ``subscription_type="key_shared"``; the key is the request id)."""

from __future__ import annotations

from typing import Any

import pytest

from transport import Transport
from transport.testing import RequestQueueConformance
from transport.testing.harness import BackendHarness

from .conftest import PulsarHarness, PulsarLiteBroker, make_config


class TestPulsarKeySharedQueue(RequestQueueConformance):
    # test_competing_workers_never_hold_the_same_request once failed here in
    # CI (a request held by two workers at once): a worker's refused
    # subscribe disconnected its own working consumer on pulsar-lite (see
    # test_pulsar_lite_gaps.py); each consumer now has a client of its own.
    @pytest.fixture
    def transport_harness(
        self, pulsar_url: str, pulsar_broker: PulsarLiteBroker | None
    ) -> PulsarHarness:
        config = make_config(pulsar_url)
        options = {**config.options, "subscription_type": "key_shared"}
        return PulsarHarness(config.model_copy(update={"options": options}), pulsar_broker)

    @pytest.mark.xfail(
        strict=False,
        reason=(
            "Key_Shared pins each key (the request id) to one consumer: a request whose lease "
            "expired is redelivered to the consumer whose hash range holds its key. Here that is "
            "the stale holder's (which nobody polls) for about half of the request ids, so the "
            "rival worker gets it only when the key hashes to the rival's range (measured with "
            "the raw client: after a second consumer joined, 10 of 20 nacked keys came back to "
            "the first). The outcome depends on the random request id, hence not strict."
        ),
    )
    async def test_long_handler_without_extending_is_redelivered(
        self,
        transport: Transport,
        queue_name: str,
        harness: BackendHarness,
        make_transport: Any,
    ) -> None:
        await super().test_long_handler_without_extending_is_redelivered(
            transport, queue_name, harness, make_transport
        )
