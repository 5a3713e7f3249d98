"""Placeholder replaced below."""

from __future__ import annotations

from typing import Any

RedisEventBus: Any = None
RedisEventLog: Any = None
