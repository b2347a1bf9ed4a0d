"""Mixtral shapes other than the bundled model's, end to end: compress, read back by an
independent GPTQ reader (tests/gptq_reader.py), and run with moequant.load.

Each case varies what a model can vary: expert count and top-k, grouped-query ratio (MQA to
MHA), an explicit head_dim, sliding window, rope scaling, tied embeddings, source dtype, fused or
per-expert files, sharded or single-file, symmetric or not, one width or several per layer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moequant.builtin_data import BUNDLED_MODEL_DIR
from moequant.compression import CalibSettings, compress
from moequant.kernels import dispatch
from moequant.loading import load
from tests.gptq_reader import read_as_float, write_float_checkpoint

MIXED = """name: mixed
method: {method}
group_size: 32
sym: false
rules:
  - match: '.*\\.self_attn\\.(q|k)_proj'
    bits: 8
  - match: '.*\\.self_attn\\.(v|o)_proj'
    bits: 4
    sym: true
  - match: '.*\\.block_sparse_moe\\.experts\\.[02]\\.w[123]'
    bits: 2
    group_size: 64
  - match: '.*\\.block_sparse_moe\\.experts\\.\\d+\\.w[123]'
    bits: 3
"""

CASES = {
    "six-experts-top3-mqa-window-tied-fused-sharded": dict(
        model=dict(num_local_experts=6, num_experts_per_tok=3, hidden_size=96, num_attention_heads=3,
                   num_key_value_heads=1, intermediate_size=160, sliding_window=16, tie_word_embeddings=True),
        dtype=torch.bfloat16, save=dict(save_original_format=False, max_shard_size="200KB"),
        recipe="a4e2", method="rtn"),
    "three-experts-top1-head-dim-48-linear-rope-fp16": dict(
        model=dict(num_local_experts=3, num_experts_per_tok=1, hidden_size=64, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=48, intermediate_size=96,
                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        dtype=torch.float16, save={}, recipe="a4e3", method="gptq"),
    "twelve-experts-top4-mha-mixed-widths-asymmetric": dict(
        model=dict(num_local_experts=12, num_experts_per_tok=4, hidden_size=128, num_attention_heads=4,
                   num_key_value_heads=4, intermediate_size=64, num_hidden_layers=3),
        dtype=torch.float32, save=dict(max_shard_size="300KB"), recipe=MIXED, method="gptq"),
}


def make_source(folder, case: dict) -> None:
    """Write ``case``'s random model and the bundled tokenizer to ``folder``."""
    torch.manual_seed(len(folder.name))
    config = MixtralConfig(**{"vocab_size": 2048, "num_hidden_layers": 2, "max_position_embeddings": 128,
                              **case["model"]})
    MixtralForCausalLM(config).to(case["dtype"]).save_pretrained(folder, **case["save"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL_DIR / name, folder)


def compress_case(tmp_path, case: dict, method: str) -> Path:
    """Write ``case``'s model to ``tmp_path/src`` and compress it by ``method`` into ``tmp_path/out``."""
    make_source(tmp_path / "src", case)
    recipe = case["recipe"]
    if "\n" in recipe:  # a recipe text rather than a built-in name
        (tmp_path / "recipe.yaml").write_text(recipe.format(method=method))
        recipe = str(tmp_path / "recipe.yaml")
    return compress(tmp_path / "src", tmp_path / "out", recipe=recipe, method=method,
                    calib=CalibSettings(samples=4, seqlen=64)).path


def independent_logits(out, tmp_path, ids: torch.Tensor, backend: str,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(moequant.load's logits in dtype, the independently read float32 model's)`` for ``ids
    [B, T]``, both on ``ids``' device."""
    reference = MixtralForCausalLM.from_pretrained(write_float_checkpoint(out, tmp_path / "float"),
                                                   dtype=torch.float32).eval().to(ids.device)
    with torch.no_grad():
        got = load(out, device=ids.device, dtype=dtype, backend=backend)(input_ids=ids).logits
        return got.float(), reference(input_ids=ids).logits


@pytest.mark.parametrize("name", sorted(CASES))
def test_compressed_model_matches_an_independent_reading(tmp_path, name):
    case = CASES[name]
    out = compress_case(tmp_path, case, case["method"])
    config, plain = read_as_float(out)
    layers = config["num_hidden_layers"]
    experts = case["model"]["num_local_experts"]
    assert sum(".experts." in n for n in plain) == 3 * experts * layers
    assert all(plain[n].dtype == torch.float32 for n in plain)
    ids = torch.randint(0, 2048, (2, 40), generator=torch.Generator().manual_seed(0))
    got, want = independent_logits(out, tmp_path, ids, "torch")
    with torch.no_grad():
        original = MixtralForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()(input_ids=ids).logits
    assert (got - want).norm() / want.norm() < 1e-5
    # A compression of this model (0.18-0.21 here), not of another (about 1.4 between unrelated ones).
    assert (got - original).norm() / original.norm() < 0.35


@pytest.mark.skipif(not dispatch.triton_available("cpu"), reason="needs TRITON_INTERPRET=1 before kernels import")
def test_triton_kernels_on_an_unusual_shape(tmp_path):
    """Six experts top-3, MQA, one layer, 2-bit experts: the Triton path equals the independent reading."""
    case = {**CASES["six-experts-top3-mqa-window-tied-fused-sharded"]}
    case["model"] = {**case["model"], "num_hidden_layers": 1}
    out = compress_case(tmp_path, case, "rtn")
    ids = torch.randint(0, 2048, (1, 9), generator=torch.Generator().manual_seed(1))
    got, want = independent_logits(out, tmp_path, ids, "triton")
    assert (got - want).norm() / want.norm() < 1e-5
