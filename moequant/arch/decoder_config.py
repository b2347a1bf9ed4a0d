"""Fields every decoder family's ``config.json`` shares (heads, rotary settings, window), read and checked."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from moequant.arch import fields
from moequant.errors import MoequantError


def transformers_config(raw: Mapping, model_type: str):
    """transformers' config object of ``model_type`` for ``raw``, or a one-line refusal of what it refuses
    (a float field given as an integer, rope settings a rope type does not take, ...): a checkpoint with
    such a config could not be loaded."""
    from transformers import CONFIG_MAPPING

    fields_only = {k: v for k, v in raw.items() if k not in ("quantization_config", "architectures")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return CONFIG_MAPPING[model_type].from_dict(fields_only)
        except Exception as exc:
            text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            reason = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__
            raise MoequantError(f"transformers refuses config.json: {reason}") from exc


def heads(raw: Mapping) -> tuple[int, int]:
    """``(num_attention_heads, num_key_value_heads)``; query heads must split evenly over key/value heads."""
    heads = fields.integer(raw, "num_attention_heads")
    kv_heads = fields.integer(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise MoequantError(f"config.json field num_attention_heads is {heads}, not a multiple of "
                            f"num_key_value_heads {kv_heads}; each key/value head must serve a whole number of "
                            "query heads")
    return heads, kv_heads


def head_dim(raw: Mapping, hidden: int, heads: int) -> int:
    """``head_dim`` as given, else ``hidden_size // num_attention_heads``; rotary embeddings need it even."""
    if raw.get("head_dim") is not None:
        head_dim = fields.integer(raw, "head_dim")
    elif hidden < heads:
        raise MoequantError(f"config.json field hidden_size is {hidden}, fewer than the {heads} of "
                            "num_attention_heads, which leaves heads of no width; give head_dim")
    else:
        head_dim = hidden // heads
    if head_dim % 2:
        raise MoequantError(f"config.json gives heads of width {head_dim} (head_dim, or hidden_size / "
                            "num_attention_heads); rotary embeddings need an even width")
    return head_dim


def sliding_window(raw: Mapping) -> int | None:
    """The attention window in tokens, or None (null or absent) for full causal attention."""
    value = raw.get("sliding_window")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fields.refusal("sliding_window", value, "a positive number of tokens, or null for full attention")
    return value


def rope(raw: Mapping) -> tuple[float, str]:
    """``(rope_theta, rope_type)`` from ``rope_parameters``, or from top-level ``rope_theta`` and ``rope_scaling``."""
    params = fields.mapping(raw, "rope_parameters")
    scaling = fields.mapping(raw, "rope_scaling")
    if params.get("rope_theta") is not None:
        theta = fields.positive_number(params, "rope_theta", label="rope_parameters.rope_theta")
    else:
        theta = fields.positive_number(raw, "rope_theta", 1e6)
    rope_type = (fields.text(params, "rope_type", "", True, label="rope_parameters.rope_type")
                 or fields.text(scaling, "rope_type", "", True, label="rope_scaling.rope_type")
                 or fields.text(scaling, "type", "", True, label="rope_scaling.type") or "default")
    return theta, rope_type
