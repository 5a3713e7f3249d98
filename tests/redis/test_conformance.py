"""The whole conformance suite on ``redis://`` (a real redis-server)."""

from __future__ import annotations

from transport.testing import (
    BrokerOutageConformance,
    BrokerRestartConformance,
    CapabilityRegistryConformance,
    CleanRestartConformance,
    CrashConformance,
    DefaultConfigurationConformance,
    DeliveryRegistryConformance,
    EventBusConformance,
    EventLogConformance,
    ForeignMessageConformance,
    ForgottenCloseConformance,
    NamespaceConformance,
    PriorityAsRequestQueueConformance,
    PriorityQueueConformance,
    ProvisioningConformance,
    RequestQueueConformance,
    UnreachableBrokerConformance,
)
from transport_redis import RedisTransport


class TestRedisQueue(RequestQueueConformance): ...


class TestRedisPriority(PriorityQueueConformance): ...


class TestRedisPriorityAsQueue(PriorityAsRequestQueueConformance): ...


class TestRedisDeliveryRegistry(DeliveryRegistryConformance): ...


class TestRedisCapabilityRegistry(CapabilityRegistryConformance): ...


class TestRedisCrash(CrashConformance): ...


class TestRedisEventBus(EventBusConformance): ...


class TestRedisEventLog(EventLogConformance): ...


class TestRedisProvisioning(ProvisioningConformance): ...


class TestRedisBrokerRestart(BrokerRestartConformance): ...


class TestRedisBrokerOutage(BrokerOutageConformance): ...


class TestRedisCleanRestart(CleanRestartConformance): ...


class TestRedisUnreachable(UnreachableBrokerConformance):
    transport_class = RedisTransport
    url_template = "redis://127.0.0.1:{port}"
    timeout_option = "connect_timeout"


class TestRedisNamespaces(NamespaceConformance): ...


class TestRedisForgottenClose(ForgottenCloseConformance): ...


class TestRedisForeignMessages(ForeignMessageConformance): ...


class TestRedisDefaultConfiguration(DefaultConfigurationConformance):
    """Default settings and a user's poll(timeout=5) loop (no test tuning)."""
