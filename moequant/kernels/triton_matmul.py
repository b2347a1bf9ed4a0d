"""Triton matmuls that dequantise GPTQ-packed weights in registers.

``y[M, N] = x[M, K] @ W^T`` with ``W [N, K]`` packed as ``qweight int32 [K*b/32, N]``,
``qzeros int32 [G, N*b/32]`` (``z - 1``), ``scales fp16 [G, N]``. Each program loads the packed
words of a ``[BLOCK_K, BLOCK_N]`` tile once and expands them in registers (value ``k`` of a column
is stream bits ``[k*b, k*b + b)``; for 3 bits values 10 and 21 of every 32 continue into the next
word). The forms, chosen by :func:`pick_config` from the row count, bits and activation dtype:

- up to 64 rows (from one row for 2, 3 and 4-bit codes with 16-bit activations): ``tl.dot`` with the
  weight tile as the left operand, codes read as 16-bit floats and the zero taken off after the
  dot (:func:`dot_weights_left`);
- one row otherwise (decode): the GEMV kernel, products and sums in float32 registers without
  ``tl.dot`` (:func:`gemv_row`);
- otherwise up to ``DEQUANT_MIN_ROWS``, and where the weights-left form does not apply (float32
  activations, a ``g_idx`` to read, groups smaller than a K tile): ``tl.dot`` on the unpacked
  ``q - z`` tile with float32 accumulation, the group's scale applied to the product
  (:func:`dot_dequant`);
- more rows (prefill): ``W^T`` written once in the activation dtype, then torch's matmul.

Split-K (several programs along K for one output tile, which keeps the GPU busy at decode sizes)
finishes in the same launch: the last program to arrive at a tile adds the float32 parts of the
others (:func:`store_split`).

Import this module only after ``TRITON_INTERPRET`` has its final value: Triton decides at
decoration time whether kernels are compiled or interpreted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moequant.errors import MoequantError
from moequant.kernels.packed import check_bits, effective_group_size

# How a kernel finds the group of input row k.
GROUPS_PER_TILE = 0  # sorted groups and the whole K tile inside one group: one scale row per tile
GROUPS_BY_DIVISION = 1  # sorted groups, g = k // group_size per row
GROUPS_FROM_G_IDX = 2  # any g_idx, read from memory
# GROUPS_PER_TILE finds a tile's group by a float32 quotient (tile_group), exact below this K.
TILE_GROUP_MAX_K = 1 << 19

GEMV_MAX_ROWS = 1  # up to this many rows, the gemv kernel where the weights-left dot does not apply
# From this many activation rows on, dequant_matmul_triton writes W^T once in the activation dtype
# and multiplies with torch: the in-kernel dot measured 3.5-6.5x slower than bf16 at 256 rows on
# an H200, while one dequantising pass costs about the time of reading the bf16 weight once.
DEQUANT_MIN_ROWS = 128


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
def _load_codes(
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
def _load_zeros(qz_row_ptr, offs_n, mask, n_words, stride_zn, BITS: tl.constexpr):
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
    q = _load_codes(qw_ptr, k0, offs_n, mask_n, k_words, stride_qk, stride_qn, BITS, BLOCK_K, BLOCK_N)
    if GROUP_MODE == 0:
        g = tile_group(k0, group_size)
        z = _load_zeros(qz_ptr + g * stride_zg, offs_n, mask_n, n_words, stride_zn, BITS)[None, :]
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
    else:
        if GROUP_MODE == 1:
            g = offs_k // group_size
        else:
            g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        mask = mask_k[:, None] & mask_n[None, :]
        z = _load_zeros(qz_ptr + g[:, None] * stride_zg, offs_n[None, :], mask, n_words, stride_zn, BITS)
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
    w = (q - z).to(tl.float32) * s.to(tl.float32)
    return w.to(OUT_DTYPE)


@triton.jit
def dot_dequant(
    a,
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
    DOT_DTYPE: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``a [BLOCK_M, BLOCK_K] @ W^T tile [BLOCK_K, BLOCK_N]`` in float32, ``a`` in ``DOT_DTYPE``.

    When the tile lies in one group, ``sum_k a (q - z) s = s * (a @ (q - z))``: the scale touches
    the ``[BLOCK_M, BLOCK_N]`` result, not the tile, and ``q - z`` costs one subtraction (codes
    are turned into floats by ORing in the exponent bits of ``2^23``).
    """
    if GROUP_MODE == 0:
        q = _load_codes(qw_ptr, k0, offs_n, mask_n, k_words, stride_qk, stride_qn, BITS, BLOCK_K, BLOCK_N)
        g = tile_group(k0, group_size)
        z = _load_zeros(qz_ptr + g * stride_zg, offs_n, mask_n, n_words, stride_zn, BITS).to(tl.float32)
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        # q - z in [-255, 255] is exact in every dot dtype.
        q = ((q | 0x4B000000).to(tl.float32, bitcast=True) - (z + 8388608.0)[None, :]).to(DOT_DTYPE)
        if IEEE_FP32:
            part = tl.dot(a, q, input_precision="ieee")
        else:
            part = tl.dot(a, q)
        out = s[None, :] * part
    else:
        w = dequant_tile(
            qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n, k0, k_words, n_words,
            stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
            BITS, GROUP_MODE, DOT_DTYPE, BLOCK_K, BLOCK_N,
        )  # fmt: skip
        if IEEE_FP32:
            out = tl.dot(a, w, input_precision="ieee")
        else:
            out = tl.dot(a, w)
    return out


