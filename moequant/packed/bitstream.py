"""The GPTQ packed layout (checkpoint format "gptq", also called v1).

A layer ``W [N, K]`` quantised to ``b`` bits is stored as:

- ``qweight`` int32 ``[K*b/32, N]``: codes packed along K (the input dim)
- ``qzeros``  int32 ``[G, N*b/32]``: zero points minus one, packed along N (the output dim)
- ``scales``  float16 ``[G, N]``
- ``g_idx``   int32 ``[K]``: group of every input column

Packing rule, for every bit width: a block of values is laid out as one little-endian bit
stream, value ``i`` at bit offset ``b*i``, cut into consecutive 32-bit words. For ``b`` in
{2, 4, 8} a block is ``32/b`` values in one word (least significant first); for ``b = 3`` it is
32 values in 3 words, where value 10 straddles words 0/1 (low 2 bits at the top of word 0) and
value 21 straddles words 1/2 (low bit at the top of word 1).

Words are computed in int64 and returned as int32 with the same bit pattern (two's complement:
a word with bit 31 set is negative).
"""

from __future__ import annotations

import functools

import torch

from moequant.errors import MoequantError
from moequant.packed.widths import check_bits

_WORD = 32
_MASK32 = (1 << _WORD) - 1


def _block(bits: int) -> tuple[int, int]:
    """``(values, words)`` per packing block: the smallest run of values that fills whole words."""
    values = _WORD if bits == 3 else _WORD // bits
    return values, values * bits // _WORD


