import pytest
import torch

from moequant.budget.gain import gptq_factor, gptq_gain, shrunk, step_squares
from moequant.quant.gptq import gptq_quantize
from moequant.quant.rtn import rtn
from moequant.quant.types import QuantSpec


def correlated_inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[rows, k]`` inputs driven by k/4 shared factors and a little noise of their own."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(rows, k // 4, generator=g)
    mixing = torch.randn(k // 4, k, generator=g)
    return factors @ mixing + 0.1 * torch.randn(rows, k, generator=g)


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (q - w).T).pow(2).sum())


def rho(x: torch.Tensor, w: torch.Tensor, bits: int, group: int = 32, moment: torch.Tensor | None = None) -> float:
    h = x.T @ x
    r = rtn(w, bits, group, True)
    return float(gptq_gain(gptq_factor(h, 0.01, True), shrunk(h if moment is None else moment, x.shape[0]),
                           step_squares(r.scales, r.g_idx)))


def test_gain_counts_what_later_columns_cannot_explain():
    x = correlated_inputs(4000, 8)
    h = x.T @ x
    steps = torch.rand(8, generator=torch.Generator().manual_seed(1)) + 0.5
    order = torch.argsort(h.diagonal(), descending=True)
    hp = h.double()[order][:, order]
    left = []
    for j in range(8):  # the variance of input j once the inputs after it in GPTQ's order explain what they can
        cross = hp[j, j + 1:]
        left.append(float(hp[j, j] - (cross @ torch.linalg.solve(hp[j + 1:, j + 1:], cross) if j < 7 else 0)))
    want = sum(float(steps[order[j]]) * left[j] for j in range(8)) / float((steps * h.diagonal()).sum())
    assert float(gptq_gain(gptq_factor(h, 0.0, True), h, steps)) == pytest.approx(want, rel=1e-3)


def test_gain_is_one_for_independent_inputs_and_small_for_correlated_ones():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    assert rho(torch.randn(20000, 64, generator=torch.Generator().manual_seed(2)), w, 3) == pytest.approx(1, abs=0.05)
    assert rho(correlated_inputs(20000, 64), w, 3) < 0.2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gain_follows_what_gptq_does(bits):
    x = correlated_inputs(8000, 64, seed=3)
    fit, held_out = x[:4000], x[4000:]
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(4))
    spec = QuantSpec(bits=bits, group_size=32)
    actual = output_error(w, gptq_quantize(w, fit.T @ fit, spec).dequantize(), held_out) / \
        output_error(w, rtn(w, bits, 32, True).dequantize(), held_out)
    assert actual < 0.5
    assert actual / 1.5 < rho(fit, w, bits) < actual * 1.5


def test_gain_counts_the_error_where_it_is_weighed():
    mixed = correlated_inputs(4000, 64, seed=7)
    plain_inputs = torch.randn(4000, 64, generator=torch.Generator().manual_seed(8)) * 3
    x = torch.cat([mixed, plain_inputs])
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(9))
    spec = QuantSpec(bits=3, group_size=32)
    solved = gptq_quantize(w, x.T @ x, spec).dequantize()
    rounded = rtn(w, 3, 32, True).dequantize()
    for counted in (mixed, plain_inputs):  # GPTQ fits both kinds of token; each kind alone counts the error
        actual = output_error(w, solved, counted) / output_error(w, rounded, counted)
        assert actual / 1.5 < rho(x, w, 3, moment=counted.T @ counted) < actual * 1.5
    assert rho(x, w, 3, moment=mixed.T @ mixed) < 0.5 < rho(x, w, 3, moment=plain_inputs.T @ plain_inputs)


def test_few_rows_shrink_the_gain_toward_rounding():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    gains = [rho(correlated_inputs(rows, 64, seed=6), w, 3) for rows in (16, 256, 16384)]
    assert gains[0] > gains[1] > gains[2]
    assert gains[0] > 0.7


def test_columns_without_input_cost_nothing():
    x = correlated_inputs(2000, 16)
    x[:, 5] = 0
    h = x.T @ x
    factor = gptq_factor(h, 0.01, True)
    assert bool(factor.ok) and torch.isfinite(factor.u).all()
    steps = torch.ones(16)
    alive = [j for j in range(16) if j != 5]
    without = gptq_gain(gptq_factor(h[alive][:, alive], 0.01, True), h[alive][:, alive], steps[alive])
    assert float(gptq_gain(factor, h, steps)) == pytest.approx(float(without), rel=0.05)
    assert float(gptq_gain(factor, torch.zeros(16, 16), steps)) == 1.0


def test_a_batch_gains_each_as_alone():
    inputs = [correlated_inputs(3000, 32, seed=s) for s in range(3)]
    inputs[1] = torch.randn(3000, 32, generator=torch.Generator().manual_seed(11))
    hessians = torch.stack([x.T @ x for x in inputs])
    hessians[2] = torch.full((32, 32), 2.0) - torch.eye(32)  # indefinite, no factor: rounding's error stands
    steps = torch.rand(3, 32, generator=torch.Generator().manual_seed(12))
    batch = gptq_gain(gptq_factor(hessians, 0.01, True), shrunk(hessians, torch.tensor([3000, 3000, 3000])), steps)
    alone = [gptq_gain(gptq_factor(h, 0.01, True), shrunk(h, 3000), s) for h, s in zip(hessians[:2], steps[:2], strict=True)]
    torch.testing.assert_close(batch[:2], torch.stack(alone), rtol=1e-4, atol=1e-6)
    assert float(batch[2]) == 1.0 and float(batch[0]) < 0.5
