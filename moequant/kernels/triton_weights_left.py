"""The weights-left dot: a packed weight tile as the left operand of ``tl.dot``, unpacked in the
registers that loaded it (:func:`dot_weights_left`).

2, 3 and 4-bit codes become 16-bit floats ``c + q`` two at a time (one shift and one ``lop3`` per
pair, inline PTX with ``ASM``), which puts the dot's K dimension in pair order; the activations
are put in the same order by :func:`pair_order`. 8-bit codes are converted one by one.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moequant.kernels.triton_unpack import load_zeros, tile_group


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
    z = load_zeros(qz_ptr + g * stride_zg, offs_n, mask_n, n_words, stride_zn, BITS).to(tl.float32)
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
