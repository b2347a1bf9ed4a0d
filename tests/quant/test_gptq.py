import pytest
import torch

from moequant.errors import MoequantError
from moequant.quant.gptq import gptq_quantize, output_error
from moequant.quant.hessian import HessianAccumulator
from moequant.quant.rtn import rtn
from moequant.quant.types import QuantSpec


def _correlated_inputs(e: int, t: int, k: int, seed: int, rank: int = 8) -> torch.Tensor:
    """``[E, T, K]`` inputs dominated by a few directions, with uneven feature scales."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, rank, generator=gen) * 3.0
    feat_scale = torch.rand(k, generator=gen) * 2.0 + 0.1
    x = torch.randn(e, t, rank, generator=gen) @ basis.T + 0.1 * torch.randn(e, t, k, generator=gen)
    return x * feat_scale


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x.transpose(-1, -2) @ x / x.shape[-2]


def _direct_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``||(W - Q) Xᵀ|| / ||W Xᵀ||`` per matrix, straight from the inputs."""
    w64, q64, x64 = w.double(), q.double(), x.double()
    num = ((w64 - q64) @ x64.transpose(-1, -2)).flatten(-2).norm(dim=-1)
    den = (w64 @ x64.transpose(-1, -2)).flatten(-2).norm(dim=-1)
    return num / den


def _manual_dequant(codes, scales, zeros, g):
    """Dequantise group by group with slices (independent of ``QuantResult.dequantize``)."""
    out = torch.empty(codes.shape, dtype=torch.float32)
    k = codes.shape[-1]
    for gi, c0 in enumerate(range(0, k, g)):
        c1 = min(c0 + g, k)
        s = scales[..., gi, :].float()[..., None]
        z = zeros[..., gi, :].float()[..., None]
        out[..., c0:c1] = (codes[..., c0:c1].float() - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 96, 128, -1])  # 128: a last group of 64 columns
def test_result_layout_and_dequantisation(bits, sym, act_order, group_size):
    e, n, k = 2, 32, 192
    x = _correlated_inputs(e, 256, k, seed=bits)
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(1))
    res = gptq_quantize(
        w, _hessian(x), QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order)
    )
    g = k if group_size == -1 else group_size
    n_groups = -(-k // g)
    assert res.codes.shape == (e, n, k) and res.codes.dtype == torch.int32
    assert res.scales.shape == (e, n_groups, n) and res.scales.dtype == torch.float16
    assert res.zeros.shape == (e, n_groups, n) and res.zeros.dtype == torch.int32
    assert res.codes.min() >= 0 and res.codes.max() <= 2**bits - 1
    assert res.zeros.min() >= 1 and res.zeros.max() <= 2**bits - 1
    if sym:
        assert bool((res.zeros == 2 ** (bits - 1)).all())
    assert bool((res.scales > 0).all())
    assert torch.equal(res.g_idx, (torch.arange(k) // g).to(torch.int32))
    assert torch.equal(res.dequantize(), _manual_dequant(res.codes, res.scales, res.zeros, g))
    assert res.error.shape == (e,) and res.damp.shape == (e,)
    assert torch.allclose(res.damp, torch.full((e,), 0.01))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits, sym):
    e, n, k = 4, 64, 128
    x = _correlated_inputs(e, 512, k, seed=10 + bits)
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(2))
    res = gptq_quantize(w, _hessian(x), QuantSpec(bits=bits, group_size=32, sym=sym, act_order=False))
    base = rtn(w, bits, 32, sym)
    err_gptq = _direct_error(w, res.dequantize(), x)
    err_rtn = _direct_error(w, base.dequantize(), x)
    assert bool((err_gptq < 0.5 * err_rtn).all()), (err_gptq, err_rtn)
    assert torch.allclose(res.error.double(), err_gptq, rtol=1e-3)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 96, -1])
def test_batched_equals_loop(act_order, group_size):
    e, n, k = 4, 64, 192
    x = _correlated_inputs(e, 256, k, seed=3)
    h = _hessian(x)
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec(bits=3, group_size=group_size, sym=False, act_order=act_order)
    batched = gptq_quantize(w, h, spec)
    for i in range(e):
        one = gptq_quantize(w[i], h[i], spec)
        assert one.codes.shape == (n, k) and one.error.shape == () and one.damp.shape == ()
        assert torch.equal(batched.codes[i], one.codes)
        assert torch.equal(batched.scales[i], one.scales)
        assert torch.equal(batched.zeros[i], one.zeros)
        assert torch.allclose(batched.error[i], one.error, rtol=1e-6, atol=0)


