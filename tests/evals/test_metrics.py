"""Metric functions against direct, element-by-element computations."""

import math

import pytest
import torch

from moequant.evals.agreement import (
    kl_divergence,
    router_agreement,
    summarize,
    top1_equal,
    topk_sets_equal,
)
from moequant.evals.perplexity import next_token_nll, perplexity, perplexity_stderr, token_nll


def _softmax64(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def test_token_nll_matches_direct_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen) * 3
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    nll = token_nll(logits, targets)
    for i in range(3):
        for t in range(5):
            p = _softmax64(logits[i, t].double().tolist())
            assert nll[i, t].item() == pytest.approx(-math.log(p[targets[i, t]]), rel=1e-5)


def test_next_token_nll_shifts_by_one():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 7, generator=gen)
    windows = torch.randint(0, 7, (2, 6), generator=gen)
    nll = next_token_nll(logits, windows)
    assert nll.shape == (2, 5)
    p = _softmax64(logits[1, 2].double().tolist())
    assert nll[1, 2].item() == pytest.approx(-math.log(p[windows[1, 3]]), rel=1e-5)


def test_perplexity_and_delta_method_stderr():
    nll = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [0.5, 1.5, 4.0], [3.0, 3.0, 0.0]])
    flat = [v for row in nll.tolist() for v in row]
    mean = sum(flat) / len(flat)
    assert perplexity(nll) == pytest.approx(math.exp(mean))
    per_window = [sum(r) / len(r) for r in nll.tolist()]
    var = sum((m - mean) ** 2 for m in per_window) / (len(per_window) - 1)
    assert perplexity_stderr(nll) == pytest.approx(math.exp(mean) * math.sqrt(var / len(per_window)))
    assert perplexity_stderr(nll[:1]) is None


def test_kl_is_base_to_model_direction():
    base = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    model = torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    kl = kl_divergence(base, model)
    for i in range(2):
        pb = _softmax64(base[i].tolist())
        pm = _softmax64(model[i].tolist())
        direct = sum(b * math.log(b / m) for b, m in zip(pb, pm, strict=True))
        reverse = sum(m * math.log(m / b) for b, m in zip(pb, pm, strict=True))
        assert kl[i].item() == pytest.approx(direct, rel=1e-5, abs=1e-7)
        if i == 0:
            assert abs(direct - reverse) > 1e-3
    assert kl[1].item() == 0.0
    assert kl_divergence(base, base).abs().max().item() < 1e-6


def test_top1_and_router_sets():
    base = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    model = torch.tensor([[0.0, 4.0, 1.0], [0.0, 0.0, 1.0]])
    assert top1_equal(base, model).tolist() == [True, False]
    a = torch.tensor([[0, 3], [1, 2], [4, 5], [6, 7]])
    b = torch.tensor([[3, 0], [1, 2], [4, 6], [7, 6]])
    assert topk_sets_equal(a, b).tolist() == [True, True, False, True]
    assert router_agreement(a, b) == pytest.approx(0.75)


def test_summary():
    gen = torch.Generator().manual_seed(2)
    values = torch.rand(1001, generator=gen)
    s = sorted(values.double().tolist())
    pos = 0.99 * (len(s) - 1)
    lo = int(math.floor(pos))
    p99 = s[lo] + (s[lo + 1] - s[lo]) * (pos - lo)
    out = summarize(values.view(7, 143))
    assert out["mean"] == pytest.approx(sum(s) / len(s))
    assert out["median"] == pytest.approx(s[500])
    assert out["p99"] == pytest.approx(p99)
