"""Every public name of every package imports cleanly."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGES = [
    "transport",
    "transport.errors",
    "transport.kit",
    "transport.testing",
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


BACKENDS = ["transport_inprocess", "transport_kafka", "transport_nats", "transport_pulsar"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", BACKENDS)
def test_backends_use_only_public_core_names(package: str) -> None:
    """A backend is built from ``transport`` and ``transport.kit`` (and its
    own modules), so a third-party backend can be built the same way."""
    private = []
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            for module in modules:
                parts = module.split(".")
                if parts[0] == "transport" and any(part.startswith("_") for part in parts[1:]):
                    private.append(f"{path.name}:{node.lineno} imports {module}")
    assert not private, "\n".join(private)
