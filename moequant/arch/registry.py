"""Choosing the adapter for a checkpoint's ``config.json``."""

from __future__ import annotations

from collections.abc import Mapping

from moequant.arch import fields
from moequant.arch.base import Architecture, TensorView
from moequant.arch.deepseek import DeepseekV3Adapter, Glm4MoeAdapter
from moequant.arch.mixtral import MixtralAdapter
from moequant.arch.qwen_moe import OlmoeAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter
from moequant.errors import MoequantError

ADAPTERS: dict[str, type[Architecture]] = {"mixtral": MixtralAdapter, "qwen3_moe": Qwen3MoeAdapter,
                                           "qwen2_moe": Qwen2MoeAdapter, "olmoe": OlmoeAdapter,
                                           "deepseek_v3": DeepseekV3Adapter, "glm4_moe": Glm4MoeAdapter}
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def adapter_for(config: Mapping) -> Architecture:
    """The adapter for ``config``, or a one-line refusal that says what is supported."""
    model_type = fields.text(config, "model_type", "", nullable=True).lower()
    archs = _architectures(config)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type](config)
    for cls in ADAPTERS.values():
        if any(a in cls.architectures for a in archs):
            return cls(config)
    label = model_type or (archs[0] if archs else "unknown")
    if not any(config.get(k) for k in _EXPERT_KEYS):
        raise MoequantError(
            f"model type {label!r} is a dense model without experts; moequant compresses Mixture-of-Experts "
            f"models ({', '.join(sorted(ADAPTERS))})"
        )
    raise MoequantError(f"MoE model type {label!r} is not supported yet; supported: {', '.join(sorted(ADAPTERS))}")


def _architectures(config: Mapping) -> list[str]:
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise fields.refusal("architectures", archs, 'a list of class names, e.g. ["MixtralForCausalLM"]')
    return archs


def canonical_views(config: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorView]:
    """Canonical per-module names over tensors stored fused or under other names, for the adapter of
    ``config`` (none if unsupported)."""
    try:
        adapter = adapter_for(config)
    except MoequantError:
        return {}
    return adapter.canonical_views(shapes)
