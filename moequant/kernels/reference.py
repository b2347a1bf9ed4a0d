"""Plain-torch kernels on any device: the truth the Triton kernels are checked against.

Packed tensors are read with :mod:`moequant.packed.bitstream`, the one reading of the layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moequant.errors import MoequantError
from moequant.packed.bitstream import dequantize_kn
from moequant.packed.experts import PackedExperts


def dequant_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """``x @ W^T`` for a packed ``W [N, K]``.

    Args:
        x: ``[..., K]`` activations (any float dtype).
        qweight, qzeros, scales, g_idx: the packed linear (see :mod:`moequant.packed`).
        bits: code width.

    Returns:
        ``[..., N]`` in ``x.dtype``, accumulated in float32.
    """
    w = dequantize_kn(qweight, qzeros, scales, g_idx, bits)
    if x.shape[-1] != w.shape[0]:
        raise MoequantError(
            f"activation has {x.shape[-1]} features but the packed weight expects {w.shape[0]}"
        )
    return (x.float() @ w).to(x.dtype)


def fused_moe_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: PackedExperts,
    w2: PackedExperts,
    bits: int | None = None,
) -> torch.Tensor:
    """A Mixtral sparse-MoE block over packed experts.

    ``out[t] = sum_j topk_weights[t, j] * w2_e(silu(w1_e x_t) * w3_e x_t)`` with ``e = topk_ids[t, j]``.

    Args:
        x: ``[T, H]`` activations.
        topk_ids: int ``[T, k]`` expert of each routed slot.
        topk_weights: ``[T, k]`` routing weights.
        w13: experts' gate and up projections joined along N: ``W13_e [2I, H]`` (w1 rows first).
        w2: experts' down projections ``W2_e [H, I]``.
        bits: optional check that both weights have this width.

    Returns:
        ``[T, H]`` in ``x.dtype``; the intermediate stays float32.
    """
    check_moe_shapes(x, topk_ids, topk_weights, w13, w2, bits)
    t, h = x.shape
    inter = w2.in_features
    out = torch.zeros(t, h, device=x.device, dtype=torch.float32)
    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1).float()
    tokens = torch.arange(t, device=x.device).repeat_interleave(topk_ids.shape[1])
    for e in torch.unique(flat_ids).tolist():
        slots = (flat_ids == e).nonzero().squeeze(1)
        tok = tokens[slots]
        w13_e = dequantize_kn(**w13.expert(e), bits=w13.bits)  # [H, 2I]
        w2_e = dequantize_kn(**w2.expert(e), bits=w2.bits)  # [I, H]
        gate_up = x[tok].float() @ w13_e
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out.index_add_(0, tok, (act @ w2_e) * flat_w[slots].unsqueeze(1))
    return out.to(x.dtype)


def check_moe_shapes(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: PackedExperts,
    w2: PackedExperts,
    bits: int | None = None,
) -> None:
    """Raise a MoequantError when the MoE operands do not fit together (metadata only, no sync)."""
    if x.dim() != 2:
        raise MoequantError(f"fused MoE takes activations [T, H], got shape {tuple(x.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise MoequantError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be [T={x.shape[0]}, k]"
        )
    if bits is not None and (w13.bits != bits or w2.bits != bits):
        raise MoequantError(f"expert weights have bits {w13.bits}/{w2.bits}, expected {bits}")
    if w13.num_experts != w2.num_experts:
        raise MoequantError(f"w13 has {w13.num_experts} experts but w2 has {w2.num_experts}")
    if w13.in_features != x.shape[1] or w2.out_features != x.shape[1]:
        raise MoequantError(
            f"hidden size {x.shape[1]} does not match experts (w13 K={w13.in_features}, w2 N={w2.out_features})"
        )
    if w13.out_features != 2 * w2.in_features:
        raise MoequantError(
            f"w13 must hold gate and up ({2 * w2.in_features} outputs for I={w2.in_features}), has {w13.out_features}"
        )
