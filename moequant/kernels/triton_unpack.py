"""Triton device functions that read GPTQ-packed weights: codes, zero points, scales and groups.

The layout is that of :mod:`moequant.packed`: ``qweight int32 [K*b/32, N]`` (value ``k`` of
a column is stream bits ``[k*b, k*b + b)``; for 3 bits values 10 and 21 of every 32 continue into
the next word), ``qzeros int32 [G, N*b/32]`` (``z - 1``), ``scales fp16 [G, N]``. A tile's packed
words are loaded once and expanded in registers. ``GROUP_MODE`` says how a kernel finds the group
of input row ``k`` (:func:`group_mode` chooses it for a launch).
"""

from __future__ import annotations

import triton
import triton.language as tl

# How a kernel finds the group of input row k.
GROUPS_PER_TILE = 0  # sorted groups and the whole K tile inside one group: one scale row per tile
GROUPS_BY_DIVISION = 1  # sorted groups, g = k // group_size per row
GROUPS_FROM_G_IDX = 2  # any g_idx, read from memory
# GROUPS_PER_TILE finds a tile's group by a float32 quotient (tile_group), exact below this K.
TILE_GROUP_MAX_K = 1 << 19


@triton.jit
def _extract(lo, hi, shift, BITS: tl.constexpr):
    """The ``BITS``-wide value starting at bit ``shift`` of word ``lo`` (continuing into ``hi``)."""
    s = shift.to(tl.uint32)
    v = lo.to(tl.uint32, bitcast=True) >> s
    if BITS == 3:
        # Two shifts keep each shift amount below 32 when s == 0.
        v = v | ((hi.to(tl.uint32, bitcast=True) << 1) << (31 - s))
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _three_bit_words(w0, w1, w2):
    """Where each value of 3-bit blocks lies: for words ``w0, w1, w2 [R, N]`` (one 32-value block
    per row), ``(lo, hi, shift)``: the word holding value ``j``'s first bit and the word after it,
    both ``[R, 32, N]``, and the bit offset in ``lo``, ``[1, 32, 1]``."""
    bit = tl.arange(0, 32)[None, :, None] * 3
    word = bit // 32
    w0 = w0[:, None, :]
    w1 = w1[:, None, :]
    w2 = w2[:, None, :]
    lo = tl.where(word == 0, w0, tl.where(word == 1, w1, w2))
    hi = tl.where(word == 0, w1, w2)
    return lo, hi, bit % 32


@triton.jit
def load_codes(
    qw_ptr,
    k0,
    offs_n,
    mask_n,
    k_words,
    stride_qk,
    stride_qn,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Codes ``[BLOCK_K, BLOCK_N]`` (int32) of input rows ``k0 .. k0 + BLOCK_K`` and columns ``offs_n``.

    Every packed word is loaded once and expanded in registers; ``k0`` and ``BLOCK_K`` are
    multiples of 32, so a tile covers whole words (3 bits: whole 3-word blocks).
    """
    if BITS == 3:
        blocks: tl.constexpr = BLOCK_K // 32
        row = (k0 // 32 + tl.arange(0, blocks)) * 3
        mask = (row < k_words)[:, None] & mask_n[None, :]
        ptrs = qw_ptr + row[:, None] * stride_qk + offs_n[None, :] * stride_qn
        w0 = tl.load(ptrs, mask=mask, other=0)
        w1 = tl.load(ptrs + stride_qk, mask=mask, other=0)
        w2 = tl.load(ptrs + 2 * stride_qk, mask=mask, other=0)
        lo, hi, shift = _three_bit_words(w0, w1, w2)
        q = _extract(lo, hi, shift, BITS)  # [blocks, 32, BLOCK_N]
    else:
        per_word: tl.constexpr = 32 // BITS
        rows: tl.constexpr = BLOCK_K // per_word
        row = k0 // per_word + tl.arange(0, rows)
        mask = (row < k_words)[:, None] & mask_n[None, :]
        w = tl.load(qw_ptr + row[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask, other=0)
        shift = tl.arange(0, per_word)[None, :, None] * BITS
        q = _extract(w[:, None, :], w[:, None, :], shift, BITS)  # [rows, per_word, BLOCK_N]
    return tl.reshape(q, (BLOCK_K, BLOCK_N))


@triton.jit
def load_zeros(qz_row_ptr, offs_n, mask, n_words, stride_zn, BITS: tl.constexpr):
    """True zero points (stored + 1) of columns ``offs_n`` in the packed row(s) at ``qz_row_ptr``."""
    bit = offs_n * BITS
    col = bit // 32
    shift = bit % 32
    lo = tl.load(qz_row_ptr + col * stride_zn, mask=mask, other=0)
    if BITS == 3:
        hi = tl.load(
            qz_row_ptr + (col + 1) * stride_zn, mask=mask & (shift > 29) & (col + 1 < n_words), other=0
        )
    else:
        hi = lo
    return _extract(lo, hi, shift, BITS) + 1


@triton.jit
def tile_group(k0, group_size):
    """``k0 // group_size`` for a K tile start ``k0`` when the group size is a multiple of the tile
    depth or spans all of K, in three instructions where the integer division in the K loop takes
    a dozen.

    ``(k0 + 0.5) / group_size`` lies at least ``0.5 / group_size`` from an integer, and float32
    rounds it by far less while ``K`` is at most ``TILE_GROUP_MAX_K`` (``group_mode`` checks)."""
    kf = tl.cast(k0, tl.float32) + 0.5
    return tl.cast(kf * (1.0 / tl.cast(group_size, tl.float32)), tl.int32)


@triton.jit
def dequant_tile(
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    k0,
    k_words,
    n_words,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    group_size,
    BITS: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Dequantised ``W^T`` tile ``[BLOCK_K, BLOCK_N]`` in ``OUT_DTYPE``: ``s * (q - z)`` per group.

    ``offs_k = k0 + arange(BLOCK_K)`` with ``k0`` a multiple of ``BLOCK_K`` (itself a multiple of 32).
    """
    q = load_codes(qw_ptr, k0, offs_n, mask_n, k_words, stride_qk, stride_qn, BITS, BLOCK_K, BLOCK_N)
    if GROUP_MODE == 0:
        g = tile_group(k0, group_size)
        z = load_zeros(qz_ptr + g * stride_zg, offs_n, mask_n, n_words, stride_zn, BITS)[None, :]
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
    else:
        if GROUP_MODE == 1:
            g = offs_k // group_size
        else:
            g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        mask = mask_k[:, None] & mask_n[None, :]
        z = load_zeros(qz_ptr + g[:, None] * stride_zg, offs_n[None, :], mask, n_words, stride_zn, BITS)
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
    w = (q - z).to(tl.float32) * s.to(tl.float32)
    return w.to(OUT_DTYPE)


def group_mode(sorted_groups: bool, group_size: int, block_k: int, k: int) -> int:
    """The ``GROUP_MODE`` constant for a launch over ``k`` inputs: one scale row per K tile where no
    tile crosses a group boundary (tiles dividing the group size, or one group over all of K)."""
    if not sorted_groups:
        return GROUPS_FROM_G_IDX
    if (group_size % block_k == 0 or group_size >= k) and k <= TILE_GROUP_MAX_K:
        return GROUPS_PER_TILE
    return GROUPS_BY_DIVISION
