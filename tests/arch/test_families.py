"""Qwen3-MoE, Qwen2-MoE and OLMoE: the one layer forward against transformers' own models."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moequant.arch.registry import adapter_for
from moequant.checkpoint.reader import CheckpointReader
from tests.arch.test_mixtral import Settling, explicit_logits
from tests.conftest import make_family

CASES = [
    ("qwen3_moe", {}),
    ("qwen3_moe", {"norm_topk_prob": False, "attention_bias": True, "mlp_only_layers": [], "num_key_value_heads": 1}),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8}),
    ("qwen2_moe", {}),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2, "norm_topk_prob": True}),
    ("deepseek_v3", {}),
    ("deepseek_v3", {"q_lora_rank": None, "rope_interleave": False, "norm_topk_prob": False, "n_group": 1,
                     "topk_group": 1, "first_k_dense_replace": 0, "attention_bias": True}),
    ("glm4_moe", {}),
    ("glm4_moe", {"use_qk_norm": False, "attention_bias": False, "norm_topk_prob": False, "first_k_dense_replace": 0,
                  "num_key_value_heads": 1}),
    ("olmoe", {}),
    ("olmoe", {"clip_qkv": None, "norm_topk_prob": True, "num_key_value_heads": 2}),
]


def hf_logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family, overrides", CASES)
def test_explicit_forward_matches_transformers(tmp_path, family, overrides):
    path = make_family(tmp_path / "m", family, seed=3, **overrides)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(path, ids)
    ours = explicit_logits(path, ids)
    assert (ours - ref).norm() / ref.norm() < 1e-5
    observer = Settling()
    assert torch.equal(explicit_logits(path, ids, observer), ours)
    adapter = adapter_for(CheckpointReader(path).config)
    moe_layers = [i for i in range(adapter.config.num_layers) if adapter.is_moe_layer(i)]
    assert observer.experts_seen == list(range(adapter.config.num_experts)) * len(moe_layers)
