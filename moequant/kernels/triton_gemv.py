"""The GEMV: one activation row against a packed weight tile in float32 registers, without
``tl.dot`` (:func:`gemv_row`).

Codes become floats by placing their bits under a float's exponent bits (inline PTX ``prmt`` and
``lop3`` with ``ASM``, shifts and masks otherwise), so that each weight costs its conversion and
one fused multiply-add.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moequant.kernels.triton_unpack import dequant_tile, load_zeros, tile_group


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
                z = load_zeros(qz_ptr + g * stride_zg, offs_n, offs_n < N, n_words, stride_zn, BITS)
                s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn).to(tl.float32)
            else:
                z = load_zeros(qz_ptr + g * stride_zg, offs_n, mask_n, n_words, stride_zn, BITS)
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
