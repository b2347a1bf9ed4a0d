import pytest
import torch

from moequant.quant.hessian import HessianAccumulator


def _ref(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    x = x.double()
    w = torch.ones(x.shape[0], dtype=torch.float64) if w is None else w.double()
    return 2.0 * (x * w[:, None]).T @ x / w.sum()


def test_chunks_match_full_product():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(301, 48, generator=gen)
    acc = HessianAccumulator(1, 48)
    for chunk in x.split(64):
        acc.add(chunk)
    assert acc.tokens.tolist() == [301]
    assert acc.weight_sum.tolist() == [301.0]
    h = acc.hessian()
    assert h.shape == (1, 48, 48) and h.dtype == torch.float32
    assert torch.allclose(h[0].double(), _ref(x), rtol=1e-5, atol=1e-5)


def test_leading_dims_are_flattened():
    x = torch.randn(4, 10, 16)
    acc = HessianAccumulator(1, 16)
    acc.add(x)
    assert acc.tokens.tolist() == [40]
    assert torch.allclose(acc.hessian()[0].double(), _ref(x.reshape(-1, 16)), rtol=1e-5, atol=1e-5)


def test_weighted_add():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 32, generator=gen)
    w = torch.rand(200, generator=gen)
    acc = HessianAccumulator(2, 32)
    acc.add(x[:120], 1, w[:120])
    acc.add(x[120:], 1, w[120:])
    assert acc.tokens.tolist() == [0, 200]
    assert acc.weight_sum[1].item() == pytest.approx(w.double().sum().item(), rel=1e-6)
    h = acc.hessian()
    assert torch.allclose(h[1].double(), _ref(x, w), rtol=1e-4, atol=1e-5)
    assert torch.equal(h[0], torch.zeros(32, 32))


def test_unit_weights_equal_unweighted():
    x = torch.randn(50, 16)
    a, b = HessianAccumulator(1, 16), HessianAccumulator(1, 16)
    a.add(x)
    b.add(x, 0, torch.ones(50))
    assert torch.allclose(a.hessian(), b.hessian(), rtol=1e-6, atol=1e-6)


def test_inplace_hessian_closes_accumulator():
    x = torch.randn(20, 8)
    acc = HessianAccumulator(1, 8)
    acc.add(x)
    expected = acc.hessian()
    h = acc.hessian(inplace=True)
    assert h.data_ptr() == acc.xtx.data_ptr()
    assert torch.allclose(h, expected)
    with pytest.raises(RuntimeError):
        acc.add(x)


def test_bad_inputs_raise():
    acc = HessianAccumulator(2, 8)
    with pytest.raises(ValueError):
        acc.add(torch.randn(4, 9))
    with pytest.raises(ValueError):
        acc.add(torch.randn(4, 8), 0, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(IndexError):
        acc.add(torch.randn(4, 8), 2)
