"""The fused MoE kernels (CPU interpreter) against the plain-torch reference."""

from __future__ import annotations

import pytest
import torch

from moequant.kernels.reference import fused_moe_ref

BITS = (2, 3, 4, 8)
E, HIDDEN, INTER = 4, 64, 128


def _experts(make_experts, bits, shuffled=False):
    """``(w13, w2)`` for E experts, H=64, I=128; w13 in groups of 32, w2 in groups of 64."""
    w13 = make_experts(E, 2 * INTER, HIDDEN, bits, 32, seed=bits, shuffled_groups=shuffled)
    w2 = make_experts(E, HIDDEN, INTER, bits, 64, seed=100 + bits, shuffled_groups=shuffled)
    return w13, w2


def _routing(case: str):
    """``(x, topk_ids, topk_weights)`` of a named routing case."""
    gen = torch.Generator().manual_seed(len(case))
    if case == "uneven_top2":  # expert 0 busy, expert 3 idle, 5 tokens
        ids = torch.tensor([[0, 2], [0, 1], [2, 0], [0, 1], [1, 0]])
    elif case == "single_top1":
        ids = torch.tensor([[3]])
    else:  # 17 tokens, top-2 from skewed logits (the last expert almost never chosen)
        logits = torch.randn(17, E, generator=gen) + torch.tensor([1.5, 0.5, 0.0, -3.0])
        ids = logits.topk(2, dim=-1).indices
    weights = torch.softmax(torch.randn(ids.shape, generator=gen), dim=-1)
    x = torch.randn(ids.shape[0], HIDDEN, generator=gen)
    return x, ids, weights


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", ["uneven_top2", "single_top1", "odd17_top2"])
def test_matches_reference(triton_kernels, make_experts, bits, case):
    _, tmoe = triton_kernels
    w13, w2 = _experts(make_experts, bits)
    x, ids, weights = _routing(case)
    got = tmoe.fused_moe_triton(x, ids, weights, w13, w2)
    want = fused_moe_ref(x, ids, weights, w13, w2)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", BITS)
