"""The streamed evaluation against a plain transformers forward, and model-vs-baseline agreement."""

import pytest
import torch
from transformers import MixtralForCausalLM

from moequant.compression import compress
from moequant.errors import MoequantError
from moequant.evals.perplexity import next_token_nll, perplexity
from moequant.evals.streamed import evaluate_windows
from tests.conftest import make_mixtral


def windows(n: int, length: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    original = make_mixtral(root / "orig", seed=5)
    compressed = compress(original, root / "rtn", method="rtn").path
    return original, compressed


def hf_nll(path, ids):
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return next_token_nll(model(input_ids=ids).logits, ids)


@pytest.mark.parametrize("overrides,batch", [({}, 2), ({"sliding_window": 16}, 1)])
def test_streamed_matches_transformers_forward(tmp_path, overrides, batch):
    path = make_mixtral(tmp_path / "m", seed=7, **overrides)
    ids = windows(3, 40, seed=1)
    result = evaluate_windows(path, ids, batch=batch)
    ref = hf_nll(path, ids)
    assert result.nll.shape == (3, 39)
    assert ((result.nll - ref).abs() / ref.abs()).max() < 1e-5
    assert perplexity(result.nll) == pytest.approx(perplexity(ref), rel=1e-5)
    assert result.topk_ids.shape == (2, 3 * 40, 2)
    assert result.kl is None and result.router_agreement_per_layer() is None


def test_model_against_itself_agrees_fully(models):
    original, _ = models
    result = evaluate_windows(original, windows(3, 32), baseline=original, batch=2)
    assert result.kl.abs().max().item() == 0.0
    assert result.top1.all()
    assert result.router_agreement_per_layer() == [1.0, 1.0]
    assert result.hidden_error == [0.0, 0.0]
    assert torch.equal(result.nll, result.base_nll)


def test_rtn_compressed_differs_from_original(models):
    original, compressed = models
    ids = windows(4, 48, seed=2)
    result = evaluate_windows(compressed, ids, baseline=original, batch=3)
    assert result.kl.mean().item() > 0
    per_layer = result.router_agreement_per_layer()
    overall = sum(per_layer) / len(per_layer)
    assert 0.5 < overall < 1.0
    assert all(e > 0 for e in result.hidden_error)
    alone = evaluate_windows(original, ids, batch=4)
    assert torch.allclose(result.base_nll, alone.nll, rtol=1e-5, atol=1e-6)


def test_memory_engine_agrees_with_streamed(models):
    original, _ = models
    other = make_mixtral(original.parent / "other", seed=6)
    ids = windows(3, 32, seed=3)
    streamed = evaluate_windows(other, ids, baseline=original, batch=2)
    memory = evaluate_windows(other, ids, baseline=original, batch=2, engine="memory")
    assert torch.allclose(streamed.nll, memory.nll, rtol=1e-5, atol=1e-6)
    assert torch.allclose(streamed.kl, memory.kl, rtol=1e-4, atol=1e-6)
    assert streamed.router_agreement_per_layer() == pytest.approx(memory.router_agreement_per_layer(), abs=0.02)
    assert streamed.hidden_error == pytest.approx(memory.hidden_error, rel=1e-4)


def test_memory_engine_runs_compressed_checkpoints(models):
    original, compressed = models
    ids = windows(2, 24, seed=4)
    streamed = evaluate_windows(compressed, ids, baseline=original, batch=2)
    memory = evaluate_windows(compressed, ids, baseline=original, batch=2, engine="memory")
    assert torch.allclose(streamed.nll, memory.nll, rtol=1e-4, atol=1e-5)
    assert torch.allclose(streamed.kl, memory.kl, rtol=1e-3, atol=1e-6)


def test_mismatched_baseline_and_tokens_refused(models, tmp_path):
    original, _ = models
    deeper = make_mixtral(tmp_path / "deep", num_hidden_layers=3)
    with pytest.raises(MoequantError, match="num_layers"):
        evaluate_windows(deeper, windows(1, 8), baseline=original)
    with pytest.raises(MoequantError, match="vocabulary"):
        evaluate_windows(original, windows(1, 8, vocab=1000) + 256)
    with pytest.raises(MoequantError, match="engine"):
        evaluate_windows(original, windows(1, 8), engine="fast")
