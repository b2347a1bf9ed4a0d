"""A solver's result in the GPTQ packed layout (see :mod:`moequant.packed`)."""

from __future__ import annotations

import torch

from moequant.packed.bitstream import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from moequant.packed.shapes import check_packable
from moequant.quant.types import QuantResult


def pack_result(result: QuantResult, bits: int) -> dict[str, torch.Tensor]:
    """Pack one :class:`QuantResult` into the tensors a GPTQ checkpoint stores for a layer.

    For ``codes [N, K]`` with ``G`` groups returns contiguous tensors:
    ``qweight`` int32 ``[K*bits/32, N]``, ``qzeros`` int32 ``[G, N*bits/32]``,
    ``scales`` float16 ``[G, N]`` and ``g_idx`` int32 ``[K]``.

    A batch (``codes [E, N, K]``) gives every tensor the leading ``E``, ``g_idx`` included
    (``[E, K]``), so that ``{name: t[e]}`` is the layer of weight ``e``.
    """
    codes = result.codes
    if codes.dim() < 2:
        raise ValueError(f"codes must be [..., N, K], got shape {tuple(codes.shape)}")
    *lead, n, k = codes.shape
    check_packable(n, k, bits, -1)
    g = result.scales.shape[-2]
    expected = (*lead, g, n)
    if tuple(result.scales.shape) != expected or tuple(result.zeros.shape) != expected:
        raise ValueError(
            f"scales {tuple(result.scales.shape)} and zeros {tuple(result.zeros.shape)} must both be {expected}"
        )
    g_idx = result.g_idx
    if g_idx.shape[-1] != k:
        raise ValueError(f"g_idx has {g_idx.shape[-1]} entries, expected K={k}")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= g):
        raise ValueError(
            f"g_idx values must lie in [0, {g - 1}], found [{int(g_idx.min())}, {int(g_idx.max())}]"
        )
    return {
        "qweight": pack_qweight(codes, bits),
        "qzeros": pack_qzeros(result.zeros, bits),
        "scales": result.scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).expand(*lead, k).contiguous(),
    }


def unpack_result(packed: dict[str, torch.Tensor], bits: int) -> QuantResult:
    """The codes, scales, zeros and ``g_idx`` that :func:`pack_result` packed (``[..., N, K]`` codes; no error):
    its :meth:`~QuantResult.dequantize` gives the solver's weights bit for bit."""
    return QuantResult(codes=unpack_qweight(packed["qweight"], bits).transpose(-1, -2).contiguous(),
                       scales=packed["scales"], zeros=unpack_qzeros(packed["qzeros"], bits), g_idx=packed["g_idx"],
                       error=torch.zeros(()))