def test_split_k_and_per_expert_g_idx(triton_kernels, make_experts, bits):
    _, tmoe = triton_kernels
    w13, w2 = _experts(make_experts, bits, shuffled=True)
    assert w13.g_idx.dim() == 2 and not w13.has_sorted_groups()
    x, ids, weights = _routing("uneven_top2")
    cfg = tmoe.MoeConfig(block_m=16, block_n=32, block_k_gate_up=32, block_k_down=32, split_k=3)
    got = tmoe.fused_moe_triton(x, ids, weights, w13, w2, config=cfg)
    torch.testing.assert_close(got, fused_moe_ref(x, ids, weights, w13, w2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_activations(triton_kernels, make_experts, bits, dtype, tol):
    _, tmoe = triton_kernels
    w13, w2 = _experts(make_experts, bits)
    x, ids, weights = _routing("odd17_top2")
    got = tmoe.fused_moe_triton(x.to(dtype), ids, weights, w13, w2)
    assert got.dtype == dtype
    want = fused_moe_ref(x.to(dtype).float(), ids, weights, w13, w2)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("dtype", "tol", "case"),
    [(torch.float16, 3e-3, "uneven_top2"), (torch.bfloat16, 2e-2, "uneven_top2"),
     (torch.float16, 3e-3, "odd17_top2"),
     pytest.param(torch.bfloat16, 2e-2, "odd17_top2", marks=pytest.mark.slow)],
)
def test_weights_left_dot_kernels(triton_kernels, make_experts, bits, dtype, tol, case):
    """Sorted blocks with the weight tile on the dot's left (16-bit activations), split-K on the
    down projection; the idle expert's weights are never read."""
    _, tmoe = triton_kernels
    w13, w2 = _experts(make_experts, bits)
    w13.scales[3] = float("nan")
    w2.scales[3] = float("nan")
    x, ids, weights = _routing(case)
    ids = torch.where(ids == 3, 2, ids)
    cfg = tmoe.MoeConfig(16, 32, 32, 64, split_k=2, weights_left=True)
    got = tmoe.fused_moe_triton(x.to(dtype), ids, weights, w13, w2, config=cfg)
    assert got.dtype == dtype and torch.isfinite(got).all()
    want = fused_moe_ref(x.to(dtype).float(), ids, weights, w13, w2)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_experts_without_tokens_are_not_read(triton_kernels, make_experts):
    _, tmoe = triton_kernels
    w13, w2 = _experts(make_experts, 4)
    w13.scales[3] = float("nan")
    w2.scales[3] = float("nan")
    x, ids, weights = _routing("uneven_top2")
    got = tmoe.fused_moe_triton(x, ids, weights, w13, w2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, fused_moe_ref(x, ids, weights, w13, w2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_m", [4, 16])
def test_moe_align_groups_slots_by_expert(triton_kernels, block_m):
    _, tmoe = triton_kernels
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 1], [0, 2]])
    sorted_ids, expert_ids, num_post_pad = tmoe.moe_align(ids, num_experts=5, block_m=block_m)
    slots = ids.numel()
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=5)
    used = int(((counts + block_m - 1) // block_m * block_m).sum())
    assert int(num_post_pad) == used
    assert sorted_ids.numel() % block_m == 0 and sorted_ids.numel() == expert_ids.numel() * block_m
    assert (sorted_ids[used:] == slots).all() and (expert_ids[used // block_m :] == -1).all()
    real = sorted_ids[sorted_ids < slots]
    assert sorted(real.tolist()) == list(range(slots))
    for b in range(used // block_m):
        block = sorted_ids[b * block_m : (b + 1) * block_m]
        block = block[block < slots].long()
        assert block.numel() > 0, "no block is all padding"
        assert (flat[block] == expert_ids[b]).all()
        assert torch.equal(block, block.sort().values), "slots keep their order within an expert"
    assert 4 not in expert_ids.tolist(), "an expert without tokens gets no block"
    assert expert_ids[: used // block_m].tolist() == sorted(expert_ids[: used // block_m].tolist())


@pytest.mark.slow
@pytest.mark.parametrize("bits", BITS)
def test_many_tokens_per_expert(triton_kernels, make_experts, bits):
    _, tmoe = triton_kernels
    w13, w2 = _experts(make_experts, bits)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(67, HIDDEN, generator=gen)
    ids = torch.randn(67, E, generator=gen).topk(2, dim=-1).indices
    weights = torch.rand(67, 2, generator=gen)
    got = tmoe.fused_moe_triton(x, ids, weights, w13, w2)
    torch.testing.assert_close(got, fused_moe_ref(x, ids, weights, w13, w2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("bits", "case", "shuffled", "split", "split_gate_up"),
    [(2, "uneven_top2", False, 1, 1)]
    + [pytest.param(b, "uneven_top2", False, 1, 1, marks=pytest.mark.slow) for b in (3, 4, 8)]
    + [(b, "single_top1", False, 3, 1) for b in BITS]
    + [(b, "uneven_top2", False, 2, 3) for b in BITS]
    + [(3, "uneven_top2", True, 2, 2), (4, "single_top1", False, 1, 2)],
)
def test_decode_kernels_match_reference(
    triton_kernels, make_experts, bits, case, shuffled, split, split_gate_up
):
    _, tmoe = triton_kernels
    w13, w2 = _experts(make_experts, bits, shuffled=shuffled)
    x, ids, weights = _routing(case)
    cfg = tmoe.MoeConfig(1, 32, 32, 64, split_k=split, gemv=True, split_k_gate_up=split_gate_up)
    got = tmoe.fused_moe_triton(x, ids, weights, w13, w2, config=cfg)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, fused_moe_ref(x, ids, weights, w13, w2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("dtype", "tol", "case", "split", "split_gate_up"),
    [(torch.float16, 3e-3, "uneven_top2", 2, 3),
     pytest.param(torch.bfloat16, 2e-2, "uneven_top2", 2, 3, marks=pytest.mark.slow),
     (torch.float16, 3e-3, "single_top1", 1, 1), (torch.bfloat16, 2e-2, "single_top1", 1, 1)],
)
def test_decode_kernels_with_the_weights_left(
    triton_kernels, make_experts, bits, dtype, tol, case, split, split_gate_up
):
    """The decode kernels' weights-left form: each slot's row in a 16-row dot block."""
    _, tmoe = triton_kernels
    w13, w2 = _experts(make_experts, bits)
    x, ids, weights = _routing(case)
    cfg = tmoe.MoeConfig(
        1, 32, 32, 64, split_k=split, gemv=True, split_k_gate_up=split_gate_up, weights_left=True
    )
    got = tmoe.fused_moe_triton(x.to(dtype), ids, weights, w13, w2, config=cfg)
    assert got.dtype == dtype
    want = fused_moe_ref(x.to(dtype).float(), ids, weights, w13, w2)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("decode", [False, True])
def test_weights_left_with_partial_tiles(triton_kernels, make_experts, bits, decode):
    """Both weights-left MoE forms where no projection fills whole column tiles (H = 96, I = 160,
    64 columns a tile), so that their loads keep the masks that whole tiles drop."""
    _, tmoe = triton_kernels
    hidden, inter = 96, 160
    w13 = make_experts(3, 2 * inter, hidden, bits, 32, seed=bits)
    w2 = make_experts(3, hidden, inter, bits, 32, seed=50 + bits)
    gen = torch.Generator().manual_seed(bits)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1]])
    weights = torch.softmax(torch.randn(ids.shape, generator=gen), dim=-1)
    x = torch.randn(3, hidden, generator=gen).to(torch.float16)
    if decode:
        cfg = tmoe.MoeConfig(1, 64, 32, 32, split_k=2, gemv=True, split_k_gate_up=2, weights_left=True)
    else:
        cfg = tmoe.MoeConfig(16, 64, 32, 32, split_k=2, weights_left=True)
    got = tmoe.fused_moe_triton(x, ids, weights, w13, w2, config=cfg)
    want = fused_moe_ref(x.float(), ids, weights, w13, w2)
    torch.testing.assert_close(got.float(), want, rtol=3e-3, atol=3e-3)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_decode_kernels_half_precision(triton_kernels, make_experts, dtype, tol):
    _, tmoe = triton_kernels
    w13, w2 = _experts(make_experts, 4)
    x, ids, weights = _routing("single_top1")
    assert tmoe.pick_moe_config(1, E, HIDDEN, INTER, 32, 64, torch.device("cpu")).gemv
    got = tmoe.fused_moe_triton(x.to(dtype), ids, weights, w13, w2)
    assert got.dtype == dtype
    want = fused_moe_ref(x.to(dtype).float(), ids, weights, w13, w2)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_decode_kernels_finish_in_one_launch_and_reset_their_counters(
    triton_kernels, make_experts, monkeypatch
):
    """Gate/up split-K parts, and a token's k slots times the down splits, meet at per-tile
    counters: the same bits on every call, the reference result, and the counters zero after."""
    _, tmoe = triton_kernels
    shared = torch.zeros(256, dtype=torch.int32)
    monkeypatch.setattr(tmoe, "split_counters", lambda device, count: shared[:count])
    w13, w2 = _experts(make_experts, 4)
    x, ids, weights = _routing("uneven_top2")
    cfg = tmoe.MoeConfig(1, 32, 32, 64, split_k=2, gemv=True, split_k_gate_up=2)
    first = tmoe.fused_moe_triton(x, ids, weights, w13, w2, config=cfg)
    assert not shared.any()
    second = tmoe.fused_moe_triton(x, ids, weights, w13, w2, config=cfg)
    assert not shared.any() and torch.equal(first, second)
    torch.testing.assert_close(first, fused_moe_ref(x, ids, weights, w13, w2), rtol=1e-4, atol=1e-4)


def test_decode_kernels_only_for_few_tokens_per_expert(triton_kernels):
    _, tmoe = triton_kernels
    cpu = torch.device("cpu")
    assert tmoe.pick_moe_config(2, 8, 4096, 14336, 128, 128, cpu).gemv  # one token, top-2 of 8
    decode = {b: tmoe.pick_moe_config(2, 8, 4096, 14336, 128, 128, cpu, bits=b) for b in BITS}
    assert [decode[b].weights_left for b in BITS] == [True, True, True, False]
    assert [decode[b].num_stages for b in BITS] == [5, 4, 3, 3]
    assert not tmoe.pick_moe_config(64, 8, 4096, 14336, 128, 128, cpu).gemv
    blocks = [tmoe.pick_moe_config(s, 8, 4096, 14336, 128, 128, cpu) for s in (64, 512, 1024)]
    assert [(c.block_m, c.weights_left) for c in blocks] == [(16, True), (32, True), (64, True)]
    with pytest.raises(ValueError, match="block_m must be 1"):
        tmoe.MoeConfig(block_m=16, block_n=64, block_k_gate_up=64, block_k_down=64, gemv=True)
    with pytest.raises(ValueError, match="split_k_gate_up is for the decode kernels"):
        tmoe.MoeConfig(16, 64, 64, 64, split_k_gate_up=2)


@pytest.mark.parametrize("decode", [True, False])
def test_moe_launches_drop_stages_the_gpu_cannot_hold(triton_kernels, make_experts, monkeypatch, decode):
    from moequant.kernels import triton_launch
    from tests.kernels.test_triton_matmul import _SharedMemoryLimit

    tm, tmoe = triton_kernels
    w13, w2 = _experts(make_experts, 2)
    x, ids, weights = _routing("single_top1" if decode else "uneven_top2")
    x = x.to(torch.float16)
    if decode:
        cfg = tmoe.MoeConfig(1, 64, 32, 64, 1, num_stages=4, gemv=True, weights_left=True)
        names = ("_moe_gemv_gate_up_kernel", "_moe_gemv_down_kernel")
    else:
        cfg = tmoe.MoeConfig(16, 64, 32, 64, 1, num_stages=4, weights_left=True)
        names = ("_moe_gate_up_kernel", "_moe_down_kernel")
    want = tmoe.fused_moe_triton(x, ids, weights, w13, w2, config=cfg)
    monkeypatch.setattr(triton_launch, "_FITTING_STAGES", {})
    limited = {}
    for name in names:
        limited[name] = _SharedMemoryLimit(getattr(tmoe, name), fits=1)
        monkeypatch.setattr(tmoe, name, limited[name])
    got = tmoe.fused_moe_triton(x, ids, weights, w13, w2, config=cfg)
    assert torch.equal(got, want)
    assert all(k.tried == [4, 3, 2, 1] for k in limited.values())


@pytest.mark.parametrize(("experts", "top_k", "inter"), [(128, 8, 96), (256, 8, 32)])
def test_many_small_experts(triton_kernels, make_experts, experts, top_k, inter):
    """Qwen3-MoE / DeepSeek-like routing: 128-256 experts, top-8, an intermediate size that is a
    multiple of 32 but not of 128; most experts get no token."""
    _, tmoe = triton_kernels
    w13 = make_experts(experts, 2 * inter, HIDDEN, 4, 32, seed=7)
    w2 = make_experts(experts, HIDDEN, inter, 3, 32, seed=8)
    gen = torch.Generator().manual_seed(experts)
    ids = torch.randn(5, experts, generator=gen).topk(top_k, dim=-1).indices
    weights = torch.softmax(torch.randn(ids.shape, generator=gen), dim=-1)
    x = torch.randn(5, HIDDEN, generator=gen)
    got = tmoe.fused_moe_triton(x, ids, weights, w13, w2)
    torch.testing.assert_close(got, fused_moe_ref(x, ids, weights, w13, w2), rtol=1e-4, atol=1e-4)
