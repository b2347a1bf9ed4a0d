"""Plain-torch kernels on any device: the truth the Triton kernels are checked against.

Packed values form one little-endian bit stream per column (of ``qweight``) or row (of
``qzeros``): value ``i`` occupies stream bits ``[i*b, i*b + b)`` and stream bit ``p`` is bit
``p % 32`` of word ``p // 32``. For b in {2, 4, 8} no value straddles two words; the 3-bit
"3 words per 32 values" layout is exactly this stream, with values 10 and 21 of every 32
straddling a word boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moequant.errors import MoequantError
from moequant.kernels.packed import PackedExperts, check_bits


def unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack ``count`` values per column from packed words along dim 0.

    Args:
        words: int32 ``[R, C]``, ``R = ceil(count * bits / 32)``.
        bits: value width.
        count: values per column.

    Returns:
        int32 ``[count, C]`` in ``[0, 2**bits - 1]``.
    """
    check_bits(bits)
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
        # An arithmetic shift is harmless here: the mask keeps bits that lie inside the word.
        vals = (words.to(torch.int32).unsqueeze(1) >> shifts.view(1, per_word, 1)) & mask
        return vals.reshape(-1, words.shape[-1])[:count]
    idx = torch.arange(count, device=words.device, dtype=torch.int64) * bits
    row = idx // 32
    shift = (idx % 32).unsqueeze(1)
    w = words.to(torch.int64) & 0xFFFFFFFF
    nxt = torch.clamp(row + 1, max=words.shape[0] - 1)
    vals = ((w[row] >> shift) | (w[nxt] << (32 - shift))) & mask
    return vals.to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of a packed weight: int32 ``[K*b/32, N]`` -> int32 ``[K, N]``."""
    k = qweight.shape[0] * 32 // bits
    return unpack_stream(qweight, bits, k)


def unpack_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """True zero points of packed v1 zeros: int32 ``[G, N*b/32]`` -> int32 ``[G, N]`` (stored + 1)."""
    n = qzeros.shape[1] * 32 // bits
    return unpack_stream(qzeros.t(), bits, n).t() + 1


def dequantize_kn(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> torch.Tensor:
    """Dequantised weight, transposed: float32 ``[K, N]`` with ``W^T[k, n] = s[g, n] * (q[k, n] - z[g, n])``,
    ``g = g_idx[k]`` (any ``g_idx``, sorted or not)."""
    q = unpack_codes(qweight, bits)
    z = unpack_zeros(qzeros, bits)
    g = g_idx.to(device=qweight.device, dtype=torch.long)
    return (q - z.index_select(0, g)).float() * scales.float().index_select(0, g)


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
        qweight, qzeros, scales, g_idx: the packed linear (see :mod:`moequant.kernels.packed`).
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
