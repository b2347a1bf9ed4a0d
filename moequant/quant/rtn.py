"""Round-to-nearest: the data-free solver, and the fallback a recipe may ask for."""

from __future__ import annotations

import torch

from moequant.quant.grid import dequantize, find_params, quantize
from moequant.quant.types import QuantResult


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, clip_grid: int = 0) -> QuantResult:
    """Quantise ``W`` by rounding each group to its own grid.

    Args:
        w: ``[N, K]`` or ``[E, N, K]`` weights (any float dtype).
        bits: code width (2, 3, 4 or 8).
        group_size: columns per group ``g`` (``-1``: one group of all ``K``); where it does not
            divide ``K`` the last group holds the remaining ``K mod g`` columns.
        sym: symmetric grid.
        clip_grid: candidate ranges for the clipping search (0: plain min/max), see
            :func:`moequant.quant.grid.find_params`.

    Returns:
        :class:`QuantResult` with ``codes [.., N, K]``, ``scales``/``zeros [.., ceil(K/g), N]``,
        ``g_idx [K]`` and the relative weight error ``||W - Q|| / ||W||`` per matrix.
    """
    w = w.float()
    *lead, n, k = w.shape
    g = k if group_size == -1 else min(group_size, k)
    full = k // g * g
    parts = [_round_groups(w[..., :full], g, bits, sym, clip_grid)] if full else []
    if full < k:  # a last group of the remaining k - full columns
        parts.append(_round_groups(w[..., full:], k - full, bits, sym, clip_grid))
    codes, deq = (torch.cat([p[i] for p in parts], dim=-1) for i in (0, 1))
    scale, zero = (torch.cat([p[i] for p in parts], dim=-2) for i in (2, 3))
    err = (w - deq).flatten(-2).norm(dim=-1) / w.flatten(-2).norm(dim=-1).clamp(min=1e-30)
    g_idx = (torch.arange(k, dtype=torch.int32) // g).to(torch.int32)
    return QuantResult(
        codes=codes,
        scales=scale.to(torch.float16),
        zeros=zero,
        g_idx=g_idx,
        error=err,
        damp=torch.zeros_like(err),
    )


def _round_groups(
    w: torch.Tensor, g: int, bits: int, sym: bool, clip_grid: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, dequantised [.., N, K], scales, zeros [.., K/g, N])`` of ``w [.., N, K]``, ``g | K``."""
    *lead, n, k = w.shape
    wg = w.reshape(*lead, n, k // g, g).transpose(-3, -2)  # [.., G, N, g]
    scale, zero = find_params(wg, bits, sym, clip_grid)  # [.., G, N]
    q = quantize(wg, scale[..., None], zero[..., None].float(), bits)
    deq = dequantize(q, scale[..., None], zero[..., None].float())
    codes = q.transpose(-3, -2).reshape(*lead, n, k).to(torch.int32)
    return codes, deq.transpose(-3, -2).reshape(*lead, n, k), scale, zero
