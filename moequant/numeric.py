"""The rule for every whole-number setting and size: its type and its allowed range, in one line when broken."""

from __future__ import annotations

import math
import numbers
import re

from moequant.errors import MoequantError

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes seeds up to this


def check_int(value: object, option: str, minimum: int, maximum: int | None = None, meaning: str = "") -> int:
    """``value`` as an ``int`` if it is a whole number in ``[minimum, maximum]``.

    Otherwise a :class:`MoequantError` naming ``option`` (as the command line spells it, e.g.
    ``--samples``), the allowed values and, if given, what they mean (``meaning``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MoequantError(f"{option} must be a whole number {allowed(minimum, maximum)}{_meaning(meaning)}; "
                            f"got {value!r}")
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        raise MoequantError(f"{option} must be {allowed(minimum, maximum)}{_meaning(meaning)}; got {number}")
    return number


def check_float(value: object, option: str, minimum: float, meaning: str = "") -> float:
    """``value`` as a ``float`` if it is a finite number of at least ``minimum``; else one line naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < minimum:
        raise MoequantError(f"{option} must be a finite number of at least {minimum}{_meaning(meaning)}; "
                            f"got {value!r}")
    return float(value)


def allowed(minimum: int, maximum: int | None) -> str:
    """The range in words: ``at least 1``, ``from 0 to 9``."""
    return f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"


def _meaning(meaning: str) -> str:
    return f" ({meaning})" if meaning else ""


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, option: str = "--size") -> int:
    """Bytes from ``123456``, ``1.5GB`` (powers of 1000) or ``1.5GiB`` (powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m[2].lower() if m else ""
    if m is None or unit not in _UNITS:
        raise MoequantError(f"{option} {text!r} is not a size: give bytes, or a number with kB, MB, GB, TB "
                            "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 12GB")
    return int(float(m[1]) * _UNITS[unit])

