"""The queue conformance scenarios on a ``Key_Shared`` subscription
(option ``subscription_type="key_shared"``; the key is the request id)."""

from __future__ import annotations

import pytest

from transport.testing import RequestQueueConformance

from .conftest import PulsarHarness, PulsarLiteBroker, make_config


class TestPulsarKeySharedQueue(RequestQueueConformance):
    @pytest.fixture
    def transport_harness(
        self, pulsar_url: str, pulsar_broker: PulsarLiteBroker | None
    ) -> PulsarHarness:
        config = make_config(pulsar_url)
        options = {**config.options, "subscription_type": "key_shared"}
        return PulsarHarness(config.model_copy(update={"options": options}), pulsar_broker)
