"""How a starved expert was calibrated: the policy a module's record names, as a value."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """How one expert was calibrated: its label in the record, and whether it had rows to calibrate on."""

    label: str
    calibrates: bool = True


ROUTED = Policy("routed")
NO_TOKENS = Policy("routed (no tokens: plain rounding)", calibrates=False)
AUGMENTED = Policy("augmented")
ALL = Policy("all")
