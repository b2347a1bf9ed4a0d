"""The shapes of a packed module's tensors, their size, and the checks that they fit together.

A weight ``W [N, K]`` at ``b`` bits with ``G = ceil(K / g)`` groups is stored as ``qweight``
int32 ``[K*b/32, N]``, ``qzeros`` int32 ``[G, N*b/32]``, ``scales`` fp16 ``[G, N]`` and ``g_idx``
int32 ``[K]``; a stack of experts adds a leading ``E`` to each (``g_idx`` may stay ``[K]``).
"""

from __future__ import annotations

import math

import torch

from moequant.errors import MoequantError
from moequant.packed.widths import BITS, check_bits, effective_group_size


def check_packable(n: int, k: int, bits: int, group_size: int) -> None:
    """Raise :class:`MoequantError` if a ``[n, k]`` weight cannot be written in the GPTQ layout.

    Requires ``bits`` in {2, 3, 4, 8}, ``n`` and ``k`` multiples of 32, and ``group_size``
    either -1 or positive (``ceil(k / group_size)`` groups, the last one shorter where it does not
    divide ``k``).
    """
    check_bits(bits)
    if k <= 0 or k % 32:
        raise MoequantError(
            f"in_features K={k} must be a positive multiple of {32} for the GPTQ layout (qweight packs along K)"
        )
    if n <= 0 or n % 32:
        raise MoequantError(
            f"out_features N={n} must be a positive multiple of {32} for the GPTQ layout (qzeros packs along N)"
        )
    if group_size != -1 and group_size <= 0:
        raise MoequantError(f"group_size={group_size} must be positive (or -1 for one group)")


def packed_shapes(out_features: int, in_features: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the packed tensors of a ``[N, K]`` weight: ``qweight``, ``qzeros``, ``scales``, ``g_idx``."""
    n, k = out_features, in_features
    check_packable(n, k, bits, group_size)
    groups = -(-k // effective_group_size(group_size, k))
    return {"qweight": (k * bits // 32, n), "qzeros": (groups, n * bits // 32), "scales": (groups, n), "g_idx": (k,)}


def stored_bits(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bits of qweight, qzeros, scales (fp16) and g_idx (int32) for a ``[N, K]`` weight."""
    n, k = out_features, in_features
    groups = math.ceil(k / effective_group_size(group_size, k))
    return n * k * bits + groups * n * bits + groups * n * 16 + 32 * k


def bits_of(module: str, qweight_rows: int, in_features: int) -> int:
    """The code width of ``module`` from its ``qweight`` rows: ``K * bits / 32``."""
    bits, rem = divmod(qweight_rows * 32, in_features)
    if rem or bits not in BITS:
        raise MoequantError(f"{module}.qweight has {qweight_rows} rows, which fits no bit width for "
                            f"{in_features} inputs")
    return bits


def check_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                 bits: int, in_features: int, what: str = "packed weight") -> tuple[int, int]:
    """Raise a one-line :class:`MoequantError` unless the tensors hold ``[..., N, in_features]`` weights
    at ``bits`` (leading dims shared; ``g_idx`` ``[K]`` or with the leading dims); returns ``(N, G)``."""
    check_bits(bits)
    k = in_features
    if qweight.dim() < 2 or qweight.shape[-2] * 32 != k * bits:
        raise MoequantError(f"{what}.qweight has shape {list(qweight.shape)}, which does not hold K={k} inputs "
                            f"at {bits} bits")
    *lead, _, n = qweight.shape
    g = scales.shape[-2] if scales.dim() >= 2 else -1
    expected = {"qzeros": (qzeros, (*lead, g, n * bits // 32)), "scales": (scales, (*lead, g, n))}
    for key, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape or g < 1:
            raise MoequantError(f"{what}.{key} has shape {list(tensor.shape)}, expected {list(shape)} for "
                                f"qweight {list(qweight.shape)}")
    if g_idx is not None and (g_idx.shape[-1] != k or tuple(g_idx.shape) not in ((k,), (*lead, k))):
        raise MoequantError(f"{what}.g_idx has shape {list(g_idx.shape)}, expected {[k]}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise MoequantError(f"{what}.qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    return n, g
