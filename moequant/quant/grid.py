"""Quantisation grids: per-group scales and zero points for the GPTQ layout.

The grid follows the GPTQ reference: ``q = clamp(round(w / s) + z, 0, 2^b - 1)`` and
``w' = s * (q - z)``. Scales are rounded to float16 here, because that is what the checkpoint
stores, so that codes chosen against them dequantise exactly as a reader will.

Symmetric grids use ``z = 2^(b-1)`` and ``s = 2 max|w| / (2^b - 1)``. Asymmetric grids use
``s = (max - min) / (2^b - 1)`` and ``z = round(-min / s)``, kept at ``z >= 1`` so that the v1
layout (which stores ``z - 1``) never underflows: where the rounded zero would be 0 the range is
shifted by one step and the scale widened to keep ``max`` representable.
"""

from __future__ import annotations

import torch

_FP16_TINY = 2.0**-14


CLIP_STEP = 0.02


def find_params(w: torch.Tensor, bits: int, sym: bool, clip_grid: int = 0,
                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for every row of ``w``.

    Args:
        w: ``[..., R, C]`` float weights; each of the ``R`` rows (for one group, the output
            channels) gets its own scale and zero over its ``C`` values.
        bits: code width.
        sym: symmetric grid.
        clip_grid: when > 0, also try ranges shrunk by ``1 - CLIP_STEP * j`` for
            ``j < clip_grid`` and keep, per row, the one with the least squared rounding error
            (weighted by ``weight``); 0 keeps the full min/max range.
        weight: optional non-negative ``[..., 1, C]`` (broadcastable) importance of each
            column, e.g. the Hessian diagonal, for the clipping search.

    Returns:
        ``(scale, zero)``: float32 ``[..., R]`` scales (float16-representable, > 0) and int32
        ``[..., R]`` zero points in ``[1, 2^bits - 1]``.
    """
    w = w.float()
    wmin = w.amin(dim=-1).clamp(max=0.0)
    wmax = w.amax(dim=-1).clamp(min=0.0)
    scale, zero = _range_params(wmin, wmax, bits, sym)
    if clip_grid <= 1:
        return scale, zero
    best = _rounding_error(w, scale, zero, bits, weight)
    for j in range(1, clip_grid):
        shrink = 1.0 - CLIP_STEP * j
        s, z = _range_params(wmin * shrink, wmax * shrink, bits, sym)
        err = _rounding_error(w, s, z, bits, weight)
        better = err < best
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
        best = torch.minimum(err, best)
    return scale, zero


def _rounding_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    weight: torch.Tensor | None) -> torch.Tensor:
    s, z = scale[..., None], zero[..., None].float()
    diff = dequantize(quantize(w, s, z, bits), s, z) - w
    diff = diff.square_()
    if weight is not None:
        diff = diff * weight
    return diff.sum(dim=-1)


def _range_params(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[wmin, wmax]`` (``wmin <= 0 <= wmax``), per row."""
    maxq = 2**bits - 1
    if sym:
        absmax = torch.maximum(-wmin, wmax)
        scale = _to_fp16_grid(2.0 * absmax / maxq)
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
        return scale, zero
    scale = _to_fp16_grid((wmax - wmin) / maxq)
    zero = torch.round(-wmin / scale)
    low = zero < 1
    if low.any():
        # v1 stores z - 1: move the grid so z = 1 and widen s so that wmax still fits.
        widened = _to_fp16_grid(wmax / (maxq - 1), round_up=True)
        scale = torch.where(low, torch.maximum(scale, widened), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero.clamp(1, maxq).to(torch.int32)


def _to_fp16_grid(scale: torch.Tensor, round_up: bool = False) -> torch.Tensor:
    """Round scales to float16 values, never below float16's smallest normal (no zero scale)."""
    scale = scale.clamp(min=_FP16_TINY, max=65504.0)
    half = scale.to(torch.float16).float()
    if round_up:
        bumped = torch.nextafter(half.to(torch.float16), torch.tensor(float("inf"), dtype=torch.float16)).float()
        half = torch.where(half < scale, bumped, half)
    return half


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` on a grid: ``clamp(round(w / s) + z, 0, 2^b - 1)``.

    ``scale`` and ``zero`` broadcast against ``w`` (e.g. ``[N, 1]`` against ``[N, C]``).
    Returns float32 codes (exact integers).
    """
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``s * (q - z)``, broadcasting like :func:`quantize`."""
    return scale * (q - zero)
