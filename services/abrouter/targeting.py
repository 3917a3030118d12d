"""Targeting conditions with GrowthBook's reference semantics: its JavaScript SDK (``packages/sdk-js/src/mongrule.ts``)
and the shared ``cases.json`` every GrowthBook SDK is held to.

The ``growthbook`` Python package compares strictly where JavaScript converts: a missing attribute against
``{"$lt": 10}`` (JS reads a missing path as ``null``, and ``null < 10`` is ``0 < 10``: true), or the number 8
against ``{"$gt": "5"}`` (JS compares a number and a string as numbers: true). Those units are left out of the
experiment by the package and enrolled by GrowthBook; migrated conditions must enrol the same units, so this
module evaluates conditions as ``mongrule.ts`` does:

* a missing path is ``null``;
* ``$lt $lte $gt $gte`` are JavaScript's relational operators: two strings compare by UTF-16 code units,
  anything else as numbers (``null`` -> 0, booleans -> 0/1, a numeric string -> its number, arrays through their
  joined string, anything else -> NaN, and NaN compares false);
* ``$eq $ne`` are ``===`` / ``!==`` (no conversion); a bare string condition is ``String(value) === condition``,
  a bare number ``value * 1 === condition``, a bare boolean ``value !== null && !!value === condition``;
* arrays and plain objects compare by their JSON text; ``$in``/``$nin`` by ``Array.prototype.includes``;
  ``$elemMatch`` skips falsy elements; ``$regex`` tests ``String(value)``; ``$exists`` is ``!= null``;
  an unknown operator never matches; saved groups are empty (the router has none).

Version operators use the package's ``paddedVersionString`` (the same algorithm as the JS SDK's) and numbers
are written as JavaScript writes them with its ``_js_number_to_string``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from growthbook.core import _js_number_to_string, getPath, paddedVersionString

__all__ = ["eval_condition"]

# StringToNumber of ECMAScript: optional sign, decimal digits with an optional fraction and exponent, or
# Infinity; 0x / 0o / 0b integers without a sign. Anything else (after trimming white space) is NaN.
_DECIMAL = re.compile(r"[+-]?(?:Infinity|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
_RADIX = {"0x": 16, "0X": 16, "0o": 8, "0O": 8, "0b": 2, "0B": 2}


def eval_condition(attributes: Mapping[str, Any], condition: Mapping[str, Any]) -> bool:
    """Whether ``attributes`` satisfy ``condition``, exactly as GrowthBook's JS ``evalCondition``."""
    for key, value in condition.items():
        if key == "$or":
            if not _eval_or(attributes, value):
                return False
        elif key == "$nor":
            if _eval_or(attributes, value):
                return False
        elif key == "$and":
            if not all(_as_condition(c) is not None and eval_condition(attributes, c) for c in _items(value)):
                return False
        elif key == "$not":
            if _as_condition(value) is not None and eval_condition(attributes, value):
                return False
        elif not _eval_value(value, getPath(dict(attributes), key) if isinstance(attributes, Mapping) else None):
            return False
    return True


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _as_condition(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


def _eval_or(attributes: Mapping[str, Any], conditions: Any) -> bool:
    items = _items(conditions)
    if not items:
        return True
    return any(isinstance(c, Mapping) and eval_condition(attributes, c) for c in items)


def _is_operator_object(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(str(k).startswith("$") for k in value)


def _eval_value(condition: Any, value: Any, insensitive: bool = False) -> bool:
    if isinstance(condition, str):
        if insensitive:
            return _js_string(value).lower() == condition.lower()
        return _js_string(value) == condition
    if isinstance(condition, bool):
        return value is not None and _truthy(value) == condition
    if isinstance(condition, int | float):
        return _to_number(value) == condition  # NaN never equals
    if condition is None:
        return value is None
    if isinstance(condition, list) or not _is_operator_object(condition):
        return _json_text(value) == _json_text(condition)
    return all(_eval_operator(op, value, expected) for op, expected in condition.items())


def _eval_operator(operator: str, actual: Any, expected: Any) -> bool:
    """One operator of an operator object (one case each, as in mongrule.ts)."""
    if operator in ("$veq", "$vne", "$vgt", "$vgte", "$vlt", "$vlte"):
        a, e = paddedVersionString(actual), paddedVersionString(expected)
        return {
            "$veq": a == e,
            "$vne": a != e,
            "$vgt": a > e,
            "$vgte": a >= e,
            "$vlt": a < e,
            "$vlte": a <= e,
        }[operator]
    if operator == "$eq":
        return _strict_equal(actual, expected)
    if operator == "$ne":
        return not _strict_equal(actual, expected)
    if operator == "$lt":
        return _less(actual, expected) is True
    if operator == "$gt":
        return _less(expected, actual) is True
    if operator == "$lte":
        return _less(expected, actual) is False
    if operator == "$gte":
        return _less(actual, expected) is False
    if operator == "$exists":
        return actual is not None if _truthy(expected) else actual is None
    if operator in ("$in", "$ini", "$nin", "$nini"):
        if not isinstance(expected, list):
            return False
        found = _is_in(actual, expected, insensitive=operator in ("$ini", "$nini"))
        return found if operator in ("$in", "$ini") else not found
    if operator == "$inGroup":
        return False  # no saved groups: GrowthBook's `savedGroups[expected] || []`
    if operator == "$notInGroup":
        return True
    if operator == "$not":
        return not _eval_value(expected, actual)
    if operator == "$size":
        return isinstance(actual, list) and _eval_value(expected, len(actual))
    if operator == "$elemMatch":
        return _elem_match(actual, expected)
    if operator in ("$all", "$alli"):
        if not isinstance(expected, list) or not isinstance(actual, list):
            return False
        insensitive = operator == "$alli"
        return all(any(_eval_value(e, a, insensitive) for a in actual) for e in expected)
    if operator in ("$regex", "$regexi"):
        if not isinstance(expected, str):
            return False
        try:
            pattern = re.compile(expected, re.IGNORECASE if operator == "$regexi" else 0)
        except re.error:
            return False
        return pattern.search(_js_string(actual)) is not None
    if operator == "$type":
        return _js_type(actual) == expected
    return False  # an unknown operator never matches


def _elem_match(actual: Any, expected: Any) -> bool:
    if not isinstance(actual, list):
        return False
    for item in actual:
        if not _truthy(item):
            continue  # mongrule.ts: `actual[i] && check(actual[i])`
        if _is_operator_object(expected):
            if _eval_value(expected, item):
                return True
        elif isinstance(expected, Mapping) and isinstance(item, Mapping) and eval_condition(item, expected):
            return True
    return False


def _is_in(actual: Any, expected: list[Any], insensitive: bool) -> bool:
    def fold(v: Any) -> Any:
        return v.lower() if insensitive and isinstance(v, str) else v

    def includes(v: Any) -> bool:  # Array.prototype.includes: SameValueZero
        return any(_same_value_zero(fold(v), fold(e)) for e in expected)

    if isinstance(actual, list):
        return any(includes(el) for el in actual)
    return includes(actual)


def _same_value_zero(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b) and math.isnan(a) and math.isnan(b):
        return True
    return _strict_equal(a, b)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _strict_equal(a: Any, b: Any) -> bool:
    """JavaScript ``===`` on JSON values: same type and value; arrays and objects are never ``===``."""
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return False


def _truthy(v: Any) -> bool:
    if v is None or v is False:
        return False
    if _is_number(v):
        return v != 0 and not math.isnan(v)
    if isinstance(v, str):
        return v != ""
    return True  # true, arrays and objects (even empty ones)


def _js_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if _is_number(v):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object" if isinstance(v, Mapping) else "unknown"


def _js_string(v: Any) -> str:
    """``String(v)`` of JavaScript for a JSON value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if _is_number(v):
        return str(_js_number_to_string(v))
    if isinstance(v, str):
        return v
    if isinstance(v, list):  # Array.prototype.join(","): null elements become ""
        return ",".join("" if e is None else _js_string(e) for e in v)
    return "[object Object]"


def _to_primitive(v: Any) -> Any:
    """ToPrimitive(v, number) for a JSON value: arrays and objects become their string."""
    if isinstance(v, list | Mapping):
        return _js_string(v)
    return v


def _to_number(v: Any) -> float:
    """ToNumber of JavaScript for a JSON value."""
    v = _to_primitive(v)
    if v is None or v is False:
        return 0.0
    if v is True:
        return 1.0
    if _is_number(v):
        return float(v)
    if isinstance(v, str):
        text = v.strip()
        if not text:
            return 0.0
        if _DECIMAL.fullmatch(text):
            return float(text.replace("Infinity", "inf"))
        base = _RADIX.get(text[:2])
        if base is not None:
            try:
                return float(int(text[2:], base))
            except ValueError:
                return math.nan
    return math.nan


def _utf16(s: str) -> bytes:
    return s.encode("utf-16-be", "surrogatepass")


def _less(a: Any, b: Any) -> bool | None:
    """JavaScript's ``a < b`` (IsLessThan): None where it is undefined (a NaN), which every operator reads as false."""
    pa, pb = _to_primitive(a), _to_primitive(b)
    if isinstance(pa, str) and isinstance(pb, str):
        return _utf16(pa) < _utf16(pb)
    na, nb = _to_number(pa), _to_number(pb)
    if math.isnan(na) or math.isnan(nb):
        return None
    return na < nb


def _json_text(v: Any) -> str:
    """``JSON.stringify`` of a JSON value (integral floats without ".0", NaN and infinities as null)."""

    def normal(x: Any) -> Any:
        if isinstance(x, float):
            if not math.isfinite(x):
                return None
            return int(x) if x.is_integer() and abs(x) < 1e21 else x
        if isinstance(x, list):
            return [normal(e) for e in x]
        if isinstance(x, Mapping):
            return {str(k): normal(e) for k, e in x.items()}
        return x

    return json.dumps(normal(v), separators=(",", ":"), ensure_ascii=False)
