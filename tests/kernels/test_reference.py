"""The plain-torch kernels, and the reading of the packed layout against it spelled out word by word."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moequant.errors import MoequantError
from moequant.kernels.reference import dequant_matmul_ref, fused_moe_ref
from moequant.packed.bitstream import (
    dequantize_packed,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
    unpack_rows,
)
from moequant.packed.experts import PackedExperts, concat_out_features
from moequant.packed.widths import is_monotone_g_idx

BITS = (2, 3, 4, 8)


def _three_bit_words(x: list[int]) -> list[int]:
    """32 three-bit values -> 3 words, following the layout's word-by-word description."""
    w0 = sum(x[j] << (3 * j) for j in range(10)) | ((x[10] & 0b11) << 30)
    w1 = (x[10] >> 2) | sum(x[11 + j] << (3 * j + 1) for j in range(10)) | ((x[21] & 1) << 31)
    w2 = (x[21] >> 1) | sum(x[22 + j] << (3 * j + 2) for j in range(10))
    return [w - (1 << 32) if w >= 1 << 31 else w for w in (w0, w1, w2)]


def test_three_bit_unpack_matches_the_word_layout():
    gen = torch.Generator().manual_seed(0)
    cols = [torch.randint(0, 8, (32,), generator=gen).tolist() for _ in range(4)]
    cols.append([7] * 32)  # every bit set: straddling values and sign bits
    words = torch.tensor([_three_bit_words(c) for c in cols], dtype=torch.int32).t()  # [3, 5]
    got = unpack_rows(words, 3)
    assert torch.equal(got, torch.tensor(cols, dtype=torch.int32).t())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_power_of_two_unpack_is_least_significant_first(bits):
    per = 32 // bits
    vals = [(3 * i + 1) % (2**bits) for i in range(per)]
    word = sum(v << (bits * i) for i, v in enumerate(vals))
    word = word - (1 << 32) if word >= 1 << 31 else word
    got = unpack_rows(torch.tensor([[word]], dtype=torch.int32), bits)
    assert got.squeeze(1).tolist() == vals


@pytest.mark.parametrize("bits", BITS)
def test_unpack_inverts_pack(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (64, 96), generator=gen, dtype=torch.int32)  # [N, K]
    zeros = torch.randint(1, 2**bits, (3, 64), generator=gen, dtype=torch.int32)
    assert torch.equal(unpack_qweight(pack_qweight(codes, bits), bits), codes.t())
    assert torch.equal(unpack_qzeros(pack_qzeros(zeros, bits), bits), zeros)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shuffled", [False, True])
