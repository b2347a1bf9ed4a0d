"""Mixtral: its config and on-disk names; the maths is :class:`~moequant.arch.sparse_moe.SparseMoEAdapter`'s."""

from __future__ import annotations

from collections.abc import Mapping

from moequant.arch import decoder_config, fields
from moequant.arch.base import MoEConfig
from moequant.arch.sparse_moe import SparseMoEAdapter
from moequant.errors import MoequantError


def parse_mixtral_config(raw: Mapping) -> MoEConfig:
    """The numbers of a Mixtral ``config.json`` (top-level ``rope_theta`` or ``rope_parameters``), checked.

    Raises:
        MoequantError: one line naming the first field that is missing, null where a value is needed,
            of the wrong type, out of range, or inconsistent with another field.
    """
    hidden = fields.integer(raw, "hidden_size")
    heads, kv_heads = decoder_config.heads(raw)
    experts = fields.integer(raw, "num_local_experts")
    top_k = fields.integer(raw, "num_experts_per_tok")
    if top_k > experts:
        raise MoequantError(f"config.json field num_experts_per_tok is {top_k}, more than the {experts} experts of "
                            "num_local_experts; it must be between 1 and num_local_experts")
    act = fields.text(raw, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise MoequantError(f"config.json field hidden_act is {act!r}; Mixtral experts compute silu, so it must be "
                            "'silu'")
    theta, rope_type = decoder_config.rope(raw)
    config = MoEConfig(
        model_type=fields.text(raw, "model_type", "mixtral", nullable=True),
        hidden_size=hidden,
        intermediate_size=fields.integer(raw, "intermediate_size"),
        num_layers=fields.integer(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=decoder_config.head_dim(raw, hidden, heads),
        num_experts=experts,
        top_k=top_k,
        rms_norm_eps=fields.positive_number(raw, "rms_norm_eps", 1e-5),
        vocab_size=fields.integer(raw, "vocab_size"),
        max_position_embeddings=fields.integer(raw, "max_position_embeddings", 4096),
        sliding_window=decoder_config.sliding_window(raw),
        rope_theta=theta,
        rope_type=rope_type,
        tie_word_embeddings=fields.flag(raw, "tie_word_embeddings", False),
    )
    decoder_config.transformers_config(raw, "mixtral")
    return config


class MixtralAdapter(SparseMoEAdapter):
    """``MixtralForCausalLM``: experts ``block_sparse_moe.experts.N.w1/w2/w3``, router ``block_sparse_moe.gate``."""

    family = "mixtral"
    model_type = "mixtral"
    architectures = ("MixtralForCausalLM",)
    moe_block = "block_sparse_moe"
    expert_roles = {"w1": "w1", "w3": "w3", "w2": "w2"}

    def __init__(self, raw_config: Mapping) -> None:
        super().__init__(raw_config, parse_mixtral_config(raw_config))

    def size_fields(self) -> dict[str, str]:
        return {"experts": "num_local_experts", "expert": "intermediate_size"}
