"""Every public name of every package imports cleanly."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "transport",
    "transport.errors",
    "transport.testing",
    "transport.testing.brokers",
    "transport.sync",
    "transport_inprocess",
    "transport_kafka",
    "transport_nats",
    "transport_pulsar",
]


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_import(package: str) -> None:
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    assert names, f"{package} must declare __all__"
    for name in names:
        assert getattr(module, name, None) is not None, f"{package}.{name} is missing"
    assert len(set(names)) == len(names)
