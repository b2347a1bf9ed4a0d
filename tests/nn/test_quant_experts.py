"""QuantExperts against a token-by-token loop over dequantised expert weights."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from moequant.kernels import dispatch
from moequant.nn.quant_experts import LinearSpec, QuantExperts
from moequant.packed.bitstream import dequantize_packed
from moequant.quant.pack import pack_result
from moequant.quant.rtn import rtn

H, INTER, E = 64, 96, 4


def quantised(n: int, k: int, bits: int, group_size: int, seed: int, sym: bool = False):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    return LinearSpec(bits, group_size), pack_result(rtn(weight, bits, group_size, sym), bits)


def dense(weight) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return weight.float()
    spec, p = weight
    return dequantize_packed(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], spec.bits)


def expert_loop(x, ids, weights, experts) -> torch.Tensor:
    """``sum_j w[t, j] * W2 (silu(W1 x_t) * W3 x_t)``, one token and slot at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            ex = experts[int(ids[t, j])]
            h = F.silu(dense(ex["w1"]) @ x[t]) * (dense(ex["w3"]) @ x[t])
            out[t] += weights[t, j] * (dense(ex["w2"]) @ h)
    return out


def uniform_experts(bits13: int = 3, bits2: int = 2, g13: int = 32, g2: int = 32, seed: int = 0):
    return [
        {"w1": quantised(INTER, H, bits13, g13, seed + 10 * e),
         "w3": quantised(INTER, H, bits13, g13, seed + 10 * e + 1),
         "w2": quantised(H, INTER, bits2, g2, seed + 10 * e + 2)}
        for e in range(E)
    ]


def routing(tokens: int, experts: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens routed to two distinct experts drawn from ``experts`` (the others get none)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen)
    pool = torch.tensor(experts)
    ids = torch.stack([pool[torch.randperm(len(experts), generator=gen)[:2]] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 2, generator=gen), dim=-1)
    return x, ids, weights


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


@pytest.mark.parametrize("tokens", [1, 9, 80])
def test_stacked_experts_match_the_loop_and_skip_idle_experts(tokens):
    experts = uniform_experts()
    module = QuantExperts.from_experts(experts, backend="torch")
    assert module.stacked
    x, ids, w = routing(tokens, (0, 2, 3))  # expert 1 gets no tokens
    close(module(x, ids, w), expert_loop(x, ids, w, experts))


def test_stacked_layout_joins_w1_before_w3():
    experts = uniform_experts(bits13=4, bits2=4, g13=64, g2=-1)
    module = QuantExperts.from_experts(experts, backend="torch")
    w13, w2 = module.packed_experts()
    for e in (0, 3):
        joined = dense((LinearSpec(4, 64), w13.expert(e)))
        torch.testing.assert_close(joined[:INTER], dense(experts[e]["w1"]))
        torch.testing.assert_close(joined[INTER:], dense(experts[e]["w3"]))
        torch.testing.assert_close(dense((LinearSpec(4, -1), w2.expert(e))), dense(experts[e]["w2"]))


def test_mixed_bits_and_16bit_experts_run_per_expert():
    experts = uniform_experts()
    experts[0]["w3"] = quantised(INTER, H, 4, 64, 99, sym=True)  # w1 and w3 differ
    experts[1]["w2"] = quantised(H, INTER, 8, -1, 98)
    gen = torch.Generator().manual_seed(7)
    experts[2] = {"w1": torch.randn(INTER, H, generator=gen) / 8, "w3": torch.randn(INTER, H, generator=gen) / 8,
                  "w2": torch.randn(H, INTER, generator=gen) / 10}
    module = QuantExperts.from_experts(experts, backend="torch")
    assert not module.stacked
    x, ids, w = routing(12, (0, 1, 2))
    close(module(x, ids, w), expert_loop(x, ids, w, experts))


def test_no_float_copy_of_packed_weights():
    experts = uniform_experts()
    module = QuantExperts.from_experts(experts, backend="torch")
    assert list(module.parameters()) == []
    floats = [n for n, t in module.named_buffers() if t.is_floating_point()]
    assert floats == ["w13_scales", "w2_scales"]
    packed_bytes = sum(t.numel() * t.element_size() for ex in experts for r in ("w1", "w3", "w2")
                       for k, t in ex[r][1].items() if not (r == "w3" and k == "g_idx"))
    held = sum(t.numel() * t.element_size() for t in module.buffers())
    assert held == packed_bytes  # w3 shares w1's g_idx, everything else is stored once, packed
    module.to(torch.bfloat16)
    assert module.w13_scales.dtype == torch.float16


def test_bf16_activations():
    experts = uniform_experts()
    module = QuantExperts.from_experts(experts, backend="torch")
    x, ids, w = routing(6, (0, 1, 2, 3))
    y = module(x.to(torch.bfloat16), ids, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expert_loop(x, ids, w, experts), rtol=3e-2, atol=3e-2)


def _need_triton():
    pytest.importorskip("triton")
    if not dispatch.triton_available("cpu"):
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 set before they are imported")


def test_fused_kernel_path_in_the_interpreter():
    _need_triton()
    experts = uniform_experts(bits13=3, bits2=4)
    module = QuantExperts.from_experts(experts, backend="triton")
    x, ids, w = routing(5, (0, 2, 3))
    torch.testing.assert_close(module(x, ids, w), expert_loop(x, ids, w, experts), rtol=1e-4, atol=1e-4)


def test_mixed_experts_on_triton_warn_once():
    _need_triton()
    experts = uniform_experts()
    experts[1]["w2"] = quantised(H, INTER, 8, 32, 5)
    module = QuantExperts.from_experts(experts, backend="triton")
    x, ids, w = routing(3, (0, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = module(x, ids, w)
        module(x, ids, w)
    assert len([c for c in caught if "fused MoE kernel" in str(c.message)]) == 1
    torch.testing.assert_close(first, expert_loop(x, ids, w, experts), rtol=1e-4, atol=1e-4)
