"""Dot-tile K loops over a block of activation rows against a packed weight: the plain dot on the
dequantised tile (:func:`dot_dequant`), the weights-left dot (:mod:`moequant.kernels.triton_weights_left`),
and for one row the choice between the weights-left dot and the GEMV (:func:`decode_row`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moequant.kernels.triton_gemv import gemv_row
from moequant.kernels.triton_unpack import dequant_tile, load_codes, load_zeros, tile_group
from moequant.kernels.triton_weights_left import dot_weights_left, pair_order


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
        q = load_codes(qw_ptr, k0, offs_n, mask_n, k_words, stride_qk, stride_qn, BITS, BLOCK_K, BLOCK_N)
        g = tile_group(k0, group_size)
        z = load_zeros(qz_ptr + g * stride_zg, offs_n, mask_n, n_words, stride_zn, BITS).to(tl.float32)
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
