import re

from moequant.checkpoint.gptq_config import quantization_config
from moequant.quant.types import QuantSpec


def mixtral_specs(attn: QuantSpec | None, expert, layers: int = 3, experts: int = 4) -> tuple[dict, list[str]]:
    specs, routers = {}, []
    for layer in range(layers):
        for role in "qkvo":
            specs[f"model.layers.{layer}.self_attn.{role}_proj"] = attn
        routers.append(f"model.layers.{layer}.block_sparse_moe.gate")
        for e in range(experts):
            for w in ("w1", "w2", "w3"):
                specs[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"] = expert(layer, e, w)
    return specs, routers


def resolve(config: dict, name: str) -> tuple | None:
    """What a GPTQ reader makes of ``name``: the first ``re.match``-ing dynamic entry wins."""
    for pattern, override in config.get("dynamic", {}).items():
        if re.match(pattern[2:], name):
            return None if pattern.startswith("-:") else (override["bits"], override["group_size"])
    return config["bits"], config["group_size"]


def test_every_module_resolves_to_its_spec_and_routers_to_none():
    def expert(layer, e, w):
        return None if (layer, e) == (1, 2) else QuantSpec(3, 64)

    specs, routers = mixtral_specs(QuantSpec(4, 128), expert)
    config = quantization_config(specs, "0", "r", 0.01, True, False, routers)
    assert (config["bits"], config["group_size"]) == (3, 64)
    for name, spec in specs.items():
        assert resolve(config, name) == (None if spec is None else (spec.bits, spec.group_size)), name
    assert not any(re.match(p[2:], r) for p in config["dynamic"] for r in routers)
    assert len(config["dynamic"]) == 4  # attention as one parent pattern, three exact skips


def test_patterns_reach_fused_module_names_of_serving_engines():
    specs, routers = mixtral_specs(QuantSpec(8, 128), lambda *_: QuantSpec(4, 128))
    config = quantization_config(specs, "0", "r", 0.01, True, False, routers)
    assert config["bits"] == 4 and resolve(config, "model.layers.2.self_attn.qkv_proj") == (8, 128)
    few_attn, _ = mixtral_specs(QuantSpec(4, 128), lambda *_: QuantSpec(2, 64), layers=1, experts=8)
    config = quantization_config(few_attn, "0", "r", 0.01, True, False, routers[:1])
    assert config["bits"] == 2 and resolve(config, "model.layers.0.self_attn.qkv_proj") == (4, 128)
    attn_default, _ = mixtral_specs(QuantSpec(4, 128), lambda *_: QuantSpec(2, 64), layers=1, experts=1)
    config = quantization_config(attn_default, "0", "r", 0.01, True, False, routers[:1])
    assert config["bits"] == 4 and resolve(config, "model.layers.0.block_sparse_moe.experts") == (2, 64)
    assert not any(re.match(p[2:], "model.layers.0.block_sparse_moe.gate") for p in config["dynamic"])


def test_experts_with_bits_per_layer_reach_the_fused_experts_of_their_layer():
    """Engines that fuse a layer's experts look up ``model.layers.L.block_sparse_moe.experts``."""
    specs, routers = mixtral_specs(QuantSpec(4, 128), lambda layer, e, w: QuantSpec(2 if layer == 1 else 3, 64))
    config = quantization_config(specs, "0", "r", 0.01, True, False, routers)
    assert config["bits"] == 3
    assert resolve(config, "model.layers.1.block_sparse_moe.experts") == (2, 64)
    assert resolve(config, "model.layers.0.block_sparse_moe.experts") == (3, 64)
    assert resolve(config, "model.layers.1.self_attn.qkv_proj") == (4, 128)
    for name, spec in specs.items():
        assert resolve(config, name) == (spec.bits, spec.group_size), name