@pytest.mark.parametrize("group_size", [32, 96, 192, -1])
def test_lazy_block_updates_match_unblocked(group_size):
    # Block size 1 applies every update immediately; lazy blocks must reach the same codes.
    e, n, k = 2, 32, 384
    x = _correlated_inputs(e, 512, k, seed=4)
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(4))
    h = _hessian(x)
    lazy = gptq_quantize(
        w, h, QuantSpec(bits=3, group_size=group_size, sym=False, act_order=False, block_size=128)
    )
    eager = gptq_quantize(
        w, h, QuantSpec(bits=3, group_size=group_size, sym=False, act_order=False, block_size=1)
    )
    assert (lazy.codes != eager.codes).float().mean() < 1e-3
    assert torch.allclose(lazy.scales.float(), eager.scales.float(), rtol=2e-3)
    assert torch.allclose(lazy.error, eager.error, rtol=1e-2)


def test_act_order_static_groups_no_worse_on_average():
    e, n, k = 2, 64, 128
    with_ao, without = [], []
    for seed in range(4):
        x = _correlated_inputs(e, 512, k, seed=100 + seed)
        w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(seed))
        h = _hessian(x)
        ao = gptq_quantize(w, h, QuantSpec(bits=3, group_size=32, sym=True, act_order=True))
        plain = gptq_quantize(w, h, QuantSpec(bits=3, group_size=32, sym=True, act_order=False))
        assert bool((ao.g_idx[1:] >= ao.g_idx[:-1]).all())
        with_ao.append(_direct_error(w, ao.dequantize(), x).mean())
        without.append(_direct_error(w, plain.dequantize(), x).mean())
    assert torch.stack(with_ao).mean() <= torch.stack(without).mean()


def test_act_order_uses_static_groups_from_original_weights():
    e, n, k = 2, 32, 128
    x = _correlated_inputs(e, 256, k, seed=5)
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(5))
    res = gptq_quantize(w, _hessian(x), QuantSpec(bits=4, group_size=32, sym=False, act_order=True))
    base = rtn(w, 4, 32, False)
    assert torch.equal(res.scales, base.scales)
    assert torch.equal(res.zeros, base.zeros)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns_keep_their_weights(act_order):
    e, n, k = 2, 64, 128
    x = _correlated_inputs(e, 512, k, seed=6)
    dead = torch.tensor([0, 5, 40, 41, 127])
    x[..., dead] = 0.0
    h = _hessian(x)
    assert bool((h.diagonal(dim1=-2, dim2=-1)[:, dead] == 0).all())
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(6))
    res = gptq_quantize(w, h, QuantSpec(bits=4, group_size=32, sym=True, act_order=act_order))
    q = res.dequantize()
    wd, qd = w[..., dead], q[..., dead]
    assert (qd != 0).float().mean() > 0.8
    assert (qd - wd).norm() / wd.norm() < 0.2
    if act_order:
        # static grids cover the original values: dead columns are plain rounding
        step = res.scales.float()[:, res.g_idx[dead].long(), :].transpose(-1, -2)
        assert bool(((qd - wd).abs() <= 0.51 * step).all())
    assert bool(torch.isfinite(res.error).all())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 96])  # 96: a last group of 32 columns
