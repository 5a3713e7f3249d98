from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from transport import Transport, connect


@pytest.fixture(params=["memory", "sqlite"])
def runtime_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://runtime-{uuid.uuid4().hex[:8]}"
    return f"sqlite:///{tmp_path / 'runtime.db'}?poll_interval=0.02"


@pytest_asyncio.fixture
async def transport(runtime_url: str) -> AsyncIterator[Transport]:
    t = await connect(runtime_url, lease_seconds=2.0, capability_lease_seconds=2.0)
    yield t
    await t.aclose()
