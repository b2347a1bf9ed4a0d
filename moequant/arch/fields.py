"""Typed reading of ``config.json`` fields, each refusal one line naming the field, its value and what is expected."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from moequant.errors import MoequantError

REQUIRED: Any = object()  # the default of a field that config.json must give


def refusal(key: str, value: Any, expected: str) -> MoequantError:
    """The one-line error for field ``key`` holding ``value`` (``REQUIRED``: absent) where ``expected`` belongs."""
    shown = "missing" if value is REQUIRED else _show(value)
    return MoequantError(f"config.json field {key} is {shown}; it must be {expected}")


def _show(value: Any) -> str:
    """``value`` as config.json spells it, shortened to fit one line."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'list'}"
    shown = repr(value) if isinstance(value, str) else str(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _lookup(raw: Mapping, key: str, default: Any, expected: str) -> Any:
    """The value of ``key``, ``default`` where it is absent or null; a required field must be given."""
    value = raw.get(key)
    if value is None and default is REQUIRED:
        raise refusal(key, raw[key] if key in raw else REQUIRED, expected)
    return default if value is None else value


def integer(raw: Mapping, key: str, default: Any = REQUIRED, minimum: int = 1) -> int:
    """``raw[key]`` as an int of at least ``minimum``; a float, string or bool is refused, not converted."""
    expected = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
    value = _lookup(raw, key, default, expected)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise refusal(key, value, expected)
    return value


def positive_number(raw: Mapping, key: str, default: Any = REQUIRED, label: str | None = None) -> float:
    """``raw[key]`` as a finite float above zero (a JSON integer is taken too); ``label`` names it in errors."""
    value = _lookup(raw, key, default, "a positive number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise refusal(label or key, value, "a positive number")
    return float(value)


def flag(raw: Mapping, key: str, default: bool) -> bool:
    """``raw[key]`` as a bool: true or false (absent or null: ``default``)."""
    value = _lookup(raw, key, default, "true or false")
    if not isinstance(value, bool):
        raise refusal(key, value, "true or false")
    return value


def text(raw: Mapping, key: str, default: str, label: str | None = None) -> str:
    """``raw[key]`` as a string (absent or null: ``default``); ``label`` names it in errors."""
    value = _lookup(raw, key, default, "a string")
    if not isinstance(value, str):
        raise refusal(label or key, value, "a string")
    return value


def mapping(raw: Mapping, key: str) -> Mapping:
    """``raw[key]`` as a JSON object (absent or null: an empty one)."""
    value = _lookup(raw, key, {}, "a JSON object (or null)")
    if not isinstance(value, Mapping):
        raise refusal(key, value, "a JSON object (or null)")
    return value
