"""Estimated sizes of whole models under a recipe."""

from __future__ import annotations

from moequant.arch.registry import adapter_for
from moequant.packed.shapes import stored_bits
from moequant.recipe import Recipe

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "tie_word_embeddings": False, "norm_topk_prob": True,
}
QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
    "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
    "num_experts_per_tok": 4, "vocab_size": 151936, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
    "rope_theta": 1e6, "tie_word_embeddings": False,
}
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
    "num_experts_per_tok": 8, "vocab_size": 50304, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False,
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5,
    "vocab_size": 129280, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
GLM45_AIR = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": 4096,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 46, "num_attention_heads": 96,
    "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 128, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "attention_bias": True,
    "routed_scaling_factor": 1.0, "vocab_size": 151552, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "partial_rotary_factor": 0.5, "tie_word_embeddings": False,
}
MODELS = {"mixtral-8x7b": MIXTRAL_8X7B, "qwen3-30b-a3b": QWEN3_30B_A3B, "qwen1.5-moe-a2.7b": QWEN15_MOE_A27B,
          "olmoe-1b-7b": OLMOE_1B_7B, "deepseek-v3": DEEPSEEK_V3, "glm-4.5-air": GLM45_AIR}
"""Published shapes, for size estimates without a checkpoint at hand (``moequant recipes --model``)."""


def estimate_bits(recipe: Recipe, config: dict) -> dict:
    """Estimated size of ``config``'s model under ``recipe`` (16-bit for whatever stays unquantised).

    Returns bits per weight overall, bytes, a short description of attention and expert bits, and the
    device bytes with the experts offloaded and the top-k of every layer cached (``offloaded_bytes``).
    """
    adapter = adapter_for(config)
    c = adapter.config
    total_bits = 0
    expert_bits = 0
    params = 0
    seen: dict[str, set[int]] = {"attention": set(), "expert": set()}
    for layer in range(c.num_layers):
        for info in adapter.layer_linears(layer):
            spec = recipe.spec_for(info)
            params += info.numel
            if spec is None or info.kind == "router":
                total_bits += 16 * info.numel
                seen.setdefault(info.kind, set()).add(16)
            else:
                bits = stored_bits(info.out_features, info.in_features, spec.bits, spec.group_size)
                total_bits += bits
                expert_bits += bits if info.kind == "expert" else 0
                seen.setdefault(info.kind, set()).add(spec.bits)
        vectors = sum(size for size, _ in adapter.layer_vectors(layer).values())
        params += vectors
        total_bits += 16 * vectors
    for info in adapter.global_linears():
        spec = recipe.spec_for(info)
        params += info.numel
        total_bits += 16 * info.numel if spec is None or info.kind == "embedding" else stored_bits(
            info.out_features, info.in_features, spec.bits, spec.group_size)
    params += c.hidden_size
    total_bits += 16 * c.hidden_size

    def describe(bits: set[int]) -> str:
        return "/".join(f"{b}-bit" for b in sorted(bits)) or "-"

    cached = expert_bits / max(c.num_experts, 1) * c.top_k  # top-k experts of every MoE layer
    return {"bits_per_weight": total_bits / params, "bytes": total_bits / 8, "parameters": params,
            "attention": describe(seen["attention"]), "expert": describe(seen["expert"]),
            "offloaded_bytes": (total_bits - expert_bits + cached) / 8}
