"""The compiled Triton kernels on a CUDA GPU against the plain-torch reference (skipped without one).

Run alone (``pytest tests/gpu``): the CPU kernel tests set ``TRITON_INTERPRET=1`` for the whole
session, and interpreted kernels cannot take CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch

from moequant.kernels import dispatch
from moequant.kernels.reference import dequant_matmul_ref, fused_moe_ref
from moequant.packed.bitstream import pack_qweight, pack_qzeros
from moequant.packed.experts import PackedExperts

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(dispatch.interpreting(), reason="TRITON_INTERPRET is set: run tests/gpu on its own"),
]
BITS = (2, 3, 4, 8)
TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # tf32 dots; half outputs


def packed(
    n: int, k: int, bits: int, group: int, seed: int, shuffled: bool = False
) -> dict[str, torch.Tensor]:
    """A random packed ``[n, k]`` linear on the GPU (asymmetric zeros, unit-scale outputs)."""
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (n, k), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, maxq + 1, (k // group, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=gen) + 0.5) * (2.0 / (maxq * k**0.5))
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if shuffled:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    out = {
        "qweight": pack_qweight(codes, bits),
        "qzeros": pack_qzeros(zeros, bits),
        "scales": scales.half(),
        "g_idx": g_idx,
    }
    return {key: t.cuda() for key, t in out.items()}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def kernels():
    from moequant.kernels import triton_matmul, triton_moe

    return triton_matmul, triton_moe


@pytest.mark.parametrize(
    ("bits", "dtype"),
    [(b, torch.bfloat16) for b in BITS] + [(3, torch.float16), (3, torch.float32), (4, torch.float16)],
)
@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 1024, 512), (1, 1056, 224), (5, 1024, 512), (70, 1056, 224), (130, 1056, 224)]
)
def test_matmul_default_config(kernels, bits, dtype, m, k, n):
    tm, _ = kernels
    lin = packed(n, k, bits, 32, seed=bits * 10 + m)
    x = torch.randn(m, k, device="cuda").to(dtype)
    got = tm.dequant_matmul_triton(x, **lin, bits=bits, group_size=32, sorted_groups=True)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert rel(got, dequant_matmul_ref(x.float(), **lin, bits=bits)) < TOL[dtype]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "variant",
    [
        "gemv_split",
        "gemv_rows_span_groups",
        "gemv_g_idx",
        "dot_split",
        "dot_rows_span_groups",
        "dot_g_idx",
        "wleft_split",
        "wleft",
    ],
)
def test_matmul_variants(kernels, bits, variant):
    tm, _ = kernels
    k, n, group = 1024, 256, 32
    lin = packed(n, k, bits, group, seed=bits, shuffled=variant.endswith("g_idx"))
    gemv = variant.startswith("gemv")
    block_k = 32 if variant.endswith("split") or variant == "wleft" else 128
    cfg = tm.MatmulConfig(
        1 if gemv else 16,
        64,
        block_k,
        split_k=3 if variant.endswith("split") else 1,
        gemv=gemv,
        weights_left=variant.startswith("wleft"),
    )
    x = torch.randn(1 if gemv else 7, k, device="cuda", dtype=torch.bfloat16)
    got = tm.dequant_matmul_triton(
        x, **lin, bits=bits, group_size=group, sorted_groups=not variant.endswith("g_idx"), config=cfg
    )
    assert rel(got, dequant_matmul_ref(x.float(), **lin, bits=bits)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 7])
def test_zero_point_of_two_to_the_bits(kernels, bits, m):
    # v1 checkpoints store z - 1: all-ones stored zeros mean z = 2^bits (once misread at 8 bits).
    tm, _ = kernels
    lin = packed(256, 1024, bits, 128, seed=bits)
    lin["qzeros"].fill_(-1)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    got = tm.dequant_matmul_triton(x, **lin, bits=bits, group_size=128, sorted_groups=True)
    assert rel(got, dequant_matmul_ref(x.float(), **lin, bits=bits)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("gemv", [True, False])
def test_split_k_in_one_launch_is_exact_every_time(kernels, gemv):
    """Many programs meet at each tile's counter: every call must give the same bits (the parts are
    added in split order by whichever program arrives last) and leave the counters at zero."""
    from moequant.kernels import triton_split

    tm, _ = kernels
    k, n = 4096, 2048
    lin = packed(n, k, 4, 128, seed=3)
    x = torch.randn(1 if gemv else 9, k, device="cuda", dtype=torch.bfloat16)
    cfg = tm.MatmulConfig(1 if gemv else 16, 32, 128, split_k=32, gemv=gemv)
    first = tm.dequant_matmul_triton(x, **lin, bits=4, group_size=128, sorted_groups=True, config=cfg)
    for _ in range(50):
        again = tm.dequant_matmul_triton(x, **lin, bits=4, group_size=128, sorted_groups=True, config=cfg)
        assert torch.equal(again, first)
    torch.cuda.synchronize()
    assert not any(buf.any() for buf in triton_split._SPLIT_COUNTERS.values())
    assert rel(first, dequant_matmul_ref(x.float(), **lin, bits=4)) < TOL[torch.bfloat16]


def test_split_k_counters_per_stream(kernels):
    """Each stream keeps its own counters (concurrent launches never share one), at most
    ``MAX_COUNTER_STREAMS`` buffers kept."""
    from moequant.kernels import triton_split

    tm, _ = kernels
    lin = packed(512, 2048, 4, 128, seed=7)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    want = tm.dequant_matmul_triton(x, **lin, bits=4, group_size=128, sorted_groups=True)
    streams = [torch.cuda.Stream() for _ in range(triton_split.MAX_COUNTER_STREAMS + 8)]
    outs = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outs.append(tm.dequant_matmul_triton(x, **lin, bits=4, group_size=128, sorted_groups=True))
    torch.cuda.synchronize()
    assert all(torch.equal(out, want) for out in outs)
    assert len(triton_split._SPLIT_COUNTERS) <= triton_split.MAX_COUNTER_STREAMS


def test_split_k_under_cuda_graph_replay(kernels):
    tm, _ = kernels
    lin = packed(1024, 2048, 3, 128, seed=5)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    want = tm.dequant_matmul_triton(x, **lin, bits=3, group_size=128, sorted_groups=True)  # compiles
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = tm.dequant_matmul_triton(x, **lin, bits=3, group_size=128, sorted_groups=True)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_fused_moe(kernels, bits, tokens):
    _, tmoe = kernels
    e, hidden, inter = 8, 512, 768
    w13 = PackedExperts.stack([packed(2 * inter, hidden, bits, 128, seed=i) for i in range(e)], bits, 128)
    w2 = PackedExperts.stack([packed(hidden, inter, bits, 128, seed=50 + i) for i in range(e)], bits, 128)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    logits = torch.randn(tokens, e, device="cuda", generator=gen) + torch.linspace(2, -2, e, device="cuda")
    weights, ids = torch.softmax(logits, -1).topk(2, dim=-1)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    got = tmoe.fused_moe_triton(x, ids, weights, w13, w2)
    assert got.dtype == torch.bfloat16
    assert rel(got, fused_moe_ref(x.float(), ids, weights, w13, w2)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("weights_left", [False, True])
def test_moe_decode_in_two_launches_is_exact_every_time(kernels, tokens, weights_left):
    _, tmoe = kernels
    e, hidden, inter = 8, 1024, 2048
    w13 = PackedExperts.stack([packed(2 * inter, hidden, 4, 128, seed=i) for i in range(e)], 4, 128)
    w2 = PackedExperts.stack([packed(hidden, inter, 4, 128, seed=50 + i) for i in range(e)], 4, 128)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    weights, ids = torch.softmax(torch.randn(tokens, e, device="cuda", generator=gen), -1).topk(2, dim=-1)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    cfg = tmoe.MoeConfig(1, 64, 128, 128, split_k=8, gemv=True, split_k_gate_up=8, weights_left=weights_left)
    first = tmoe.fused_moe_triton(x, ids, weights, w13, w2, config=cfg)
    for _ in range(30):
        assert torch.equal(tmoe.fused_moe_triton(x, ids, weights, w13, w2, config=cfg), first)
    assert rel(first, fused_moe_ref(x.float(), ids, weights, w13, w2)) < TOL[torch.bfloat16]


def test_loaded_model_matches_torch_backend(tmp_path):
    from moequant.compression import compress
    from moequant.loading import load
    from moequant.recipe import parse_recipe
    from tests.conftest import make_mixtral

    recipe = parse_recipe(
        "name: gpu\nmethod: rtn\nrules:\n"
        "  - match: '.*\\.self_attn\\.(q|k|v|o)_proj'\n    bits: 4\n    group_size: 32\n"
        "  - match: '.*\\.experts\\.\\d+\\.w[123]'\n    bits: 3\n    group_size: 32\n"
    )
    src = make_mixtral(tmp_path / "src", seed=1)
    out = compress(src, tmp_path / "out", recipe=recipe, method="rtn").path
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        fast = load(out, device="cuda", dtype=torch.float32, backend="triton")(input_ids=ids).logits
        plain = load(out, device="cuda", dtype=torch.float32, backend="torch")(input_ids=ids).logits
    assert rel(fast, plain.float()) < 5e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["six-experts-top3-mqa-window-tied-fused-sharded",
                                  "twelve-experts-top4-mha-mixed-widths-asymmetric"])
def test_unusual_shapes_match_an_independent_reading(tmp_path, name, dtype):
    """Compiled kernels on shapes unlike Mixtral's (6 experts top-3 with MQA and 2-bit experts;
    12 experts top-4 with 8/4/3/2-bit asymmetric widths) against tests/gptq_reader.py's reading."""
    from tests.test_model_variety import CASES, compress_case, independent_logits

    out = compress_case(tmp_path, CASES[name], "rtn")
    ids = torch.randint(0, 2048, (3, 17), generator=torch.Generator().manual_seed(2)).cuda()
    got, want = independent_logits(out, tmp_path, ids, "triton", dtype)
    assert float((got - want).norm() / want.norm()) < (5e-3 if dtype == torch.float32 else 3e-2)
