"""Bit widths, the four tensors of a packed module, and how groups map input columns."""

from __future__ import annotations

import torch

from moequant.errors import MoequantError

BITS = (2, 3, 4, 8)
PACKED_KEYS = ("qweight", "qzeros", "scales", "g_idx")


def check_bits(bits: int) -> None:
    """Raise unless ``bits`` is a width the packed layout supports."""
    if bits not in BITS:
        raise MoequantError(
            f"bits={bits} is not supported by the GPTQ layout: use one of {', '.join(map(str, BITS))}"
        )


def effective_group_size(group_size: int, in_features: int) -> int:
    """``group_size`` with -1 (one group over all of K) resolved to ``in_features``."""
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise MoequantError(f"group_size={group_size} is invalid: use a positive size or -1")
    return group_size


def stored_group_size(group_size: int, in_features: int) -> int:
    """``group_size`` as a weight of ``in_features`` inputs stores it: -1 (one group) where the
    group is wider than the input, since ``ceil(K / g)`` is then one row of scales."""
    return -1 if group_size > in_features else group_size


def monotone_g_idx(
    in_features: int, group_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The static-groups ``g_idx``: int32 ``[K]`` with ``g_idx[k] = k // group_size``."""
    g = effective_group_size(group_size, in_features)
    return torch.arange(in_features, device=device, dtype=torch.int32) // g


def is_monotone_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether ``g_idx`` (``[K]`` or ``[E, K]``) equals ``k // group_size`` everywhere (synchronises)."""
    k = g_idx.shape[-1]
    expected = monotone_g_idx(k, group_size, device=g_idx.device)
    return bool(torch.equal(g_idx.to(torch.int32), expected.expand_as(g_idx)))
