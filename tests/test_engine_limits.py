"""engine_limits: which limits of fused-MoE GPTQ engines a checkpoint's modules run into."""

from __future__ import annotations

import json

import pytest

from moequant.arch.mixtral import MixtralAdapter
from moequant.engine_limits import engine_limits
from tests.conftest import TINY

ADAPTER = MixtralAdapter({**TINY, "model_type": "mixtral", "num_hidden_layers": 6})


def _stored(experts=(4, 128, True), attention=(4, 128, True), override=None):
    """Every layer's modules at ``experts`` / ``attention``, then ``override`` (name -> setting)."""
    stored = {}
    for layer in range(ADAPTER.config.num_layers):
        for info in ADAPTER.layer_linears(layer):
            if info.kind in ("expert", "attention"):
                stored[info.name] = experts if info.kind == "expert" else attention
    stored.update(override or {})
    return {k: v for k, v in stored.items() if v is not None}


def _expert(layer: int, expert: int, role: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{role}"


def test_uniform_4_and_8_bit_symmetric_layers_meet_every_limit():
    assert engine_limits(ADAPTER, _stored()) == []
    assert engine_limits(ADAPTER, _stored(experts=(8, 32, True), attention=(2, 64, False))) == []
    assert engine_limits(ADAPTER, {}) == []


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_experts_name_their_layers(bits):
    low = {
        _expert(layer, e, r): (bits, 128, True)
        for layer in (0, 1, 2, 5)
        for e in range(4)
        for r in ("w1", "w2", "w3")
    }
    (note,) = engine_limits(ADAPTER, _stored(override=low))
    assert note.startswith(f"{bits}-bit experts (layers 0-2, 5) run on moequant's kernels only")


def test_experts_that_differ_within_a_layer():
    w3_differs = {_expert(3, 1, "w3"): (4, 64, True)}
    assert engine_limits(ADAPTER, _stored(override=w3_differs)) == [
        "the experts of layer 3 differ in bits, group size or symmetry: vLLM needs one setting for all of a "
        "layer's experts"
    ]
    one_16_bit = {_expert(4, 2, "w2"): None}
    assert "the experts of layer 4 differ" in engine_limits(ADAPTER, _stored(override=one_16_bit))[0]
    all_16_bit = {_expert(4, e, r): None for e in range(4) for r in ("w1", "w2", "w3")}
    assert engine_limits(ADAPTER, _stored(override=all_16_bit)) == []


def test_asymmetric_experts_and_uneven_qkv():
    notes = engine_limits(ADAPTER, _stored(experts=(4, 128, False)))
    assert notes == ["asymmetric experts (layers 0-5): vLLM's Marlin MoE kernels take symmetric experts only"]
    q_16_bit = {"model.layers.1.self_attn.q_proj": None, "model.layers.2.self_attn.v_proj": (8, 128, True)}
    notes = engine_limits(ADAPTER, _stored(override=q_16_bit))
    assert notes == [
        "q, k and v (or MLA's q_a and kv_a) of layers 1-2 differ in bits, group size or symmetry: vLLM "
        "fuses them into one matrix with one setting"
    ]
    o_differs = {"model.layers.1.self_attn.o_proj": (8, 128, True)}
    assert engine_limits(ADAPTER, _stored(override=o_differs)) == []


def test_mla_projections_vllm_fuses(tmp_path):
    from moequant.arch.registry import adapter_for
    from tests.conftest import make_family

    adapter = adapter_for(json.loads((make_family(tmp_path / "d", "deepseek_v3") / "config.json").read_text()))
    stored = {i.name: (4, -1, True) for layer in range(3) for i in adapter.layer_linears(layer)
              if i.kind in ("attention", "expert")}
    assert engine_limits(adapter, stored) == []
    stored["model.layers.2.self_attn.kv_a_proj_with_mqa"] = (8, -1, True)
    assert engine_limits(adapter, stored) == [
        "q, k and v (or MLA's q_a and kv_a) of layer 2 differ in bits, group size or symmetry: vLLM fuses them "
        "into one matrix with one setting"
    ]


def test_one_group_is_one_group_whatever_its_width():
    """w1 (input H = 128) and w2 (input I = 256) in one group each: recorded as -1 by a recipe,
    as the input width when read from tensors; neither differs from the other."""
    h, i = TINY["hidden_size"], TINY["intermediate_size"]
    from_tensors = {
        _expert(0, e, r): (4, i if r == "w2" else h, True) for e in range(4) for r in ("w1", "w2", "w3")
    }
    from_recipe = {_expert(0, e, r): (4, -1, True) for e in range(4) for r in ("w1", "w2", "w3")}
    assert engine_limits(ADAPTER, _stored(override=from_tensors)) == []
    mixed = {**from_tensors, _expert(0, 0, "w2"): (4, -1, True)}
    assert engine_limits(ADAPTER, _stored(override=mixed)) == []
    assert engine_limits(ADAPTER, _stored(override=from_recipe)) == []


def test_groups_that_do_not_divide_an_input():
    # w1/w3: 128 inputs in groups of 96 and 32; w2: 256 in 96, 96 and 64
    uneven = {_expert(2, e, r): (4, 96, True) for e in range(4) for r in ("w1", "w2", "w3")}
    assert engine_limits(ADAPTER, _stored(override=uneven)) == [
        "group sizes that do not divide a module's inputs (layer 2, the last group shorter): vLLM needs "
        "groups that divide every input"
    ]
    assert engine_limits(ADAPTER, _stored(attention=(4, -1, True))) == []