def _placements(bits: int) -> list[tuple[int, int, bool]]:
    """For each value of a block: ``(word, shift, spills into the next word)``."""
    values, _ = _block(bits)
    out = []
    for i in range(values):
        offset = bits * i
        shift = offset % _WORD
        out.append((offset // _WORD, shift, shift + bits > _WORD))
    return out


def _check_int(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got {t.dtype}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in ``[0, 2^32)`` -> int32 with the same bit pattern."""
    return torch.where(words >= 1 << (_WORD - 1), words - (1 << _WORD), words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values along dim -2 into int32 words.

    Args:
        values: integer ``[..., R, C]`` with entries in ``[0, 2^bits - 1]``; ``R`` must be a
            multiple of 32 for 3 bits and of ``32/bits`` otherwise.
        bits: 2, 3, 4 or 8.

    Returns:
        int32 ``[..., R*bits/32, C]``.
    """
    check_bits(bits)
    _check_int(values, "values")
    if values.dim() < 2:
        raise ValueError(f"values must have at least 2 dims [R, C], got shape {tuple(values.shape)}")
    maxq = 2**bits - 1
    if values.numel():
        lo, hi = (int(x) for x in torch.aminmax(values))
        if lo < 0 or hi > maxq:
            raise ValueError(f"values must lie in [0, {maxq}] for {bits} bits, found [{lo}, {hi}]")
    *lead, r, c = values.shape
    per_block, words_per_block = _block(bits)
    if r % per_block:
        raise MoequantError(
            f"cannot pack {r} rows at {bits} bits: the row count must be a multiple of {per_block}"
        )
    blocks = values.reshape(*lead, r // per_block, per_block, c)
    words = torch.zeros(*lead, r // per_block, words_per_block, c, dtype=torch.int64, device=values.device)
    for i, (w, shift, spills) in enumerate(_placements(bits)):
        v = blocks[..., i, :].to(torch.int64)
        words[..., w, :] |= (v << shift) & _MASK32
        if spills:
            words[..., w + 1, :] |= v >> (_WORD - shift)
    return _to_int32(words.reshape(*lead, r // per_block * words_per_block, c))


@functools.cache
def _unpack_plan(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(word, shift, mask)`` of every value of a block: ``word`` int64 ``[values]`` (for
    ``index_select``), ``shift`` and ``mask`` int32 ``[values, 1]``.

    Value ``i`` starts at stream bit ``b*i``: bit ``shift`` of word ``word``. For b = 3 values 10
    and 21 straddle two words: the mask keeps the bits in the first word, :func:`unpack_rows` adds
    the rest.
    """
    values, _ = _block(bits)
    offset = torch.arange(values, dtype=torch.int64) * bits
    word, shift = offset // _WORD, (offset % _WORD).to(torch.int32)
    mask = ((1 << torch.clamp(_WORD - shift, max=bits)) - 1).to(torch.int32)
    return word.to(device), shift.view(-1, 1).to(device), mask.view(-1, 1).to(device)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[..., R*bits/32, C]`` -> int32 ``[..., R, C]``.

    Vectorised over every value position of a block at once (the decode path of the torch
    backend runs it on every call).
    """
    check_bits(bits)
    _check_int(packed, "packed")
    if packed.dim() < 2:
        raise ValueError(f"packed must have at least 2 dims, got shape {tuple(packed.shape)}")
    *lead, rw, c = packed.shape
    per_block, words_per_block = _block(bits)
    if rw % words_per_block:
        raise MoequantError(
            f"cannot unpack {rw} rows of words at {bits} bits: the count must be a multiple of {words_per_block}"
        )
    word, shift, mask = _unpack_plan(bits, packed.device)
    words = packed.to(torch.int32)
    # Arithmetic shifts are harmless: each mask keeps only bits that lie inside the word.
    if bits != 3:
        return ((words.unsqueeze(-2) >> shift) & mask).reshape(*lead, rw * per_block, c)
    w = words.reshape(*lead, rw // 3, 3, c)
    v = (w.index_select(-2, word) >> shift) & mask
    v[..., 10, :] |= (w[..., 1, :] & 1) << 2  # value 10: bits 30-31 of word 0, bit 0 of word 1
    v[..., 21, :] |= (w[..., 2, :] & 3) << 1  # value 21: bit 31 of word 1, bits 0-1 of word 2
    return v.reshape(*lead, rw // 3 * per_block, c)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[..., N, K]`` -> ``qweight`` int32 ``[..., K*bits/32, N]`` (packed along K)."""
    return pack_rows(codes.transpose(-1, -2), bits).contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """``qweight [..., K*bits/32, N]`` -> codes int32 ``[..., K, N]`` (K-major, as stored)."""
    return unpack_rows(qweight, bits)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """True zero points ``[..., G, N]`` -> ``qzeros`` int32 ``[..., G, N*bits/32]`` storing ``z - 1``.

    Every zero point must lie in ``[1, 2^bits - 1]``: v1 has no field value for ``z = 0``.
    """
    check_bits(bits)
    _check_int(zeros, "zeros")
    maxq = 2**bits - 1
    if zeros.numel():
        lo, hi = (int(x) for x in torch.aminmax(zeros))
        if lo < 1 or hi > maxq:
            raise MoequantError(
                f"zero points must lie in [1, {maxq}] for the {bits}-bit v1 layout (which stores z - 1), "
                f"found [{lo}, {hi}]: build the grid with grid.find_params (keeps z >= 1) or use sym=True"
            )
    stored = zeros.to(torch.int64) - 1
    return pack_rows(stored.transpose(-1, -2), bits).transpose(-1, -2).contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """``qzeros [..., G, N*bits/32]`` -> true zero points int32 ``[..., G, N]`` (adds the 1 back)."""
    return (unpack_rows(qzeros.transpose(-1, -2), bits).transpose(-1, -2) + 1).contiguous()


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Values packed along dim 1: int32 ``[R, C]`` -> integer ``[R, C*32/bits]``."""
    return unpack_rows(words.t(), bits).t()


def dequantize_packed(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Dequantised weight float32 ``[..., N, K]``: ``s * (q - z)`` with ``s, z`` from group ``g_idx[k]``.

    Args:
        qweight: int32 ``[..., K*bits/32, N]``.
        qzeros: int32 ``[..., G, N*bits/32]`` (v1: stores ``z - 1``).
        scales: ``[..., G, N]`` (float16 in a checkpoint).
        g_idx: integer ``[K]``, or ``[..., K]`` with the same leading dims.
        bits: 2, 3, 4 or 8.
    """
    return dequantize_kn(qweight, qzeros, scales, g_idx, bits).transpose(-1, -2).contiguous()


def dequantize_kn(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """The dequantised weight transposed, float32 ``[..., K, N]`` as the codes are stored (see
    :func:`dequantize_packed`; any ``g_idx``, sorted or not)."""
    q = unpack_qweight(qweight, bits).float()  # [..., K, N]
    z = unpack_qzeros(qzeros, bits).float()  # [..., G, N]
    s = scales.float()
    if tuple(z.shape) != tuple(s.shape):
        raise ValueError(f"qzeros unpack to {tuple(z.shape)} but scales are {tuple(s.shape)}")
    k, n = q.shape[-2:]
    if s.shape[-1] != n or g_idx.shape[-1] != k:
        raise ValueError(
            f"shapes disagree: qweight gives K={k}, N={n}; scales {tuple(s.shape)}; g_idx {tuple(g_idx.shape)}"
        )
    idx = g_idx.to(device=q.device, dtype=torch.long)
    if idx.dim() == 1:
        s_k, z_k = s.index_select(-2, idx), z.index_select(-2, idx)
    else:
        gather = idx[..., None].expand(*idx.shape, n)
        s_k, z_k = s.gather(-2, gather), z.gather(-2, gather)
    return s_k * (q - z_k)