def test_dequant_matmul_ref_matches_pack_dequantize(bits, shuffled, make_linear):
    lin = make_linear(64, 128, bits, 32, seed=bits, shuffled_groups=shuffled)
    assert is_monotone_g_idx(lin["g_idx"], 32) is not shuffled
    x = torch.randn(17, 128, generator=torch.Generator().manual_seed(1))
    w = dequantize_packed(**lin, bits=bits)  # [N, K]
    want = x.double() @ w.double().t()
    got = dequant_matmul_ref(x, **lin, bits=bits)
    assert got.shape == (17, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_dequant_matmul_ref_keeps_dtype_and_leading_dims(make_linear):
    lin = make_linear(32, 64, 4, 64, seed=0)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    got = dequant_matmul_ref(x, **lin, bits=4)
    assert got.shape == (2, 3, 32) and got.dtype == torch.bfloat16
    want = x.float() @ dequantize_packed(**lin, bits=4).t()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_dequant_matmul_ref_rejects_wrong_features(make_linear):
    lin = make_linear(32, 64, 4, 32, seed=0)
    with pytest.raises(MoequantError, match="features"):
        dequant_matmul_ref(torch.randn(2, 32), **lin, bits=4)


def _dense_moe(x, ids, weights, w13: PackedExperts, w2: PackedExperts) -> torch.Tensor:
    """Token by token, slot by slot, from pack.dequantize_packed."""
    inter = w2.in_features
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            w13_e = dequantize_packed(**w13.expert(e), bits=w13.bits).double()
            w2_e = dequantize_packed(**w2.expert(e), bits=w2.bits).double()
            xt = x[t].double()
            h = F.silu(w13_e[:inter] @ xt) * (w13_e[inter:] @ xt)
            out[t] += float(weights[t, j]) * (w2_e @ h)
    return out


@pytest.mark.parametrize("bits", BITS)
def test_fused_moe_ref_matches_a_dense_loop(bits, make_experts):
    e, hidden, inter = 4, 64, 96
    w13 = make_experts(e, 2 * inter, hidden, bits, 32, seed=bits)
    w2 = make_experts(e, hidden, inter, bits, 32, seed=10 + bits, shuffled_groups=True)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(5, hidden, generator=gen)
    ids = torch.tensor([[0, 2], [2, 0], [1, 2], [2, 1], [0, 1]])  # expert 3 gets no token
    weights = torch.rand(5, 2, generator=gen)
    got = fused_moe_ref(x, ids, weights, w13, w2, bits=bits)
    torch.testing.assert_close(got.double(), _dense_moe(x, ids, weights, w13, w2), rtol=1e-5, atol=1e-5)


def test_fused_moe_ref_checks_shapes(make_experts):
    w13 = make_experts(2, 128, 64, 4, 32, seed=0)
    w2 = make_experts(2, 64, 64, 4, 32, seed=1)
    x = torch.randn(3, 64)
    ids = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(MoequantError, match="bits"):
        fused_moe_ref(x, ids, torch.ones(3, 1), w13, w2, bits=3)
    with pytest.raises(MoequantError, match="topk"):
        fused_moe_ref(x, ids, torch.ones(3, 2), w13, w2)
    bad_w13 = make_experts(2, 96, 64, 4, 32, seed=0)
    with pytest.raises(MoequantError, match="gate and up"):
        fused_moe_ref(x, ids, torch.ones(3, 1), bad_w13, w2)


def test_packed_experts_stack_and_views(make_linear):
    parts = [make_linear(64, 128, 3, 64, seed=s) for s in range(3)]
    pe = PackedExperts.stack(parts, bits=3, group_size=64)
    assert (pe.num_experts, pe.in_features, pe.out_features) == (3, 128, 64)
    assert pe.g_idx.shape == (128,) and pe.has_sorted_groups()
    for i, p in enumerate(parts):
        for key, t in pe.expert(i).items():
            assert torch.equal(t, p[key])
    parts[1]["g_idx"] = parts[1]["g_idx"].flip(0)
    pe2 = PackedExperts.stack(parts, bits=3, group_size=64)
    assert pe2.g_idx.shape == (3, 128) and not pe2.has_sorted_groups()


def test_packed_experts_rejects_bad_shapes(make_linear):
    a, b = make_linear(64, 128, 4, 32, seed=0), make_linear(32, 128, 4, 32, seed=1)
    with pytest.raises(MoequantError, match="share a shape"):
        PackedExperts.stack([a, b], bits=4, group_size=32)
    with pytest.raises(MoequantError, match="scales hold 4 groups, not the 2 of group size 64"):
        PackedExperts.stack([a], bits=4, group_size=64)
    with pytest.raises(MoequantError, match="bits"):
        PackedExperts.stack([a], bits=5, group_size=32)


def test_concat_out_features_stacks_gate_then_up(make_linear):
    w1, w3 = make_linear(64, 96, 3, 32, seed=0), make_linear(64, 96, 3, 32, seed=1)
    w13 = concat_out_features([w1, w3])
    want = torch.cat([dequantize_packed(**w1, bits=3), dequantize_packed(**w3, bits=3)])
    assert torch.equal(dequantize_packed(**w13, bits=3), want)