@triton.jit
def last_to_arrive(count_ptr, tile, arrivals):
    """Whether this program is the last of ``arrivals`` to reach the counter ``count_ptr + tile``
    (zero before the launch); the last one sets it back to zero for the next launch.

    What every thread of a program stored before the call is visible to the last program after it:
    the counter moves with release and acquire semantics after a barrier across the program.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == arrivals - 1
    if last:
        tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def store_split(acc, out_ptrs, mask, ws_ptr, ws_offs, split_stride, count_ptr, tile, pid_k, splits):
    """Finish one split-K program's part ``acc`` of an output tile, in the same launch.

    The part goes to ``ws_ptr + pid_k * split_stride + ws_offs`` (float32 workspace); the program
    that arrives last at the tile's counter adds the ``splits`` parts in split order, so results
    do not depend on timing, and stores the sum in the output's dtype.
    """
    tl.store(ws_ptr + pid_k * split_stride + ws_offs, acc, mask=mask)
    if last_to_arrive(count_ptr, tile, splits):
        total = tl.zeros(acc.shape, tl.float32)
        for i in range(splits):
            total += tl.load(ws_ptr + i * split_stride + ws_offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def rows_dot(
    row_ptrs, row_mask, stride_k, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, mask_n, k_lo, k_hi,
    k_words, n_words, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
    BITS: tl.constexpr, GROUP_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE_FP32: tl.constexpr,
    WEIGHTS_LEFT: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, up_off=0,
    GATE_UP: tl.constexpr = False, ONE_ROW: tl.constexpr = False, EVEN: tl.constexpr = False,
):  # fmt: skip
    """``sum_{k_lo <= k < k_hi} a[m, k] * W[n, k]`` as ``[BLOCK_M, BLOCK_N]`` float32, row ``m`` of
    ``a`` at ``row_ptrs[m]`` (``[BLOCK_M]`` pointers; rows outside ``row_mask`` read as zero) with
    stride ``stride_k``: :func:`dot_dequant` per K tile, or with ``WEIGHTS_LEFT`` (16-bit ``a``, one
    group per K tile) ``W a^T`` by :func:`dot_weights_left`, ``DOT_DTYPE`` float32 then meaning
    that the interpreter widens the 16-bit operands. With ``GATE_UP`` also the sums for the
    columns ``offs_n + up_off`` from the same loads of ``a``, returned second. ``ONE_ROW`` (with
    ``WEIGHTS_LEFT``): ``row_ptrs`` is the one row's pointer and the other rows are zero, so that
    the row is loaded, put in pair order and summed as a vector, not as a tile. ``EVEN`` (with
    ``WEIGHTS_LEFT``): every K and column tile is whole, so that loads need no masks."""
    if WEIGHTS_LEFT:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        up_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if ONE_ROW:
                if EVEN:
                    xk = tl.load(row_ptrs + offs_k * stride_k)
                else:
                    xk = tl.load(row_ptrs + offs_k * stride_k, mask=offs_k < k_hi, other=0.0)
                if BITS != 8:
                    xk = pair_order(xk, BITS)
                first = (tl.arange(0, BLOCK_M) == 0)[:, None]
                # built as [BLOCK_M, BLOCK_K], each thread's inputs contiguous, then transposed
                at = tl.trans(tl.where(first, xk[None, :], tl.zeros((BLOCK_M, BLOCK_K), xk.dtype)))
                sx = tl.reshape(tl.where(first, tl.sum(xk.to(tl.float32)), 0.0), (1, BLOCK_M))
            else:
                at = tl.load(
                    row_ptrs[None, :] + offs_k[:, None] * stride_k,
                    mask=row_mask[None, :] & (offs_k < k_hi)[:, None],
                    other=0.0,
                )
                if BITS != 8:
                    at = pair_order(at, BITS)
                sx = tl.sum(at.to(tl.float32), axis=0)[None, :]
            acc_t += dot_weights_left(
                at, sx, qw_ptr, qz_ptr, s_ptr, offs_n, mask_n, k0, k_words, n_words,
                stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
                BITS, BLOCK_K, DOT_DTYPE == tl.float32, ASM, EVEN,
            )  # fmt: skip
            if GATE_UP:
                up_t += dot_weights_left(
                    at, sx, qw_ptr, qz_ptr, s_ptr, offs_n + up_off, mask_n, k0, k_words, n_words,
                    stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
                    BITS, BLOCK_K, DOT_DTYPE == tl.float32, ASM, EVEN,
                )  # fmt: skip
        acc = tl.trans(acc_t)
        up = tl.trans(up_t)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            a = tl.load(
                row_ptrs[:, None] + offs_k[None, :] * stride_k,
                mask=row_mask[:, None] & mask_k[None, :],
                other=0.0,
            ).to(DOT_DTYPE)
            acc += dot_dequant(
                a, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n, k0, k_words, n_words,
                stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
                BITS, GROUP_MODE, DOT_DTYPE, IEEE_FP32, BLOCK_K, BLOCK_N,
            )  # fmt: skip
            if GATE_UP:
                up += dot_dequant(
                    a, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n + up_off, mask_k, mask_n, k0,
                    k_words, n_words, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
                    group_size, BITS, GROUP_MODE, DOT_DTYPE, IEEE_FP32, BLOCK_K, BLOCK_N,
                )  # fmt: skip
    if GATE_UP:
        out = (acc, up)
    else:
        out = acc
    return out


@triton.jit
def _dequant_matmul_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    ws_ptr,
    count_ptr,
    M,
    N,
    K,
    k_words,
    n_words,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    stride_om,
    stride_on,
    group_size,
    k_per_split,
    splits,
    BITS: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    WEIGHTS_LEFT: tl.constexpr,
    STAGES: tl.constexpr,
    ASM: tl.constexpr,
    GEMV: tl.constexpr,
    EVEN: tl.constexpr,
    ONE_ROW: tl.constexpr = False,
):
    """``y = x @ W^T`` by ``[BLOCK_M, BLOCK_N]`` tiles (grid ``[M blocks * N blocks, splits]``),
    each by :func:`rows_dot`, or with ``GEMV`` (``BLOCK_M = 1``, no dot) by :func:`gemv_row`.
    ``EVEN``: every tile is whole (see :func:`gemv_row`). ``ONE_ROW``: ``M = 1`` on the
    weights-left dot (see :func:`rows_dot`)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if GEMV:
        acc = gemv_row(
            x_ptr + pid_m * stride_xm, stride_xk, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, N, k_lo, k_hi,
            k_words, n_words, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
            BITS, GROUP_MODE, BLOCK_N, BLOCK_K, ASM, EVEN, STAGES,
        )[None, :]  # fmt: skip
    else:
        if ONE_ROW:
            row_ptrs = x_ptr
        else:
            row_ptrs = x_ptr + offs_m * stride_xm
        acc = rows_dot(
            row_ptrs, mask_m, stride_xk, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, mask_n,
            k_lo, k_hi, k_words, n_words, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
            group_size, BITS, GROUP_MODE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, IEEE_FP32, WEIGHTS_LEFT,
            STAGES, ASM, 0, False, ONE_ROW, EVEN,
        )  # fmt: skip
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K:
        ws_offs = offs_m[:, None] * N + offs_n[None, :]
        store_split(acc, out_ptrs, out_mask, ws_ptr, ws_offs, M * N, count_ptr, pid, pid_k, splits)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _bytes_nk(w):
    """The 8-bit codes of words ``w [N, R]`` (uint32) as ``[N, R * 4]``, byte ``v`` of word ``r`` at
    column ``4r + v``: joined into two new trailing axes (lowest bit of ``v`` first), which are then
    swapped and merged, so that every code stays in the register of the thread that loaded it."""
    n: tl.constexpr = w.shape[0]
    r: tl.constexpr = w.shape[1]
    lo = tl.join(w & 0xFF, (w >> 8) & 0xFF)
    hi = tl.join((w >> 16) & 0xFF, w >> 24)
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), (n, r * 4))


