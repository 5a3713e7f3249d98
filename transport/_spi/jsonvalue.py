"""Which Python values travel through JSON unchanged (payloads, results,
event data): the strict rule every backend applies when a message is built."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["json_value_problem"]


_SCALARS = (str, int, type(None))  # bool is an int


def json_value_problem(value: Any, where: str = "payload") -> str | None:
    """Why ``value`` would not arrive as sent through JSON, or ``None`` if it would.

    The rule is strict, the same on every backend: ``None``, ``bool``,
    ``int``, finite ``float``, ``str``, ``list`` and ``dict`` with ``str``
    keys, nested freely. Everything else would come back as something else
    (a tuple as a list, a set as a list, a datetime as a string, the int key
    ``1`` as ``"1"``, NaN as ``null``), so it is refused instead of converted.
    """
    try:
        if _is_json(value):  # the common case, without building paths
            return None
        return _problem(value, where)
    except RecursionError:
        return f"{where} is nested too deeply (or contains itself)"


_EXACT_SCALARS = frozenset({str, int, bool, type(None)})
_isfinite = math.isfinite


def _is_json(value: Any) -> bool:
    kind = type(value)
    if kind in _EXACT_SCALARS:
        return True
    if kind is float:
        return _isfinite(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            if type(item) not in _EXACT_SCALARS and not _is_json(item):
                return False
        return True
    if kind is list:
        # A loop, not all(): this runs for every message built.
        for item in value:  # noqa: SIM110
            if type(item) not in _EXACT_SCALARS and not _is_json(item):
                return False
        return True
    return _problem(value, "") is None  # subclasses (StrEnum, OrderedDict …)


def _problem(value: Any, where: str) -> str | None:
    if isinstance(value, _SCALARS):
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return f"{where} is {value!r}: NaN and infinities are not JSON"
    if isinstance(value, list):
        for index, item in enumerate(value):
            problem = _problem(item, f"{where}[{index}]")
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (
                    f"{where} has the key {key!r} ({type(key).__name__}): "
                    "JSON object keys are strings, convert it first"
                )
            problem = _problem(item, f"{where}[{key!r}]")
            if problem is not None:
                return problem
        return None
    return (
        f"{where} is a {type(value).__name__} ({_short(value)}): only None, bool, int, "
        "finite float, str, list and dict with str keys arrive as sent; convert it first "
        "(a tuple or set to a list, a datetime to an ISO string, bytes to base64)"
    )


def _short(value: Any) -> str:
    try:
        shown = repr(value)
    except Exception:
        shown = "?"
    return shown if len(shown) <= 40 else shown[:37] + "..."
