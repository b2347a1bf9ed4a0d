import pytest
import torch

from moequant.quant.grid import dequantize, find_params, quantize
from moequant.quant.rtn import rtn
from moequant.recipe import parse_recipe


def weighted_error(w, scale, zero, bits, weight=None):
    s, z = scale[..., None], zero[..., None].float()
    d = (dequantize(quantize(w, s, z, bits), s, z) - w).square()
    return (d if weight is None else d * weight).sum(-1)


@pytest.mark.parametrize("bits, sym", [(2, True), (3, False), (4, True)])
def test_clip_search_never_worse_than_full_range(bits, sym):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen) * torch.rand(64, 1, generator=gen)
    w[:, 0] *= 6  # an outlier per row makes the full range wasteful
    weight = torch.rand(1, 128, generator=gen)
    for wt in (None, weight):
        s0, z0 = find_params(w, bits, sym)
        s1, z1 = find_params(w, bits, sym, clip_grid=20, weight=wt)
        e0, e1 = weighted_error(w, s0, z0, bits, wt), weighted_error(w, s1, z1, bits, wt)
        assert (e1 <= e0 + 1e-6).all()
        assert e1.sum() < 0.9 * e0.sum()
        assert (z1 >= 1).all() and (z1 <= 2**bits - 1).all()
        assert torch.equal(s1, s1.half().float())


def test_asymmetric_zero_point_stays_at_least_one():
    w = torch.rand(8, 32) + 0.5  # all positive: a zero of 0 would underflow the v1 layout
    scale, zero = find_params(w, 2, sym=False)
    assert (zero == 1).all()
    q = quantize(w, scale[:, None], zero[:, None].float(), 2)
    assert (dequantize(q, scale[:, None], zero[:, None].float()) - w).abs().max() <= scale.max()


def test_recipe_clip_search_reaches_the_spec():
    r = parse_recipe("name: c\nclip_search: true\nrules:\n  - match: '.*'\n    bits: 3\n")
    assert r.spec_for("x").clip_grid > 1
    assert parse_recipe("name: c\nrules:\n  - match: '.*'\n    bits: 3\n").spec_for("x").clip_grid == 0
    w = torch.randn(32, 64)
    assert rtn(w, 2, 32, True, clip_grid=20).error <= rtn(w, 2, 32, True).error