@triton.jit
def _mask_or(v, MASK: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """``(v & MASK) | MAGIC`` for uint32 ``v``; with ``ASM`` one ``lop3``."""
    if ASM:
        out = tl.inline_asm_elementwise(
            f"lop3.b32 $0, $1, {MASK}, {MAGIC}, 0xEA;", "=r,r", [v], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        out = (v & MASK) | MAGIC
    return out


@triton.jit
def _half_pair(w, i: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """Values ``i`` and ``i + 16 / BITS`` of the 2 or 4-bit words ``w [N, R]`` (uint32) as two 16-bit
    floats ``c + q`` in one uint32 (the first in the low half), ``MAGIC`` holding ``c``'s bits twice;
    one shift and one ``lop3``."""
    return _mask_or(w >> (BITS * i), ((1 << BITS) - 1) * 0x10001, MAGIC, ASM)


@triton.jit
def _half_pair3(w0, w1, w2, i: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """Values ``i`` and ``i + 16`` of the 3-bit blocks ``w0, w1, w2 [N, R]`` as two 16-bit floats
    ``c + q`` in one uint32 (as :func:`_half_pair`).

    In 14 of the 16 pairs both values lie 16 bits apart in one of three words built from halves of
    the block (values 0-4 with 16-20, 6-9 with 22-25, 11-15 with 27-31; one ``lop3`` or funnel shift
    each, shared by their pairs), so that a pair costs one shift and one ``lop3``; pairs 5 and 10
    cross a word and take two shifts and two ``lop3``."""
    if i == 5 or i == 10:
        if i == 5:  # stream bits 15-17 and 63-65
            lo = w0 >> 15
            hi = (w1 >> 15) | (w2 << 17)
        else:  # stream bits 30-32 and 78-80
            lo = (w0 >> 30) | (w1 << 2)
            hi = w2 << 2
        if ASM:
            out = tl.inline_asm_elementwise(
                f"{{ .reg .b32 t; lop3.b32 t, $1, 7, {MAGIC}, 0xEA; lop3.b32 $0, $2, 0x70000, t, 0xEA; }}",
                "=r,r,r",
                [lo, hi],
                dtype=tl.uint32,
                is_pure=True,
                pack=1,
            )
        else:
            out = (lo & 7) | (hi & 0x70000) | MAGIC
    else:
        if i < 5:
            v = (w0 & 0xFFFF) | (w1 & 0xFFFF0000)
        elif i < 10:
            v = (w0 >> 16) | (w2 << 16)
        else:
            v = (w1 & 0xFFFF) | (w2 & 0xFFFF0000)
        out = _mask_or(v >> ((3 * i) % 16), 0x70007, MAGIC, ASM)
    return out


@triton.jit
def _halves(p):
    """``[N, R]`` uint32 -> ``[N, R, 2]`` uint16, low half first (the same bits, one register)."""
    return tl.join(p.to(tl.uint16), (p >> 16).to(tl.uint16))


@triton.jit
def _pair_at(w0, w1, w2, i: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    if BITS == 3:
        p = _half_pair3(w0, w1, w2, i, MAGIC, ASM)
    else:
        p = _half_pair(w0, i, BITS, MAGIC, ASM)
    return _halves(p)


@triton.jit
def _four_pairs(w0, w1, w2, i: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """Pairs ``i .. i + 3`` as ``[N, R, h, a, b]``, pair ``i + a + 2b``."""
    return tl.join(
        tl.join(_pair_at(w0, w1, w2, i, BITS, MAGIC, ASM), _pair_at(w0, w1, w2, i + 1, BITS, MAGIC, ASM)),
        tl.join(_pair_at(w0, w1, w2, i + 2, BITS, MAGIC, ASM), _pair_at(w0, w1, w2, i + 3, BITS, MAGIC, ASM)),
    )


@triton.jit
def _paired_codes_nk(w0, w1, w2, BITS: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """The 16-bit floats ``c + q`` of 2, 3 or 4-bit blocks ``w0, w1, w2 [N, R]`` (3 bits: 32 values
    in three words, else ``V = 32 / BITS`` in ``w0``) as ``[N, R * V]`` (uint16 bits) in pair order:
    column ``r * V + 2i + h`` holds value ``i + h * V / 2`` of block ``r``, so that each pair of
    columns comes from one or two shifted words in one or two ``lop3`` (see :func:`pair_order`)."""
    n: tl.constexpr = w0.shape[0]
    r: tl.constexpr = w0.shape[1]
    t = _four_pairs(w0, w1, w2, 0, BITS, MAGIC, ASM)  # [N, R, h, a, b]
    if BITS == 4:
        out = tl.reshape(tl.permute(t, (0, 1, 4, 3, 2)), (n, r * 8))
    else:
        t = tl.join(t, _four_pairs(w0, w1, w2, 4, BITS, MAGIC, ASM))  # [N, R, h, a, b, c]
        if BITS == 2:
            out = tl.reshape(tl.permute(t, (0, 1, 5, 4, 3, 2)), (n, r * 16))
        else:
            t2 = tl.join(
                _four_pairs(w0, w1, w2, 8, BITS, MAGIC, ASM), _four_pairs(w0, w1, w2, 12, BITS, MAGIC, ASM)
            )
            t = tl.join(t, t2)  # [N, R, h, a, b, c, d]
            out = tl.reshape(tl.permute(t, (0, 1, 6, 5, 4, 3, 2)), (n, r * 32))
    return out


@triton.jit
def pair_order(xt, BITS: tl.constexpr):
    """Rows of ``xt [K, M]`` or ``[K]`` (``K`` a multiple of ``V``, 32 at 3 bits, else ``32 / BITS``)
    in the order of :func:`_paired_codes_nk`: row ``r * V + 2i + h`` becomes input
    ``r * V + i + h * V / 2``."""
    k: tl.constexpr = xt.shape[0]
    v: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    if len(xt.shape) == 1:
        out = tl.reshape(tl.permute(tl.reshape(xt, (k // v, 2, v // 2)), (0, 2, 1)), (k,))
    else:
        m: tl.constexpr = xt.shape[1]
        t = tl.reshape(xt, (k // v, 2, v // 2, m))
        out = tl.reshape(tl.permute(t, (0, 2, 1, 3)), (k, m))
    return out


@triton.jit
def dot_weights_left(
    xt,
    sx,
    qw_ptr,
    qz_ptr,
    s_ptr,
    offs_n,
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
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    ASM: tl.constexpr,
    EVEN: tl.constexpr = False,
):
    """``W tile [BLOCK_N, BLOCK_K] @ xt [BLOCK_K, M]`` in float32 for 16-bit ``xt`` (zero rows
    where there is no input), the tile's ``BLOCK_K`` inputs from ``k0`` in one group; ``xt`` in
    pair order (:func:`pair_order`) unless 8-bit, and ``sx [1, M]`` its float32 column sums.

    The weight tile is the dot's left operand, unpacked in the registers that loaded it. Codes
    below 128 (2, 3, 4 bits) become the 16-bit floats ``c + q`` by ORing in the bits of ``c``
    (128 in bfloat16, 1024 in float16), two codes at once, the dot's K order then being the pair
    order of both operands. 8-bit codes are converted. The dot's float32 sums then lose
    ``(c + z) * sum_k x`` per column and take the group's scale. ``DOT_F32``: widen
    both operands to float32 first (the interpreter computes bfloat16 dots wrongly; the values
    are the same). ``ASM``: compiled for a GPU (``lop3``). ``EVEN``: the tile is whole (no masks).
    """
    per_block: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # values per block of words
    words: tl.constexpr = 3 if BITS == 3 else 1  # words per block
    blocks: tl.constexpr = BLOCK_K // per_block
    x_dtype = xt.dtype
    g = tile_group(k0, group_size)
    z = _load_zeros(qz_ptr + g * stride_zg, offs_n, mask_n, n_words, stride_zn, BITS).to(tl.float32)
    row = (k0 // per_block + tl.arange(0, blocks)) * words
    w_ptrs = qw_ptr + row[None, :] * stride_qk + offs_n[:, None] * stride_qn
    if EVEN:
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn).to(tl.float32)
        w0 = tl.load(w_ptrs).to(tl.uint32, bitcast=True)
        if BITS == 3:
            w1 = tl.load(w_ptrs + stride_qk).to(tl.uint32, bitcast=True)
            w2 = tl.load(w_ptrs + 2 * stride_qk).to(tl.uint32, bitcast=True)
    else:
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        w_mask = mask_n[:, None] & (row < k_words)[None, :]
        w0 = tl.load(w_ptrs, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
        if BITS == 3:
            w1 = tl.load(w_ptrs + stride_qk, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
            w2 = tl.load(w_ptrs + 2 * stride_qk, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
    if BITS != 3:
        w1 = w0
        w2 = w0
    if BITS != 8:
        if x_dtype == tl.bfloat16:
            wq = _paired_codes_nk(w0, w1, w2, BITS, 0x43004300, ASM).to(x_dtype, bitcast=True)
            off = z + 128.0
        else:
            wq = _paired_codes_nk(w0, w1, w2, BITS, 0x64006400, ASM).to(x_dtype, bitcast=True)
            off = z + 1024.0
    else:
        wq = _bytes_nk(w0).to(tl.float32).to(x_dtype)
        off = z
    if DOT_F32:
        part = tl.dot(wq.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
    else:
        part = tl.dot(wq, xt)
    return s[:, None] * (part - off[:, None] * sx)


@triton.jit
def _byte_as_float(plane, c, i: tl.constexpr, ASM: tl.constexpr):
    """Byte ``i`` of each uint32 in ``plane [R, N]``, read as float32 ``2^23 + byte``.

    With ``ASM`` (a compiled GPU kernel) one ``prmt`` puts the byte under the top three bytes of
    ``2^23``, whose bits are taken from ``c = 2^23 + z`` (``[N]`` float32, ``z <= 256``) at run time
    so that they stay in a register; otherwise shift, mask and OR (any backend, the interpreter too).
    """
    if ASM:
        e23 = c.to(tl.uint32, bitcast=True) & 0xFF800000  # sign and exponent: the bits of 2^23
        c_bits = tl.zeros(plane.shape, tl.uint32) + e23[None, :]
        v = tl.inline_asm_elementwise(
            f"prmt.b32 $0, $1, $2, {0x7650 | i};",
            "=r,r,r",
            [plane, c_bits],
            dtype=tl.uint32,
            is_pure=True,
            pack=1,
        )
    else:
        v = ((plane >> (8 * i)) & 0xFF) | 0x4B000000
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _split4(x):
    """Columns ``0..3`` of ``x [R, 4]``, each ``[R]``."""
    rows: tl.constexpr = x.shape[0]
    x02, x13 = tl.split(tl.reshape(x, (rows, 2, 2)))
    x0, x2 = tl.split(x02)
    x1, x3 = tl.split(x13)
    return x0, x1, x2, x3


@triton.jit
def _gemv_8bit_sum(w, x, c, ASM: tl.constexpr):
    """``sum_i x[r, i] * (byte_i(w[r, n]) - z[n])``: 8-bit words ``w [R, N]`` (uint32), ``x [R, 4]``
    float32, ``c = 2^23 + z`` ``[N]``; returns ``[R, N]``.

    A code ``q`` under ``2^23``'s exponent bits reads as the float ``2^23 + q``, so one subtraction
    gives ``q - z`` exactly.
    """
    x0, x1, x2, x3 = _split4(x)
    out = x0[:, None] * (_byte_as_float(w, c, 0, ASM) - c[None, :])
    out += x1[:, None] * (_byte_as_float(w, c, 1, ASM) - c[None, :])
    out += x2[:, None] * (_byte_as_float(w, c, 2, ASM) - c[None, :])
    out += x3[:, None] * (_byte_as_float(w, c, 3, ASM) - c[None, :])
    return out


# A b-bit code (b <= 4) at the top of the mantissa of 0.5 (bits 23-b..22 under 0x3F000000) is the
# float f = 0.5 + q u, u = 2^-(b+1), with no subtraction; sum_j x_j (q_j - z) = (sum_j x_j f_j -
# (0.5 + z u) sum_j x_j) / u, the second sum taken once per row of the tile, not per column. As
# 0.5 is only 2^b units, the subtraction cancels at most about one bit of the float32 sums.


@triton.jit
def _byte_as_half_plus(plane, half, i: tl.constexpr, ASM: tl.constexpr):
    """Byte ``i`` (below 128) of each uint32 in ``plane [R, N]`` as the float32 ``0.5 + byte / 256``
    (a b-bit code held at bits ``7-b..6`` of its byte: ``0.5 + q / 2^(b+1)``).

    ``half`` (``[N]`` uint32) holds 0x3F000000, computed at run time so that it stays in a
    register instead of being rematerialised per element. With ``ASM`` one ``prmt`` places the
    byte under its exponent byte.
    """
    if ASM:
        v = tl.inline_asm_elementwise(
            f"prmt.b32 $0, $1, $2, {0x7054 | (i << 8)};",
            "=r,r,r",
            [plane, tl.zeros(plane.shape, tl.uint32) + half[None, :]],
            dtype=tl.uint32,
            is_pure=True,
            pack=1,
        )
    else:
        v = (((plane >> (8 * i)) & 0xFF) << 16) | half[None, :]
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _half_plus_plane_sum(acc, plane, x, half, ASM: tl.constexpr):
    """``acc + sum_i x[r, i] * (0.5 + byte_i(plane[r, n]) / 256)``: ``plane [R, N]`` uint32 with one
    code per byte (below 128), ``x [R, 4]`` float32, ``acc [R, N]``."""
    x0, x1, x2, x3 = _split4(x)
    acc += x0[:, None] * _byte_as_half_plus(plane, half, 0, ASM)
    acc += x1[:, None] * _byte_as_half_plus(plane, half, 1, ASM)
    acc += x2[:, None] * _byte_as_half_plus(plane, half, 2, ASM)
    acc += x3[:, None] * _byte_as_half_plus(plane, half, 3, ASM)
    return acc


@triton.jit
def _half_plus_words_sum(acc, w, x, half, BITS: tl.constexpr, ASM: tl.constexpr):
    """``acc + sum_j x[r, j] * (0.5 + q_j(w[r, n]) / 2^(BITS+1))`` for 2 or 4-bit words ``w [R, N]``
    (uint32) and ``x [R, 32 / BITS]`` float32; returns ``[R, N]``.

    Each word is split into ``8 / BITS`` byte planes (plane ``b`` holds value ``i * 8 / BITS + b``
    at the top of byte ``i``, bits ``7-BITS..6``), so that each code is one byte of a plane.
    """
    rows: tl.constexpr = x.shape[0]
    if BITS == 4:
        x_even, x_odd = tl.split(tl.reshape(x, (rows, 4, 2)))
        acc = _half_plus_plane_sum(acc, (w << 3) & 0x78787878, x_even, half, ASM)
        acc = _half_plus_plane_sum(acc, (w >> 1) & 0x78787878, x_odd, half, ASM)
    else:
        x_02, x_13 = tl.split(tl.reshape(x, (rows, 4, 2, 2)))
        x0, x2 = tl.split(x_02)
        x1, x3 = tl.split(x_13)
        acc = _half_plus_plane_sum(acc, (w << 5) & 0x60606060, x0, half, ASM)
        acc = _half_plus_plane_sum(acc, (w << 3) & 0x60606060, x1, half, ASM)
        acc = _half_plus_plane_sum(acc, (w << 1) & 0x60606060, x2, half, ASM)
        acc = _half_plus_plane_sum(acc, (w >> 1) & 0x60606060, x3, half, ASM)
    return acc


@triton.jit
def _code_at_20(lo, hi, shift: tl.constexpr):
    """The stream bits ``[shift, shift + 3)`` of word ``lo`` (continuing into ``hi``) moved to bits
    ``20..22``; other bits are left as they fall (``[R, N]`` uint32 words, ``shift`` in 0..31)."""
    if shift > 29:
        v = (lo >> (shift - 20)) | (hi << (52 - shift))
    elif shift >= 20:
        v = lo >> (shift - 20)
    else:
        v = lo << (20 - shift)
    return v


@triton.jit
def _half_plus_3bit_sum(
    acc, w0, w1, w2, x_ptrs, x_mask, stride_xk, half, ASM: tl.constexpr, EVEN: tl.constexpr
):
    """``acc + sum_j x[r, j] * (0.5 + q_j / 16)`` for 3-bit blocks of three words ``w0, w1, w2
    [R, N]`` (uint32; 32 codes each, value ``j`` at stream bits ``[3j, 3j + 3)``), with ``x[r, j]``
    read at ``x_ptrs + j * stride_xk`` (``x_ptrs [R]``, value 0 of each block; rows outside
    ``x_mask [R]`` read as zero unless ``EVEN``); returns the sum ``[R, N]`` and ``sum_j x[r, j]``
    ``[R]``.

    One shift per code brings it to bit 20, the top of the mantissa (two for the codes split
    across words), and with ``ASM`` mask and OR are one ``lop3``; the products chain into fused
    multiply-adds.
    """
    sx = tl.zeros(x_ptrs.shape, tl.float32)
    for j in tl.static_range(32):
        if 3 * j < 32:
            v = _code_at_20(w0, w1, 3 * j % 32)
        elif 3 * j < 64:
            v = _code_at_20(w1, w2, 3 * j % 32)
        else:
            v = _code_at_20(w2, w2, 3 * j % 32)
        if ASM:
            v = tl.inline_asm_elementwise(
                "lop3.b32 $0, $1, 0x700000, $2, 0xEA;",
                "=r,r,r",
                [v, tl.zeros(v.shape, tl.uint32) + half[None, :]],
                dtype=tl.uint32,
                is_pure=True,
                pack=1,
            )
        else:
            v = (v & 0x700000) | half[None, :]
        if EVEN:
            xj = tl.load(x_ptrs + j * stride_xk).to(tl.float32)
        else:
            xj = tl.load(x_ptrs + j * stride_xk, mask=x_mask, other=0.0).to(tl.float32)
        sx += xj
        acc += xj[:, None] * v.to(tl.float32, bitcast=True)
    return acc, sx


@triton.jit
def gemv_row(
    x_row,
    stride_xk,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    offs_n,
    N,
    k_lo,
    k_hi,
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ASM: tl.constexpr,
    EVEN: tl.constexpr,
    STAGES: tl.constexpr,
):
    """``sum_{k_lo <= k < k_hi} x[k] * W[n, k]`` for the columns ``offs_n`` (``[BLOCK_N]`` float32)
    of one activation row ``x_row``, in float32 registers without ``tl.dot``.

    With one group per tile, partial sums stay per packed row across the K loop and are reduced
    over rows once at the end; 2, 3 and 4-bit codes are read as ``0.5 + q / 2^(BITS+1)`` (see
    :func:`_byte_as_half_plus`), 8-bit ones as ``2^23 + q``. The K loop is software-pipelined: with
    ``STAGES > 1`` the loads of the next ``STAGES - 1`` tiles are in flight (asynchronous copies
    into shared memory on the GPU) while one tile is computed. ``EVEN``: every tile is whole
    (``K`` and ``N`` multiples of the block sizes, ``k_lo`` of ``BLOCK_K``), so no load needs a
    mask.
    """
    mask_n = offs_n < N
    if GROUP_MODE == 0:
        per_word: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # values per word (3 bits: per 3 words)
        rows: tl.constexpr = BLOCK_K // per_word
        r = tl.arange(0, rows)
        kk = r[:, None] * per_word + tl.arange(0, per_word)[None, :]
        x_ptrs = x_row + (k_lo + kk) * stride_xk
        words: tl.constexpr = 3 if BITS == 3 else 1  # words per row of the tile
        w_ptrs = qw_ptr + ((k_lo // per_word + r) * words)[:, None] * stride_qk + offs_n[None, :] * stride_qn
        acc_rows = tl.zeros((rows, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            g = tile_group(k0, group_size)
            if BITS != 3:  # 3-bit sums read x value by value
                if EVEN:
                    x = tl.load(x_ptrs).to(tl.float32)
                else:
                    x = tl.load(x_ptrs, mask=k0 + kk < k_hi, other=0.0).to(tl.float32)
            if EVEN:
                z = _load_zeros(qz_ptr + g * stride_zg, offs_n, offs_n < N, n_words, stride_zn, BITS)
                s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn).to(tl.float32)
            else:
                z = _load_zeros(qz_ptr + g * stride_zg, offs_n, mask_n, n_words, stride_zn, BITS)
                s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
            if BITS == 3:
                if EVEN:
                    w0 = tl.load(w_ptrs).to(tl.uint32, bitcast=True)
                    w1 = tl.load(w_ptrs + stride_qk).to(tl.uint32, bitcast=True)
                    w2 = tl.load(w_ptrs + 2 * stride_qk).to(tl.uint32, bitcast=True)
                else:
                    w_mask = (k0 + r * per_word < k_hi)[:, None] & mask_n[None, :]
                    w0 = tl.load(w_ptrs, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
                    w1 = tl.load(w_ptrs + stride_qk, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
                    w2 = tl.load(w_ptrs + 2 * stride_qk, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
            elif EVEN:
                w = tl.load(w_ptrs).to(tl.uint32, bitcast=True)
            else:
                w_mask = (k0 + r * per_word < k_hi)[:, None] & mask_n[None, :]
                w = tl.load(w_ptrs, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
            if BITS == 8:
                acc_rows += s[None, :] * _gemv_8bit_sum(w, x, z.to(tl.float32) + 8388608.0, ASM)
            else:
                # The sums start from -(0.5 + z u) * sum_j x_j and the scale takes the 1 / u.
                zf = z.to(tl.float32) + 128.0
                half = (zf.to(tl.uint32, bitcast=True) & 0xFF800000) - 0x04000000  # 2^7 -> 2^-1: 0x3F000000
                inv_u: tl.constexpr = 2 << BITS
                off = zf * (1.0 / inv_u) + (0.5 - 128.0 / inv_u)  # 0.5 + z u
                if BITS == 3:
                    part, sx = _half_plus_3bit_sum(
                        tl.zeros((rows, BLOCK_N), tl.float32),
                        w0, w1, w2, x_row + (k0 + r * per_word) * stride_xk, k0 + r * per_word < k_hi,
                        stride_xk, half, ASM, EVEN,
                    )  # fmt: skip
                    part -= off[None, :] * sx[:, None]
                else:
                    part = -off[None, :] * tl.sum(x, axis=1)[:, None]
                    part = _half_plus_words_sum(part, w, x, half, BITS, ASM)
                acc_rows += (s * inv_u)[None, :] * part
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += rows * words * stride_qk
        acc = tl.sum(acc_rows, axis=0)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            w = dequant_tile(
                qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n, k0, k_words, n_words,
                stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
                BITS, GROUP_MODE, tl.float32, BLOCK_K, BLOCK_N,
            )  # fmt: skip
            xk = tl.load(x_row + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            acc += tl.sum(xk[:, None] * w, axis=0)
    return acc


@triton.jit
def decode_row(
    x_row, stride_xk, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, N, k_lo, k_hi, k_words, n_words,
    stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
    BITS: tl.constexpr, GROUP_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ASM: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr, WEIGHTS_LEFT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, up_off=0, GATE_UP: tl.constexpr = False,
):  # fmt: skip
    """``sum_{k_lo <= k < k_hi} x[k] * W[n, k]`` for the columns ``offs_n`` (``[BLOCK_N]`` float32)
    of one activation row: :func:`gemv_row`, or with ``WEIGHTS_LEFT`` the weights-left dot
    (:func:`rows_dot`) on a 16-row block holding the row once. With ``GATE_UP`` also the sums for
    the columns ``offs_n + up_off`` (below ``N + up_off``), returned second."""
    if WEIGHTS_LEFT:
        rows = tl.arange(0, 16)
        part = rows_dot(
            x_row, rows == 0, stride_xk, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, offs_n < N,
            k_lo, k_hi, k_words, n_words, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
            group_size, BITS, GROUP_MODE, 16, BLOCK_N, BLOCK_K, DOT_DTYPE, False, True, STAGES, ASM,
            up_off, GATE_UP, True, EVEN,
        )  # fmt: skip
        if GATE_UP:
            out = (tl.sum(part[0], axis=0), tl.sum(part[1], axis=0))
        else:
            out = tl.sum(part, axis=0)
    else:
        out = gemv_row(
            x_row, stride_xk, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, N, k_lo, k_hi, k_words, n_words,
            stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
            BITS, GROUP_MODE, BLOCK_N, BLOCK_K, ASM, EVEN, STAGES,
        )  # fmt: skip
        if GATE_UP:
            up = gemv_row(
                x_row, stride_xk, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n + up_off, N + up_off, k_lo, k_hi,
                k_words, n_words, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
                group_size, BITS, GROUP_MODE, BLOCK_N, BLOCK_K, ASM, EVEN, STAGES,
            )  # fmt: skip
            out = (out, up)
    return out


@triton.jit
def _dequant_kernel(
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    N,
    K,
    k_words,
    n_words,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    stride_ok,
    stride_on,
    group_size,
    BITS: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``W^T [K, N]`` in the output's dtype, one ``[BLOCK_K, BLOCK_N]`` tile per program."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    w = dequant_tile(
        qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n, k0, k_words, n_words,
        stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
        BITS, GROUP_MODE, out_ptr.dtype.element_ty, BLOCK_K, BLOCK_N,
    )  # fmt: skip
    tl.store(
        out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on,
        w,
        mask=mask_k[:, None] & mask_n[None, :],
    )


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes of one launch: powers of two, ``block_m, block_n >= 16``, ``block_k >= 32``.

    ``gemv=True`` selects the one-row-per-program kernel (no ``tl.dot``); it takes ``block_m=1``.
    ``weights_left=True`` selects the dot kernel with the weight tile as the left operand (16-bit
    activations and one group per K tile; other launches take the plain dot kernel).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False
    weights_left: bool = False

    def __post_init__(self) -> None:
        if self.gemv:
            if self.block_m != 1:
                raise ValueError(
                    f"the gemv kernel takes one row per program: block_m must be 1, got {self.block_m}"
                )
            check_tiles(16, self.block_n, self.block_k)
            if self.weights_left:
                raise ValueError("gemv and weights_left are two different kernels: choose one")
        else:
            check_tiles(self.block_m, self.block_n, self.block_k)
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


def check_tiles(block_m: int, block_n: int, *block_ks: int) -> None:
    """Raise ValueError unless the tile sizes suit ``tl.dot`` and whole-word unpacking."""
    sizes = (block_m, block_n, *block_ks)
    if any(v & (v - 1) for v in sizes) or min(block_m, block_n) < 16 or min(block_ks) < 32:
        raise ValueError(f"tile sizes {sizes} must be powers of two, M and N >= 16, K >= 32")


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_programs(device: torch.device) -> int:
    """How many concurrently running programs make the device busy (2 per SM on CUDA, 1 elsewhere)."""
    if device.type != "cuda":
        return 1
    return 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def pick_block_k(group_size: int, default: int) -> int:
    """``default``, shrunk to the group size when groups are smaller (keeps a tile in one group).

    Tiles stay at least 32 rows deep: the kernels unpack whole 32-value blocks.
    """
    if group_size < default and group_size >= 32 and group_size & (group_size - 1) == 0:
        return group_size
    return default


IN_FLIGHT_BYTES = 16 * 1024


def pipeline_depth(bits: int, block_n: int, block_k: int, most: int = 5) -> int:
    """Software-pipeline stages (3 to ``most``) that keep about ``IN_FLIGHT_BYTES`` of packed codes
    loading ahead of each program: ``stages - 1`` tiles of ``block_k x block_n`` codes.

    Decode reads at full bandwidth only with bandwidth x latency bytes in flight, about 25 KB per
    SM on an H200 (4.8 TB/s, ~0.7 us, 132 SMs); the one-row weights-left programs fit three to an
    SM (evals/kernel_sass.py), so 16 KB each keeps twice that. 128 x 128 tiles: 3 stages at 4 and
    8 bits, 4 at 3 bits, 5 at 2 bits.
    """
    tile = block_n * block_k * bits // 8
    return min(most, max(3, 1 + -(-IN_FLIGHT_BYTES // tile)))


def split_for(k: int, block_k: int, tiles: int, target_programs: int) -> int:
    """Split-K factor that brings ``tiles * split`` up to ``target_programs``, at most one split per K block."""
    k_blocks = triton.cdiv(k, block_k)
    want = triton.cdiv(target_programs, max(tiles, 1))
    return max(1, min(want, k_blocks, 32))


def k_split(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """``(K per split, splits)`` for a requested split: whole ``block_k`` tiles per split."""
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def pick_config(
    m: int,
    n: int,
    k: int,
    group_size: int,
    device: torch.device,
    *,
    bits: int = 4,
    half: bool = True,
    sorted_groups: bool = True,
) -> MatmulConfig:
    """Tile sizes for ``[m, k] @ [k, n]`` at ``bits``; ``half``: 16-bit activations;
    ``sorted_groups``: no ``g_idx`` to read.

    Up to 64 rows, dot tiles with the weights as the left operand (16, 32 or 64 rows, 128
    columns, 128-deep; 16-row tiles pipelined by :func:`pipeline_depth`), split-K to two programs
    per SM; for one row only where codes pair into
    16-bit floats (2, 3 and 4 bits, 16-bit activations, a K tile in one group), else the GEMV
    kernel with split-K to four programs per SM; more rows, plain 64 x 128 dot tiles. The H200 sweeps
    (evals/results/kernels-*.json) chose the GEMV and the plain tiles; the weights-left tiles
    replace them on fewer instructions per weight (evals/kernel_sass.py), not yet timed on a GPU.
    """
    tile_in_group = group_mode(sorted_groups, group_size, pick_block_k(group_size, 128), k) == GROUPS_PER_TILE
    if m <= GEMV_MAX_ROWS and not (half and bits in (2, 3, 4) and tile_in_group):
        bk = pick_block_k(group_size, 128)
        tiles = max(m, 1) * triton.cdiv(n, 128)
        split = split_for(k, bk, tiles, 2 * device_programs(device))
        return MatmulConfig(1, 128, bk, split, num_warps=4, num_stages=3, gemv=True)
    if m <= 64:
        bm = max(16, triton.next_power_of_2(m))
        bk = pick_block_k(group_size, 128)
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, 128)
        target = (2 if m <= GEMV_MAX_ROWS else 1) * device_programs(device)
        stages = pipeline_depth(bits, 128, bk) if bm == 16 else 3
        return MatmulConfig(bm, 128, bk, split_for(k, bk, tiles, target), 4, stages, weights_left=True)
    return MatmulConfig(64, 128, pick_block_k(group_size, 64), 1, 4, 3)


_SPLIT_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}
MAX_COUNTER_STREAMS = 32  # counter buffers kept, one per (device, stream), least recently used dropped


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` int32 arrival counters, all zero, for one split-K launch on ``device``.

    Launches leave their counters at zero (see :func:`store_split`), so on CUDA one buffer per
    stream serves every launch in stream order; while a CUDA graph is being captured each launch
    gets its own (the graph keeps it), and elsewhere (the interpreter) too.
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(count, dtype=torch.int32, device=device)
    key = (
        device.index if device.index is not None else torch.cuda.current_device(),
        torch.cuda.current_stream(device).cuda_stream,
    )
    buf = _SPLIT_COUNTERS.pop(key, None)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    _SPLIT_COUNTERS[key] = buf  # most recently used last
    if len(_SPLIT_COUNTERS) > MAX_COUNTER_STREAMS:
        # Memory freed here returns to the pool of the stream it was made on: no other stream's
        # launch can be handed it while that stream's kernels may still use it.
        del _SPLIT_COUNTERS[next(iter(_SPLIT_COUNTERS))]
    return buf


def dot_dtype(x_dtype: torch.dtype, device: torch.device) -> tuple[tl.dtype, bool]:
    """Triton dtype for ``tl.dot`` operands and whether fp32 needs exact ("ieee") products.

    The interpreter computes bf16 dots wrongly, so on CPU bf16 is widened to fp32.
    """
    if x_dtype == torch.float16:
        return tl.float16, False
    if x_dtype == torch.bfloat16 and device.type == "cuda":
        return tl.bfloat16, False
    if x_dtype in (torch.bfloat16, torch.float32):
        return tl.float32, True
    raise MoequantError(f"activations of dtype {x_dtype} are not supported: use float16, bfloat16 or float32")


def group_mode(sorted_groups: bool, group_size: int, block_k: int, k: int) -> int:
    """The ``GROUP_MODE`` constant for a launch over ``k`` inputs: one scale row per K tile where no
    tile crosses a group boundary (tiles dividing the group size, or one group over all of K)."""
    if not sorted_groups:
        return GROUPS_FROM_G_IDX
    if (group_size % block_k == 0 or group_size >= k) and k <= TILE_GROUP_MAX_K:
        return GROUPS_PER_TILE
    return GROUPS_BY_DIVISION


def weights_left_applies(requested: bool, mode: int, x_dtype: torch.dtype) -> bool:
    """Whether a launch asked for the weights-left dot can take it: 16-bit activations and a K
    tile in one group (``mode`` ``GROUPS_PER_TILE``)."""
    return requested and mode == GROUPS_PER_TILE and x_dtype in (torch.float16, torch.bfloat16)


def inline_asm(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` take their inline-PTX forms (``ASM``): only compiled
    for CUDA; Triton's CPU interpreter runs the plain forms of the same arithmetic."""
    return device.type == "cuda"


def stages_for(mode: int, num_stages: int) -> int:
    """Pipeline depth: per-row scale and zero lookups stage whole tiles, so they get at most 2."""
    return num_stages if mode == GROUPS_PER_TILE else min(num_stages, 2)


_FITTING_STAGES: dict[tuple, int] = {}


def launch_fitting(kernel, grid: tuple, args: tuple, stages: int, device: torch.device, **consts) -> None:
    """``kernel[grid](*args, STAGES=s, num_stages=s, **consts)`` with ``s = stages``, or with fewer
    stages where the GPU lacks the shared memory for that many (Triton's ``OutOfResources``, raised
    before anything runs); the depth that fits is remembered per kernel, device and constants.
    """
    from triton.runtime.errors import OutOfResources

    name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))

    def key() -> tuple:
        return name, device.type, device.index, stages, tuple(sorted((k, str(v)) for k, v in consts.items()))

    depth = _FITTING_STAGES.get(key(), stages) if _FITTING_STAGES else stages  # no key to build until a miss
    while True:
        try:
            kernel[grid](*args, STAGES=depth, num_stages=depth, **consts)
            break
        except OutOfResources as exc:
            if depth <= 1:
                raise MoequantError(
                    f"the {name} kernel needs more shared memory than {device} has ({exc.required} bytes, limit "
                    f"{exc.limit}) even without pipelining; load the model with backend='torch'"
                ) from exc
            depth -= 1
    if depth != stages:
        _FITTING_STAGES[key()] = depth


def check_packed_linear(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, k: int
) -> tuple[int, int]:
    """Raise a MoequantError unless the packed tensors describe a ``[N, k]`` weight; returns ``(N, G)``."""
    check_bits(bits)
    if qweight.dim() != 2 or qweight.shape[0] * 32 != k * bits:
        raise MoequantError(f"qweight {tuple(qweight.shape)} does not hold K={k} inputs at {bits} bits")
    n = qweight.shape[1]
    g = scales.shape[0]
    if tuple(scales.shape) != (g, n) or tuple(qzeros.shape) != (g, n * bits // 32):
        raise MoequantError(
            f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not match qweight {tuple(qweight.shape)}"
        )
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise MoequantError("qweight and qzeros must be int32 tensors")
    return n, g


def dequant_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    *,
    sorted_groups: bool = False,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """``x @ W^T`` for a packed ``W [N, K]``, dequantising in the kernel.

    Args:
        x: ``[..., K]`` float16, bfloat16 or float32 activations on the kernel's device.
        qweight: int32 ``[K*b/32, N]``; qzeros: int32 ``[G, N*b/32]``; scales: ``[G, N]``.
        g_idx: int32 ``[K]``, or None for ``k // group_size``. A given ``g_idx`` is read by the
            kernel unless ``sorted_groups`` says it equals ``k // group_size`` (the fast path).
        bits: 2, 3, 4 or 8.
        group_size: the group size (-1 for one group over K).
        config: tile sizes; picked from the shape when None.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    k = x.shape[-1]
    n, _ = check_packed_linear(qweight, qzeros, scales, bits, k)
    group_size = effective_group_size(group_size, k)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    sorted_groups = sorted_groups or g_idx is None
    if g_idx is not None and g_idx.shape != (k,):
        raise MoequantError(f"g_idx has shape {tuple(g_idx.shape)}, expected [{k}]")
    if sorted_groups and scales.shape[0] != triton.cdiv(k, group_size):
        raise MoequantError(
            f"{scales.shape[0]} groups of scales do not match K={k} with group_size={group_size}: "
            "pass the layer's group size"
        )
    dtype, ieee = dot_dtype(x.dtype, x.device)
    if m == 0:
        return x.new_zeros(*x.shape[:-1], n)
    if config is None and m >= DEQUANT_MIN_ROWS:
        wt = dequantize_triton(
            qweight, qzeros, scales, g_idx, bits, group_size, x.dtype, sorted_groups=sorted_groups
        )
        return (x2 @ wt).reshape(*x.shape[:-1], n)
    half = x.dtype in (torch.float16, torch.bfloat16)
    cfg = config or pick_config(
        m, n, k, group_size, x.device, bits=bits, half=half, sorted_groups=sorted_groups
    )
    mode = group_mode(sorted_groups, group_size, cfg.block_k, k)
    k_per_split, split = k_split(k, cfg.split_k, cfg.block_k)
    out = x.new_empty(m, n)
    g_arg = g_idx if g_idx is not None else qweight  # unread unless GROUP_MODE reads g_idx
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    # Split-K parts meet in a float32 workspace; the unused pointers are never read without it.
    ws = torch.empty(split, m, n, device=x.device, dtype=torch.float32) if split > 1 else out
    counts = split_counters(x.device, grid[0]) if split > 1 else qweight
    left = weights_left_applies(cfg.weights_left, mode, x.dtype)
    launch_fitting(_dequant_matmul_kernel, grid, (
        x2, qweight, qzeros, scales, g_arg, out, ws, counts,
        m, n, k, qweight.shape[0], qzeros.shape[1],
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        qzeros.stride(0), qzeros.stride(1), scales.stride(0), scales.stride(1),
        out.stride(0), out.stride(1), group_size, k_per_split, split),
        stages_for(mode, cfg.num_stages), x.device,
        BITS=bits, GROUP_MODE=mode, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=split > 1, DOT_DTYPE=dtype, IEEE_FP32=ieee,
        WEIGHTS_LEFT=left, ASM=inline_asm(x.device),
        GEMV=cfg.gemv, EVEN=k % cfg.block_k == 0 and n % cfg.block_n == 0, ONE_ROW=left and m == 1,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def dequantize_triton(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    *,
    sorted_groups: bool = False,
) -> torch.Tensor:
    """``W^T [K, N]`` in ``dtype`` from a packed ``W [N, K]`` (arguments as for
    :func:`dequant_matmul_triton`), in one pass over the packed tensors."""
    k = qweight.shape[0] * 32 // bits
    n, _ = check_packed_linear(qweight, qzeros, scales, bits, k)
    group_size = effective_group_size(group_size, k)
    sorted_groups = sorted_groups or g_idx is None
    block_n, block_k = 64, pick_block_k(group_size, 64)
    mode = group_mode(sorted_groups, group_size, block_k, k)
    out = torch.empty(k, n, device=qweight.device, dtype=dtype)
    g_arg = g_idx if g_idx is not None else qweight
    _dequant_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        qweight, qzeros, scales, g_arg, out, n, k, qweight.shape[0], qzeros.shape[1],
        qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
        scales.stride(0), scales.stride(1), out.stride(0), out.stride(1), group_size,
        BITS=bits, GROUP_MODE=mode, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out
