import pytest
import torch

from moequant.budget.gain import (
    expected_errors,
    gptq_factor,
    gptq_gain,
    group_variance,
    identity_factor,
    shrunk,
    step_squares,
)
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


def uniform_errors(steps: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """``[draws, N, K]`` rounding errors, each uniform over its step ``steps [N, K]``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(draws, *steps.shape, generator=g, dtype=torch.float64) - 0.5) * steps.double()


def test_expected_errors_of_rounding_average_random_rounding():
    g = torch.Generator().manual_seed(20)
    x, read, steps = torch.randn(6, 24, generator=g), torch.rand(6, 10, generator=g), torch.rand(10, 24, generator=g)
    found = expected_errors(identity_factor((), 24, x.device), x, read, steps.pow(2).T / 12, torch.arange(24),
                            torch.tensor(0.0))
    dw = uniform_errors(steps, 20000, 21)
    mean = ((dw @ x.double().T).pow(2) * read.double().T).sum(1).mean(0)  # [t]
    torch.testing.assert_close(found.double(), mean, rtol=0.03, atol=0)


def test_expected_errors_of_gptq_average_its_moved_errors():
    x = correlated_inputs(2000, 16, seed=22)
    factor = gptq_factor(x.T @ x, 0.01, True)
    steps = torch.rand(8, 16, generator=torch.Generator().manual_seed(23)) + 0.5
    probe, read = x[:5], torch.rand(5, 8, generator=torch.Generator().manual_seed(24))
    found = expected_errors(factor, probe, read, steps.pow(2).T / 12, torch.arange(16), torch.tensor(0.0))
    order, u = factor.order, factor.u.double()
    moved = (uniform_errors(steps[:, order], 20000, 25) / u.diagonal()) @ u  # GPTQ's dW, columns in its order
    mean = ((moved @ probe[:, order].double().T).pow(2) * read.double().T).sum(1).mean(0)
    torch.testing.assert_close(found.double(), mean, rtol=0.05, atol=0)


def test_expected_errors_sum_to_what_the_gain_counts():
    x = correlated_inputs(300, 32, seed=26)
    h = x.T @ x
    factor = gptq_factor(h, 0.01, True)
    r = rtn(torch.randn(12, 32, generator=torch.Generator().manual_seed(27)), 3, 8, True)
    columns = step_squares(r.scales, r.g_idx)  # [K]: every row the same step
    shrink = torch.tensor(32 / (300 + 32))
    total = expected_errors(factor, x, torch.ones(300, 12), columns[:, None].expand(32, 12), torch.arange(32),
                            shrink).sum()
    want = 12 * gptq_gain(factor, shrunk(h, 300), columns) * (columns * h.diagonal()).sum()
    assert float(total) == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_expected_errors_follow_what_gptq_and_rounding_leave(bits):
    x = correlated_inputs(8000, 64, seed=28)
    fit, held_out = x[:4000], x[4000:]
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(29))
    r = rtn(w, bits, 32, True)
    variance = group_variance(r.dequantize() - w, r.g_idx)
    read = torch.ones(held_out.shape[0], 48)
    solved = gptq_quantize(w, fit.T @ fit, QuantSpec(bits=bits, group_size=32)).dequantize()
    shrink = torch.tensor(64 / (4000 + 64))
    gptq = float(expected_errors(gptq_factor(fit.T @ fit, 0.01, True), held_out, read, variance, r.g_idx, shrink).sum())
    rounding = float(expected_errors(identity_factor((), 64, x.device), held_out, read, variance, r.g_idx,
                                     shrink).sum())
    assert gptq / 1.5 < output_error(w, solved, held_out) < gptq * 1.5
    assert rounding / 1.2 < output_error(w, r.dequantize(), held_out) < rounding * 1.2


def test_group_variance_is_each_groups_mean_square_and_zero_where_rounding_is_exact():
    w = torch.randn(2, 6, 10, generator=torch.Generator().manual_seed(30))
    w[1, 3] = 0.0  # a row the grid holds exactly
    r = rtn(w, 2, 4, False)  # groups of 4, 4 and 2 columns
    error = r.dequantize() - w
    variance = group_variance(error, r.g_idx)
    assert variance.shape == (2, 3, 6)
    assert float(variance[0, 2, 5]) == pytest.approx(float(error[0, 5, 8:].pow(2).mean()))
    assert float(variance[1, 0, 1]) == pytest.approx(float(error[1, 1, :4].pow(2).mean()))
    assert (variance[1, :, 3] == 0).all() and (variance[0] > 0).all()


def test_expected_errors_of_a_batch_and_of_several_widths_are_each_alone():
    inputs = torch.stack([correlated_inputs(500, 16, seed=s) for s in (31, 32)])
    factor = gptq_factor(inputs.transpose(1, 2) @ inputs, 0.01, True)
    read = torch.rand(2, 7, 5, generator=torch.Generator().manual_seed(33))
    variance = torch.rand(3, 2, 4, 5, generator=torch.Generator().manual_seed(34))  # [widths, batch, G, N]
    g_idx, shrink = torch.arange(16) // 4, torch.tensor([0.1, 0.5])
    together = expected_errors(factor, inputs[:, :7], read, variance, g_idx, shrink)
    assert together.shape == (3, 2, 7)
    for e in range(2):
        alone = gptq_factor(inputs[e].T @ inputs[e], 0.01, True)
        for v in range(3):
            torch.testing.assert_close(together[v, e], expected_errors(alone, inputs[e, :7], read[e], variance[v, e],
                                                                       g_idx, shrink[e]), rtol=1e-4, atol=1e-6)
