"""DeepSeek-V3 (and Kimi-K2, Moonlight), and GLM-4.5, which routes as it does: sigmoid group-limited routing.

Attention (MLA): ``q = q_b(q_a_layernorm(q_a(h)))`` (or ``q_proj(h)`` where ``q_lora_rank`` is
null) split per head into a part without and a part with rotary embedding;
``kv_a_proj_with_mqa(h)`` gives a latent of ``kv_lora_rank`` (normed, then ``kv_b_proj`` expands
it into each head's key part and value) and one rotary key part shared by all heads. Routing:
sigmoid scores; ``e_score_correction_bias`` is added for the choice only; the experts are chosen
within the ``topk_group`` best of ``n_group`` groups (a group scored by its two best experts); the
chosen scores, renormalised where ``norm_topk_prob``, are scaled by ``routed_scaling_factor``.
Shared experts (``mlp.shared_experts``) see every token; the first ``first_k_dense_replace``
layers are dense. All of it as transformers computes it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from moequant.arch import decoder_config, fields
from moequant.arch.base import LayerObserver, LinearInfo, MoEConfig, WeightGetter
from moequant.arch.sparse_moe import HF_ROLE, LayerWeights, SparseMoEAdapter, _apply_rope
from moequant.errors import MoequantError

_LATENT_EPS = 1e-6  # transformers builds q_a_layernorm and kv_a_layernorm with its default eps


class GroupRouted(SparseMoEAdapter):
    """What DeepSeek-V3 and GLM-4.5 share: sigmoid group-limited routing with a correction bias beside
    each router, ``mlp.shared_experts``, dense first layers and multi-token-prediction layers past the model."""

    def _group_routing(self, raw: Mapping, hf) -> tuple[int, int, int, frozenset[int]]:
        """``(experts, top_k, layers, dense layers)``, with the group settings checked and kept."""
        key = "n_routed_experts" if "n_routed_experts" in raw else "num_local_experts"
        experts, top_k = fields.integer(raw, key), fields.integer(raw, "num_experts_per_tok")
        layers = fields.integer(raw, "num_hidden_layers")
        self.n_group, self.topk_group = int(hf.n_group or 1), int(hf.topk_group or 1)
        if experts % self.n_group or not 1 <= self.topk_group <= self.n_group or top_k > experts:
            raise MoequantError(f"config.json gives {experts} experts of {key} in n_group {self.n_group} groups, "
                                f"topk_group {self.topk_group}, num_experts_per_tok {top_k}: the groups must "
                                "split the experts evenly, and topk_group and top-k fit within them")
        self.routed_scaling = float(hf.routed_scaling_factor)
        self.extra_layers = int(raw.get("num_nextn_predict_layers") or 0)
        return experts, top_k, layers, frozenset(range(min(int(hf.first_k_dense_replace or 0), layers)))

    def shared_name(self, layer: int, role: str) -> str:
        return f"model.layers.{layer}.mlp.shared_experts.{HF_ROLE[role]}"

    def layer_vectors(self, layer: int) -> dict[str, tuple[int, str]]:
        out = super().layer_vectors(layer)
        if self.is_moe_layer(layer):
            out[self.router_name(layer) + ".e_score_correction_bias"] = (self.config.num_experts, "n_routed_experts")
        return out

    def read_layer(self, get: WeightGetter, layer: int) -> LayerWeights:
        w = super().read_layer(get, layer)
        if self.is_moe_layer(layer):
            w.extra["e_bias"] = get(self.router_name(layer) + ".e_score_correction_bias")
        return w

    def route(self, h: torch.Tensor, w: LayerWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sigmoid_group_route(h, w, self.config, self.n_group, self.topk_group, self.routed_scaling)


class DeepseekV3Adapter(GroupRouted):
    """``DeepseekV3ForCausalLM``: MLA attention, sigmoid group-limited routing, shared experts, dense first layers."""

    family = "deepseek_v3"
    model_type = "deepseek_v3"
    architectures = ("DeepseekV3ForCausalLM",)

    def __init__(self, raw_config: Mapping) -> None:
        from transformers.modeling_rope_utils import yarn_apply_mscale

        hf = decoder_config.transformers_config(raw_config, self.model_type)
        hidden = fields.integer(raw_config, "hidden_size")
        heads = fields.integer(raw_config, "num_attention_heads")
        experts, top_k, layers, dense = self._group_routing(raw_config, hf)
        self.q_lora, self.kv_lora = hf.q_lora_rank, int(hf.kv_lora_rank)
        self.nope, self.rope_dim, self.v_dim = int(hf.qk_nope_head_dim), int(hf.qk_rope_head_dim), int(hf.v_head_dim)
        self.rope_interleave = bool(hf.rope_interleave)
        self.scaling = float(yarn_apply_mscale(hf.rope_parameters, (self.nope + self.rope_dim) ** -0.5))
        rope = hf.rope_parameters or {}
        moe_inter = fields.integer(raw_config, "moe_intermediate_size")
        config = MoEConfig(
            model_type=self.model_type, hidden_size=hidden, intermediate_size=moe_inter, num_layers=layers,
            num_heads=heads, num_kv_heads=heads, head_dim=self.rope_dim, num_experts=experts, top_k=top_k,
            rms_norm_eps=float(hf.rms_norm_eps), vocab_size=fields.integer(raw_config, "vocab_size"),
            max_position_embeddings=int(hf.max_position_embeddings), sliding_window=None,
            rope_theta=float(rope.get("rope_theta", 10000.0)), rope_type=str(rope.get("rope_type") or "default"),
            tie_word_embeddings=bool(hf.tie_word_embeddings), norm_topk_prob=bool(hf.norm_topk_prob),
            o_bias=bool(hf.attention_bias), dense_layers=dense,
            dense_intermediate_size=fields.integer(raw_config, "intermediate_size") if dense else 0,
            shared_expert_size=moe_inter * int(hf.n_shared_experts or 0),
        )
        super().__init__(raw_config, config, hf)

    # -- names and shapes -------------------------------------------------------------------
    def attention_name(self, layer: int, role: str) -> str:
        suffix = {"kv_a": "kv_a_proj_with_mqa"}.get(role, f"{role}_proj")
        return f"model.layers.{layer}.self_attn.{suffix}"

    def attention_roles(self) -> list[str]:
        return (["q_a", "q_b"] if self.q_lora else ["q"]) + ["kv_a", "kv_b", "o"]

    def layer_linears(self, layer: int) -> list[LinearInfo]:
        c, h = self.config, self.config.hidden_size
        qk = c.num_heads * (self.nope + self.rope_dim)
        shapes = {"q": (qk, h), "q_a": (self.q_lora, h), "q_b": (qk, self.q_lora),
                  "kv_a": (self.kv_lora + self.rope_dim, h), "kv_b": (c.num_heads * (self.nope + self.v_dim), self.kv_lora),
                  "o": (h, c.num_heads * self.v_dim)}
        attention = [LinearInfo(self.attention_name(layer, r), "attention", r, *shapes[r], layer=layer)
                     for r in self.attention_roles()]
        return attention + [i for i in super().layer_linears(layer) if i.kind != "attention"]

    def layer_vectors(self, layer: int) -> dict[str, tuple[int, str]]:
        """The shared vectors (norms, ``o_proj.bias``, the correction bias) and MLA's latent norms and biases."""
        out = super().layer_vectors(layer)
        attn = f"model.layers.{layer}.self_attn."
        out[attn + "kv_a_layernorm.weight"] = (self.kv_lora, "kv_lora_rank")
        if self.q_lora:
            out[attn + "q_a_layernorm.weight"] = (self.q_lora, "q_lora_rank")
        if self.config.o_bias:  # attention_bias: on the projections of the hidden state and o_proj
            out[attn + "kv_a_proj_with_mqa.bias"] = (self.kv_lora + self.rope_dim, "kv_lora_rank + qk_rope_head_dim")
            if self.q_lora:
                out[attn + "q_a_proj.bias"] = (self.q_lora, "q_lora_rank")
        return out

    def size_fields(self) -> dict[str, str | tuple[str, str]]:
        heads = "num_attention_heads x "
        return {"experts": "n_routed_experts", "expert": "moe_intermediate_size", "dense_mlp": "intermediate_size",
                "shared_expert": "moe_intermediate_size x n_shared_experts",
                "q": (heads + "(qk_nope_head_dim + qk_rope_head_dim)", "hidden_size"),
                "q_a": ("q_lora_rank", "hidden_size"), "q_b": (heads + "(qk_nope_head_dim + qk_rope_head_dim)",
                                                                 "q_lora_rank"),
                "kv_a": ("kv_lora_rank + qk_rope_head_dim", "hidden_size"),
                "kv_b": (heads + "(qk_nope_head_dim + v_head_dim)", "kv_lora_rank"),
                "o": ("hidden_size", heads + "v_head_dim")}

    # -- maths ------------------------------------------------------------------------------
    def read_attention(self, get: WeightGetter, layer: int, w: LayerWeights) -> None:
        """MLA's weights into ``w.extra`` by role, with its latent norms and, where present, biases."""
        w.extra = {r: get(self.attention_name(layer, r) + ".weight") for r in self.attention_roles()}
        attn = f"model.layers.{layer}.self_attn."
        w.extra["kv_a_norm"] = get(attn + "kv_a_layernorm.weight")
        if self.q_lora:
            w.extra["q_a_norm"] = get(attn + "q_a_layernorm.weight")
        if self.config.o_bias:
            w.bias = {r: get(self.attention_name(layer, r) + ".bias") for r in ("kv_a", "o")}
            if self.q_lora:
                w.bias["q_a"] = get(self.attention_name(layer, "q_a") + ".bias")

    def _q_input(self, h: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        """The input of ``q_b_proj``: ``q_a_layernorm(q_a_proj(h))``."""
        return self.norm(F.linear(h, w.extra["q_a"], w.bias.get("q_a")), w.extra["q_a_norm"], _LATENT_EPS)

    def _kv(self, h: torch.Tensor, w: LayerWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """The normed latent ``[b, T, kv_lora_rank]`` (the input of ``kv_b_proj``) and the shared rotary key part."""
        kv = F.linear(h, w.extra["kv_a"], w.bias.get("kv_a"))
        latent, k_rot = torch.split(kv, [self.kv_lora, self.rope_dim], dim=-1)
        return self.norm(latent, w.extra["kv_a_norm"], _LATENT_EPS), k_rot

    def attention(self, h: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor,
                  window: int | None = None) -> torch.Tensor:
        """Multi-head latent attention of ``h [b, T, H]`` up to (not including) ``o_proj``: ``[b, T, nh*v]``."""
        c = self.config
        b, t, _ = h.shape
        q = F.linear(self._q_input(h, w), w.extra["q_b"]) if self.q_lora else F.linear(h, w.extra["q"])
        q = q.view(b, t, c.num_heads, self.nope + self.rope_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [self.nope, self.rope_dim], dim=-1)
        latent, k_rot = self._kv(h, w)
        k_rot = k_rot.view(b, 1, t, self.rope_dim)
        cos, sin = cos[:t].to(h.dtype), sin[:t].to(h.dtype)
        if self.rope_interleave:
            q_rot, k_rot = _interleaved_rope(q_rot, cos, sin), _interleaved_rope(k_rot, cos, sin)
        else:
            q_rot, k_rot = _apply_rope(q_rot, cos, sin), _apply_rope(k_rot, cos, sin)
        kv = F.linear(latent, w.extra["kv_b"]).view(b, t, c.num_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, c.num_heads, -1, -1)), dim=-1)
        q = torch.cat((q_pass, q_rot), dim=-1)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
        return ctx.transpose(1, 2).reshape(b, t, c.num_heads * self.v_dim)

    def attention_block(self, chunks: tuple[torch.Tensor, ...], layer: int, w: LayerWeights, cos: torch.Tensor,
                        sin: torch.Tensor, obs: LayerObserver) -> None:
        """MLA with its linears settled as their inputs come: q_a (or q) and kv_a from the normed input,
        then q_b, kv_b, and o."""
        e = w.extra
        name = {r: self.attention_name(layer, r) for r in self.attention_roles()}
        first = "q_a" if self.q_lora else "q"

        def normed():
            return (self.norm(xc, w.input_norm) for xc in chunks)

        e[first], e["kv_a"] = obs.shared_input([name[first], name["kv_a"]], [e[first], e["kv_a"]], normed())
        if self.q_lora:
            (e["q_b"],) = obs.shared_input([name["q_b"]], [e["q_b"]], (self._q_input(h, w) for h in normed()))
        (e["kv_b"],) = obs.shared_input([name["kv_b"]], [e["kv_b"]], (self._kv(h, w)[0] for h in normed()))
        if obs.settles_weights:
            ctx = [self.attention(h, w, cos, sin) for h in normed()]
            (e["o"],) = obs.shared_input([name["o"]], [e["o"]], ctx)
            for xc, cc in zip(chunks, ctx, strict=True):
                xc += F.linear(cc, e["o"], w.bias.get("o"))
            del ctx
        else:
            for xc, h in zip(chunks, normed(), strict=True):
                xc += F.linear(self.attention(h, w, cos, sin), e["o"], w.bias.get("o"))

