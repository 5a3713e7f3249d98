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
    "transport.interop.agentensemble",
    "transport.testing",
    "transport.testing.brokers",
    "transport.sync",
    "transport_inprocess",
    "transport_kafka",
    "transport_nats",
    "transport_pulsar",
    "transport_redis",
]


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_import(package: str) -> None:
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    assert names, f"{package} must declare __all__"
    for name in names:
        assert getattr(module, name, None) is not None, f"{package}.{name} is missing"
    assert len(set(names)) == len(names)


BACKENDS = [
    "transport_inprocess",
    "transport_kafka",
    "transport_nats",
    "transport_pulsar",
    "transport_redis",
]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", BACKENDS)
def test_backends_use_only_public_core_names(package: str) -> None:
    """A backend is built from ``transport`` and ``transport.kit`` (and its
    own modules), so a third-party backend can be built the same way."""
    private = []
    for path in sorted((ROOT / package).rglob("*.py")):  # subpackages too
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            for module in modules:
                parts = module.split(".")
                if parts[0] == "transport" and any(part.startswith("_") for part in parts[1:]):
                    private.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
    assert not private, "\n".join(private)


def _imports(path: Path, module: str) -> set[str]:
    """Library modules ``module`` imports anywhere in its code (functions
    included: an import hidden in a function is still a dependency), except
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for child in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found - {module}


def test_no_import_cycles_between_library_modules() -> None:
    modules: dict[str, Path] = {}
    for package in ["transport", *BACKENDS]:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    graph = {name: _imports(path, name) & modules.keys() for name, path in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


#: What each core subpackage may import from the library: the SPI only
#: itself, operations the SPI, the runtime both (besides ``transport.errors``).
LAYERS = {
    "transport._spi": ("transport._spi",),
    "transport._ops": ("transport._spi", "transport._ops"),
    "transport._runtime": ("transport._spi", "transport._ops", "transport._runtime"),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_core_layers_import_only_downwards(layer: str) -> None:
    """The SPI never imports the runtime or operations, operations never the
    runtime, and no core subpackage imports a public module built on top
    (``transport``, ``transport.kit``, ``transport.sync``, ``transport.cli``, ...)."""
    allowed = LAYERS[layer]
    wrong = []
    paths = sorted((ROOT / Path(*layer.split("."))).glob("*.py"))
    assert paths, f"{layer} has no modules"
    for path in paths:
        name = f"{layer}.{path.stem}"
        for target in _imports(path, name):
            if target.split(".")[0] != "transport" or target.startswith("transport.errors"):
                continue
            if not any(target == ok or target.startswith(f"{ok}.") for ok in allowed):
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong, "\n".join(sorted(set(wrong)))


#: Backends whose children get a context object from ``_client``.
CONTEXT_BACKENDS = [
    "transport_kafka",
    "transport_nats",
    "transport_pulsar",
    "transport_inprocess.memory",
    "transport_inprocess.sqlite",
    "transport_redis",
]


@pytest.mark.parametrize("package", CONTEXT_BACKENDS)
def test_backend_children_never_import_the_transport_module(package: str) -> None:
    """Queues, registries, logs, engines and doctors get the backend's
    context (from ``_client``), never the transport: only ``__init__`` and
    ``_transport`` itself import ``<package>._transport``, and no other
    module does, not even under ``if TYPE_CHECKING:``."""
    target = f"{package}._transport"
    paths = sorted((ROOT / Path(*package.split("."))).glob("*.py"))
    assert any(path.stem == "_transport" for path in paths), f"{package} has no _transport"
    wrong = []
    for path in paths:
        if path.stem in {"__init__", "_transport"}:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = "" if node.level > 1 else f"{package}."
                module = f"{base}{node.module}" if node.module else package
                modules = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            if target in modules:
                wrong.append(f"{path.name}:{node.lineno} imports {target}")
    assert not wrong, "\n".join(wrong)
