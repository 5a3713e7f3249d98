"""Suite-wide collection order for parallel runs.

``make test`` runs the suite in several pytest-xdist workers, each handed
whole modules or classes (``--dist loadscope --no-loadscope-reorder``) in
collection order. Under xdist the scopes are collected longest first, so
none of them starts last and becomes the tail of the run: the SIGKILL and
reliability scenarios (markers ``crash`` and ``slow``, few tests but the
longest) first, then the others by their number of tests (what xdist's own
reordering does). The order of the tests inside every module and class is
kept, and a plain (serial) run keeps the usual order.
"""

from __future__ import annotations

from collections import Counter

import pytest

LONG_MARKERS = ("crash", "slow")


def _scope(item: pytest.Item) -> str:
    # What loadscope hands out as one unit: the class, else the module.
    return item.nodeid.rsplit("::", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The workers collect (and hand the order to the scheduler); xdist gives
    # each worker a ``workerinput`` and clears its -n option.
    if not hasattr(config, "workerinput"):
        return
    long_scopes = {
        _scope(item)
        for item in items
        if any(item.get_closest_marker(name) for name in LONG_MARKERS)
    }
    sizes = Counter(_scope(item) for item in items)
    # Stable: every scope's items stay together and in their order.
    items.sort(key=lambda item: (_scope(item) not in long_scopes, -sizes[_scope(item)]))
