"""Qwen3-MoE, Qwen2-MoE and OLMoE: their configs and names; the maths is
:class:`~moequant.arch.sparse_moe.SparseMoEAdapter`'s.

Each config is read through transformers' own config class, so that the values transformers
derives (head width, which layers are dense, sliding windows per layer, rotary settings) are the
ones the layer forward uses.
"""

from __future__ import annotations

from collections.abc import Mapping

from moequant.arch import decoder_config, fields
from moequant.arch.base import MoEConfig
from moequant.arch.sparse_moe import SparseMoEAdapter
from moequant.errors import MoequantError


def _common(raw: Mapping, hf, family: str, expert_width: int) -> dict:
    """The fields all three families share, from transformers' config object ``hf``."""
    hidden = fields.integer(raw, "hidden_size")
    heads, kv_heads = decoder_config.heads(raw)
    key = "num_experts" if "num_experts" in raw else "num_local_experts"  # transformers 5 saves the latter
    experts = fields.integer(raw, key)
    top_k = fields.integer(raw, "num_experts_per_tok")
    if not 1 <= top_k <= experts:
        raise MoequantError(f"config.json field num_experts_per_tok is {top_k}; it must be between 1 and the "
                            f"{experts} experts of {key}")
    act = fields.text(raw, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise MoequantError(f"config.json field hidden_act is {act!r}; {family} experts compute silu")
    head_dim = getattr(hf, "head_dim", None) or hidden // heads
    if head_dim % 2:
        raise MoequantError(f"config.json gives heads of width {head_dim}; rotary embeddings need an even width")
    rope = getattr(hf, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise MoequantError("config.json gives no rope_theta (in rope_parameters or at the top level)")
    return dict(
        model_type=hf.model_type, hidden_size=hidden, intermediate_size=expert_width,
        num_layers=fields.integer(raw, "num_hidden_layers"), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=int(head_dim), num_experts=experts, top_k=top_k, rms_norm_eps=float(hf.rms_norm_eps),
        vocab_size=fields.integer(raw, "vocab_size"), max_position_embeddings=int(hf.max_position_embeddings),
        rope_theta=float(theta), rope_type=str(rope.get("rope_type") or "default"),
        tie_word_embeddings=bool(hf.tie_word_embeddings), norm_topk_prob=bool(hf.norm_topk_prob),
    )


def _qwen(raw: Mapping, hf, family: str) -> dict:
    """The Qwen-MoE fields: experts of ``moe_intermediate_size``, and the layers whose MLP is dense by
    transformers' rule (``mlp_only_layers``, ``decoder_sparse_step``), of ``intermediate_size``."""
    base = _common(raw, hf, family, fields.integer(raw, "moe_intermediate_size"))
    only = set(getattr(hf, "mlp_only_layers", None) or [])
    step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
    dense = frozenset(i for i in range(base["num_layers"]) if i in only or hf.num_experts == 0 or (i + 1) % step)
    return {**base, "dense_layers": dense,
            "dense_intermediate_size": fields.integer(raw, "intermediate_size") if dense else 0}


class Qwen3MoeAdapter(SparseMoEAdapter):
    """``Qwen3MoeForCausalLM``: per-head q/k norms, experts ``mlp.experts.N.gate_proj/up_proj/down_proj``,
    router ``mlp.gate``, dense MLP layers by ``mlp_only_layers`` and ``decoder_sparse_step``."""

    family = "qwen3_moe"
    model_type = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)

    def __init__(self, raw_config: Mapping) -> None:
        hf = decoder_config.transformers_config(raw_config, self.model_type)
        config = MoEConfig(**_qwen(raw_config, hf, "Qwen3-MoE"), sliding_window=hf.sliding_window, qk_norm="head",
                           qkv_bias=bool(hf.attention_bias), o_bias=bool(hf.attention_bias))
        super().__init__(raw_config, config, hf)


class Qwen2MoeAdapter(SparseMoEAdapter):
    """``Qwen2MoeForCausalLM``: q/k/v biases, a shared expert with a sigmoid gate beside the routed ones,
    sliding windows per layer (``layer_types``), dense MLP layers as Qwen3-MoE."""

    family = "qwen2_moe"
    model_type = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)

    def __init__(self, raw_config: Mapping) -> None:
        hf = decoder_config.transformers_config(raw_config, self.model_type)
        config = MoEConfig(**_qwen(raw_config, hf, "Qwen2-MoE"), sliding_window=None, qkv_bias=bool(hf.qkv_bias),
                           shared_expert_size=int(hf.shared_expert_intermediate_size or 0), shared_expert_gate=True)
        super().__init__(raw_config, config, hf)

    def sliding_window(self, layer: int) -> int | None:
        types = getattr(self.hf_config, "layer_types", None) or []
        if layer < len(types) and types[layer] == "sliding_attention":
            return self.hf_config.sliding_window
        return None


class OlmoeAdapter(SparseMoEAdapter):
    """``OlmoeForCausalLM``: q/k norms over the whole projections, optional ``clip_qkv``, no top-k
    renormalisation by default, experts ``mlp.experts.N.gate_proj/up_proj/down_proj``."""

    family = "olmoe"
    model_type = "olmoe"
    architectures = ("OlmoeForCausalLM",)

    def __init__(self, raw_config: Mapping) -> None:
        hf = decoder_config.transformers_config(raw_config, self.model_type)
        base = _common(raw_config, hf, "OLMoE", fields.integer(raw_config, "intermediate_size"))
        clip = getattr(hf, "clip_qkv", None)
        config = MoEConfig(**base, sliding_window=None, qk_norm="proj", qkv_bias=bool(hf.attention_bias),
                           o_bias=bool(hf.attention_bias), clip_qkv=None if clip is None else float(clip))
        super().__init__(raw_config, config, hf)

    def size_fields(self) -> dict[str, str]:
        return {"experts": "num_experts", "expert": "intermediate_size"}
