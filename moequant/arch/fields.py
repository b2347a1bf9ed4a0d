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


def _lookup(raw: Mapping, key: str, default: Any, expected: str, nullable: bool) -> Any:
    """The value of ``key``: ``default`` where it is absent (or null, where ``nullable``).

    As transformers does, a null is refused where the field has no meaning for "not set".
    """
    if key not in raw:
        if default is REQUIRED:
            raise refusal(key, REQUIRED, expected)
        return default
    value = raw[key]
    if value is None:
        if not nullable or default is REQUIRED:
            raise refusal(key, None, expected)
        return default
    return value


def integer(raw: Mapping, key: str, default: Any = REQUIRED, nullable: bool = False) -> int:
    """``raw[key]`` as an int of at least 1; a float, string or bool is refused, not converted."""
    value = _lookup(raw, key, default, "a positive integer", nullable)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise refusal(key, value, "a positive integer")
    return value


def positive_number(raw: Mapping, key: str, default: Any = REQUIRED, nullable: bool = False,
                    label: str | None = None) -> float:
    """``raw[key]`` as a finite float above zero (a JSON integer is taken too); ``label`` names it in errors."""
    value = _lookup(raw, key, default, "a positive number", nullable)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise refusal(label or key, value, "a positive number")
    return float(value)


def flag(raw: Mapping, key: str, default: bool) -> bool:
    """``raw[key]`` as a bool: true or false (absent: ``default``)."""
    value = _lookup(raw, key, default, "true or false", nullable=False)
    if not isinstance(value, bool):
        raise refusal(key, value, "true or false")
    return value


def text(raw: Mapping, key: str, default: str, nullable: bool = False, label: str | None = None) -> str:
    """``raw[key]`` as a string (absent: ``default``); ``label`` names it in errors."""
    value = _lookup(raw, key, default, "a string", nullable)
    if not isinstance(value, str):
        raise refusal(label or key, value, "a string")
    return value


def mapping(raw: Mapping, key: str) -> Mapping:
    """``raw[key]`` as a JSON object (absent or null: an empty one)."""
    value = _lookup(raw, key, {}, "a JSON object (or null)", nullable=True)
    if not isinstance(value, Mapping):
        raise refusal(key, value, "a JSON object (or null)")
    return value