def test_zero_hessian_gives_rtn(act_order, sym, group_size):
    e, n, k = 3, 64, 128
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(7))
    res = gptq_quantize(
        w, torch.zeros(e, k, k), QuantSpec(bits=3, group_size=group_size, sym=sym, act_order=act_order)
    )
    base = rtn(w, 3, group_size, sym)
    assert base.scales.shape == (e, -(-k // group_size), n)
    assert torch.equal(base.dequantize(), _manual_dequant(base.codes, base.scales, base.zeros, group_size))
    assert torch.equal(res.codes, base.codes)
    assert torch.equal(res.scales, base.scales)
    assert torch.equal(res.zeros, base.zeros)
    assert torch.allclose(res.error, base.error, rtol=1e-6)
    assert bool((res.error > 0).all())


def test_expert_without_tokens_in_a_batch_gives_rtn():
    e, n, k = 3, 64, 128
    x = _correlated_inputs(e, 256, k, seed=8)
    h = _hessian(x)
    h[1] = 0.0
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(8))
    res = gptq_quantize(w, h, QuantSpec(bits=4, group_size=32, sym=True, act_order=True))
    base = rtn(w[1], 4, 32, True)
    assert torch.equal(res.codes[1], base.codes)
    assert not torch.equal(res.codes[0], rtn(w[0], 4, 32, True).codes)


def _indefinite(h0: torch.Tensor, neg_frac: float) -> torch.Tensor:
    """Shift ``h0`` so its smallest eigenvalue is ``-neg_frac`` times its mean diagonal."""
    k = h0.shape[-1]
    lmin = torch.linalg.eigvalsh(h0.double())[0]
    m0 = h0.double().diagonal().mean()
    c = (lmin + neg_frac * m0) / (1.0 - neg_frac)
    h = h0.double() - c * torch.eye(k, dtype=torch.float64)
    assert torch.linalg.eigvalsh(h)[0] < -0.02 * h.diagonal().mean()
    return h.float()


def test_indefinite_hessian_raises_damping_for_that_matrix_only():
    e, n, k = 3, 32, 64
    x = _correlated_inputs(e, 256, k, seed=9)
    h = _hessian(x)
    h[2] = _indefinite(h[2], 0.03)
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(9))
    spec = QuantSpec(bits=4, group_size=32, sym=True, act_order=True, damp=0.01)
    res = gptq_quantize(w, h, spec)
    assert torch.allclose(res.damp, torch.tensor([0.01, 0.01, 0.1]))
    assert bool(torch.isfinite(res.dequantize()).all())
    assert res.codes.min() >= 0 and res.codes.max() <= 15
    single = gptq_quantize(w[2], h[2], spec)
    assert torch.allclose(single.damp, torch.tensor(0.1))
    assert torch.equal(single.codes, res.codes[2])


def test_hopeless_hessian_raises():
    k = 64
    w = torch.randn(16, k)
    with pytest.raises(MoequantError):
        gptq_quantize(w, -torch.eye(k), QuantSpec(bits=4, group_size=32))


def test_non_finite_inputs_raise():
    k = 64
    w = torch.randn(16, k)
    h = torch.eye(k)
    h[3, 3] = float("nan")
    with pytest.raises(MoequantError):
        gptq_quantize(w, h, QuantSpec(bits=4, group_size=32))
    with pytest.raises(MoequantError):
        gptq_quantize(w, torch.eye(k), QuantSpec(bits=5, group_size=32))


def test_inputs_are_not_modified():
    e, n, k = 2, 32, 64
    x = _correlated_inputs(e, 128, k, seed=11)
    x[..., 3] = 0.0
    h = _hessian(x).to(torch.bfloat16)
    w = torch.randn(e, n, k).to(torch.bfloat16)
    h_copy, w_copy = h.clone(), w.clone()
    for ao in (False, True):
        gptq_quantize(w, h, QuantSpec(bits=4, group_size=32, act_order=ao))
    assert torch.equal(h, h_copy) and torch.equal(w, w_copy)


def test_output_error_matches_direct_computation():
    gen = torch.Generator().manual_seed(12)
    e, n, k, t = 3, 16, 48, 200
    x = torch.randn(e, t, k, generator=gen)
    w = torch.randn(e, n, k, generator=gen)
    q = w + 0.05 * torch.randn(e, n, k, generator=gen)
    direct = _direct_error(w, q, x)
    assert torch.allclose(output_error(w, q, _hessian(x)).double(), direct, rtol=1e-4)
    assert torch.allclose(output_error(w, q, 7.0 * x.transpose(-1, -2) @ x).double(), direct, rtol=1e-4)
    assert torch.allclose(output_error(w[1], q[1], _hessian(x[1])).double(), direct[1], rtol=1e-4)


def test_error_from_accumulated_hessian_matches_inputs():
    e, n, k = 2, 32, 64
    x = _correlated_inputs(e, 300, k, seed=13)
    acc = HessianAccumulator(e, k)
    for i in range(e):
        for chunk in x[i].split(128):
            acc.add(chunk, i)
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(13))
    res = gptq_quantize(w, acc.hessian(), QuantSpec(bits=3, group_size=32))
    assert torch.allclose(res.error.double(), _direct_error(w, res.dequantize(), x), rtol=1e-3)