def sigmoid_group_route(h: torch.Tensor, w: LayerWeights, c: MoEConfig, n_group: int, topk_group: int,
                        scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's routing of ``h [T, H]`` (also GLM-4.5's): sigmoid scores ``[T, E]`` (float32), the
    top-k chosen within the ``topk_group`` best of ``n_group`` groups with the correction bias
    ``w.extra["e_bias"]``, weighted by their scores (renormalised where ``norm_topk_prob``) times ``scaling``."""
    scores = F.linear(h.float(), w.gate.float()).sigmoid()
    choice = scores + w.extra["e_bias"].float()
    per_group = c.num_experts // n_group
    group_scores = choice.view(-1, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    best = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores).scatter_(1, best, 1).bool()
    choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
    top_ids = torch.topk(choice, k=c.top_k, dim=-1, sorted=False)[1]
    top_w = scores.gather(1, top_ids)
    if c.norm_topk_prob:
        top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, top_ids, top_w * scaling


def _interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over interleaved pairs ``(x0, x1), (x2, x3), ...``, the output de-interleaved."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Glm4MoeAdapter(GroupRouted):
    """``Glm4MoeForCausalLM`` (GLM-4.5/4.6): grouped-query attention with q/k/v biases, optional per-head q/k
    norms and a partial rotary part (``partial_rotary_factor``); DeepSeek-V3's routing, shared experts and
    dense first layers."""

    family = "glm4_moe"
    model_type = "glm4_moe"
    architectures = ("Glm4MoeForCausalLM",)

    def __init__(self, raw_config: Mapping) -> None:
        hf = decoder_config.transformers_config(raw_config, self.model_type)
        hidden = fields.integer(raw_config, "hidden_size")
        heads, kv_heads = decoder_config.heads(raw_config)
        experts, top_k, layers, dense = self._group_routing(raw_config, hf)
        head_dim = int(getattr(hf, "head_dim", None) or hidden // heads)
        rope = hf.rope_parameters or {}
        rotary_dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
        moe_inter = fields.integer(raw_config, "moe_intermediate_size")
        config = MoEConfig(
            model_type=self.model_type, hidden_size=hidden, intermediate_size=moe_inter, num_layers=layers,
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, num_experts=experts, top_k=top_k,
            rms_norm_eps=float(hf.rms_norm_eps), vocab_size=fields.integer(raw_config, "vocab_size"),
            max_position_embeddings=int(hf.max_position_embeddings), sliding_window=None,
            rope_theta=float(rope.get("rope_theta", 10000.0)), rope_type=str(rope.get("rope_type") or "default"),
            tie_word_embeddings=bool(hf.tie_word_embeddings), norm_topk_prob=bool(hf.norm_topk_prob),
            qk_norm="head" if hf.use_qk_norm else None, qkv_bias=bool(hf.attention_bias), dense_layers=dense,
            dense_intermediate_size=fields.integer(raw_config, "intermediate_size") if dense else 0,
            shared_expert_size=moe_inter * int(hf.n_shared_experts or 0), rotary_dim=rotary_dim,
        )
        super().__init__(raw_config, config, hf)

    def size_fields(self) -> dict[str, str]:
        return {"experts": "n_routed_experts", "expert": "moe_intermediate_size", "dense_mlp": "intermediate_size",
                "shared_expert": "moe_intermediate_size x n_shared_experts"}
