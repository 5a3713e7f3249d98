"""Which Python values travel through JSON unchanged (payloads, results,
event data): the strict rule every backend applies when a message is built."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["json_value_problem"]


#: Lists and dicts nested deeper than this are refused. The decoder gives up
#: past 200 levels of the whole record, and a payload sits two levels down
#: in the deepest record that carries it (a dead letter holding the request).
MAX_NESTING = 198
#: Ints of more digits are refused: the decoder (like Python's own
#: ``int(str)``) refuses numbers longer than 4,300 digits.
MAX_INT_DIGITS = 4300
_INT_BOUND: int = 10**MAX_INT_DIGITS


def json_value_problem(value: Any, where: str = "payload") -> str | None:
    """Why ``value`` would not arrive as sent through JSON, or ``None`` if it would.

    The rule is strict, the same on every backend: ``None``, ``bool``,
    ``int`` (up to :data:`MAX_INT_DIGITS` digits), finite ``float``, ``str``
    (encodable as UTF-8: no lone surrogate), ``list`` and ``dict`` with
    ``str`` keys, nested up to :data:`MAX_NESTING` levels. Everything else
    would come back as something else (a tuple as a list, a set as a list, a
    datetime as a string, the int key ``1`` as ``"1"``, NaN as ``null``), or
    not be sent or decoded at all, so it is refused instead of converted.
    """
    try:
        if _is_json(value, 0):  # the common case, without building paths
            return None
        return _problem(value, where, 0)
    except RecursionError:
        return f"{where} is nested too deeply (or contains itself)"


def _text_problem(value: str, where: str) -> str | None:
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{where} holds a lone surrogate ({_short(value)}): not encodable as UTF-8"
    return None


def _too_deep(where: str) -> str:
    return f"{where} is nested more than {MAX_NESTING} levels deep"


_isfinite = math.isfinite


_EXACT_OTHER_SCALARS = frozenset({bool, type(None)})


def _is_json_item(item: Any, depth: int) -> bool:
    kind = type(item)
    if kind is str:
        return item.isascii() or _text_problem(item, "") is None
    if kind is int:
        return -_INT_BOUND < item < _INT_BOUND  # type: ignore[no-any-return]
    return kind in _EXACT_OTHER_SCALARS or _is_json(item, depth)


def _is_json(value: Any, depth: int) -> bool:
    kind = type(value)
    if kind is str:
        return value.isascii() or _text_problem(value, "") is None
    if kind is int:
        return -_INT_BOUND < value < _INT_BOUND  # type: ignore[no-any-return]
    if kind in _EXACT_OTHER_SCALARS:
        return True
    if kind is float:
        return _isfinite(value)
    if kind is dict:
        if depth >= MAX_NESTING:
            return False
        for key, item in value.items():
            if type(key) is not str or not (key.isascii() or _text_problem(key, "") is None):
                return False
            if not _is_json_item(item, depth + 1):
                return False
        return True
    if kind is list:
        if depth >= MAX_NESTING:
            return False
        # A loop, not all(): this runs for every message built.
        for item in value:  # noqa: SIM110
            if not _is_json_item(item, depth + 1):
                return False
        return True
    return _problem(value, "", depth) is None  # subclasses (StrEnum, OrderedDict …)


_PLAIN = (bool, str, int, float, list, dict)


def _subclass_problem(value: Any, where: str) -> str | None:
    """A subclass of a JSON type (a str Enum, an IntEnum, a dict subclass)
    arrives as the plain type: refused as the other conversions are."""
    kind = type(value)
    if kind in _PLAIN or value is None:
        return None
    base = next((b for b in _PLAIN if isinstance(value, b)), None)
    if base is None:
        return None
    a = "an" if base.__name__[0] in "aeiou" else "a"
    return (
        f"{where} is a {kind.__name__} ({_short(value)}), {a} {base.__name__} subclass: it "
        f"would arrive as a plain {base.__name__}; pass {a} {base.__name__} (an Enum's .value)"
    )


def _problem(value: Any, where: str, depth: int) -> str | None:
    subclass = _subclass_problem(value, where)
    if subclass is not None:
        return subclass
    if isinstance(value, str):
        return _text_problem(value, where)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        if -_INT_BOUND < value < _INT_BOUND:
            return None
        return (
            f"{where} is an int of more than {MAX_INT_DIGITS:,} digits: JSON decoders "
            "(Python's own included) refuse it; send it as a string"
        )
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return f"{where} is {value!r}: NaN and infinities are not JSON"
    if isinstance(value, list):
        if depth >= MAX_NESTING:
            return _too_deep(where)
        for index, item in enumerate(value):
            problem = _problem(item, f"{where}[{index}]", depth + 1)
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        if depth >= MAX_NESTING:
            return _too_deep(where)
        for key, item in value.items():
            if type(key) is not str:
                return (
                    f"{where} has the key {key!r} ({type(key).__name__}): "
                    "JSON object keys are plain strings, convert it first"
                )
            problem = _text_problem(key, f"{where} key") or _problem(
                item, f"{where}[{key!r}]", depth + 1
            )
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
