"""Sparse-MoE decoders with softmax top-k routing over gated-MLP experts: names, maths and the one layer forward.

Mixtral, Qwen3-MoE, Qwen2-MoE and OLMoE are this one design with different names and a few
optional parts (q/k norms, q/k/v biases, a shared expert, dense MLP layers among the MoE ones);
each family's adapter sets them from its config. The forward is written out in plain torch
(RMSNorm, rotary embeddings, grouped-query attention with an optional sliding window, routing,
gated-MLP experts), one layer at a time, so that compression can see the inputs of every linear
and settle its quantised weights between steps, and evaluation can stream a model larger than
memory. All maths runs in the dtype of its inputs, as transformers computes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moequant.arch.base import (
    Chunking,
    ExpertWeights,
    LayerObserver,
    LinearInfo,
    MoEConfig,
    TensorView,
    WeightGetter,
)
from moequant.errors import MoequantError

ATTN_ROLES = ("q", "k", "v", "o")
_Q = "num_attention_heads x head_dim"
_KV = "num_key_value_heads x head_dim"
MLP_ROLES = ("w1", "w3", "w2")
HF_ROLE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
ROLE_OF_HF = {v: k for k, v in HF_ROLE.items()}


@dataclass
class LayerWeights:
    """The float weights of one decoder layer but its routed experts, keyed by role (``None``: absent;
    ``extra``: a family's own tensors by role)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    o: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    mlp: ExpertWeights | None = None
    shared_gate: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class SparseMoEAdapter:
    """Names and maths shared by the softmax-routed gated-MLP MoE families.

    A family sets ``family``, ``model_type``, ``architectures``, ``moe_block`` (the module that holds
    the router and experts: ``block_sparse_moe`` or ``mlp``), ``expert_roles`` (the on-disk name of
    each expert role ``w1`` gate, ``w3`` up, ``w2`` down) and ``layouts``, and parses its config.
    """

    family = ""
    model_type = ""
    architectures: tuple[str, ...] = ()
    moe_block = "mlp"
    expert_roles: Mapping[str, str] = HF_ROLE
    layouts: tuple[str, ...] = ("vllm", "gptqmodel")
    extra_layers = 0

    def __init__(self, raw_config: Mapping, config: MoEConfig, hf_config=None) -> None:
        self.raw_config = raw_config
        self.config = config
        self._hf_config = hf_config
        self._inv_freq: torch.Tensor | None = None
        self._attention_scaling = 1.0

    @property
    def hf_config(self):
        """transformers' config object of this checkpoint."""
        if self._hf_config is None:
            from moequant.arch.decoder_config import transformers_config

            self._hf_config = transformers_config(self.raw_config, self.model_type)
        return self._hf_config

    # -- names ---------------------------------------------------------------------------
    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def attention_name(self, layer: int, role: str) -> str:
        return f"model.layers.{layer}.self_attn.{role}_proj"

    def expert_name(self, layer: int, expert: int, role: str) -> str:
        return f"model.layers.{layer}.{self.moe_block}.experts.{expert}.{self.expert_roles[role]}"

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_block}.gate"

    def dense_name(self, layer: int, role: str) -> str:
        """A dense MLP layer's linear (``mlp.gate_proj`` ...)."""
        return f"model.layers.{layer}.mlp.{HF_ROLE[role]}"

    def shared_name(self, layer: int, role: str) -> str:
        """The shared expert's linear (``mlp.shared_expert.gate_proj`` ...)."""
        return f"model.layers.{layer}.mlp.shared_expert.{HF_ROLE[role]}"

    def shared_gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate"

    def norm_names(self, layer: int) -> tuple[str, str]:
        p = self.layer_prefix(layer)
        return p + "input_layernorm.weight", p + "post_attention_layernorm.weight"

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.config.dense_layers

    def canonical_views(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, TensorView]:
        """The canonical per-module names over tensors stored under other names (see :meth:`canonical_name`)
        and over experts stored fused, as transformers writes them with ``save_original_format=False``:
        ``experts.gate_up_proj [E, 2I, H]`` (each expert's gate rows, then its up rows) and
        ``experts.down_proj [E, H, I]``.

        ``shapes`` maps the checkpoint's tensor names to their shapes; the result maps the canonical
        names that are missing to where they lie.
        """
        c = self.config
        n, inter, hidden = c.num_experts, c.intermediate_size, c.hidden_size
        views: dict[str, TensorView] = {}

        def add(name: str, source: str, offset: int, shape: tuple[int, ...]) -> None:
            if name not in shapes:
                views[name] = TensorView(source, offset, shape)

        for name, shape in shapes.items():
            if (canonical := self.canonical_name(name)) != name:
                add(canonical, name, 0, tuple(shape))
        for layer in range(c.num_layers):
            base = f"model.layers.{layer}."
            for block in dict.fromkeys(("mlp", self.moe_block)):
                gate_up, down = base + block + ".experts.gate_up_proj", base + block + ".experts.down_proj"
                if gate_up in shapes:
                    _check_fused(gate_up, shapes[gate_up], (n, 2 * inter, hidden))
                    for e in range(n):
                        add(self.expert_name(layer, e, "w1") + ".weight", gate_up, 2 * e * inter * hidden,
                            (inter, hidden))
                        add(self.expert_name(layer, e, "w3") + ".weight", gate_up, (2 * e + 1) * inter * hidden,
                            (inter, hidden))
                if down in shapes:
                    _check_fused(down, shapes[down], (n, hidden, inter))
                    for e in range(n):
                        add(self.expert_name(layer, e, "w2") + ".weight", down, e * hidden * inter, (hidden, inter))
        return views

    def disk_name(self, name: str, layout: str) -> str:
        """The name under which ``layout`` stores the tensor or module canonically named ``name``
        (``vllm``: the family's published names; ``gptqmodel``: transformers' module names)."""
        if layout == "vllm" or (self.moe_block == "mlp" and self.expert_roles == HF_ROLE):
            return name
        pattern = re.compile(rf"^(model\.layers\.\d+\.){self.moe_block}\.(experts\.(\d+)\.(\w+)|gate)(\.|$)")
        role_of = {v: k for k, v in self.expert_roles.items()}

        def rename(m: re.Match) -> str:
            if m[2] == "gate":
                return f"{m[1]}mlp.gate{m[5]}"
            return f"{m[1]}mlp.experts.{m[3]}.{HF_ROLE[role_of[m[4]]]}{m[5]}"

        return pattern.sub(rename, name)

    def canonical_name(self, name: str) -> str:
        """The canonical name of a tensor or module stored as ``name`` under any layout."""
        if self.moe_block == "mlp" and self.expert_roles == HF_ROLE:
            return name
        m = re.match(r"^(model\.layers\.\d+\.)mlp\.(experts\.(\d+)\.(gate_proj|up_proj|down_proj)|gate)(\.|$)", name)
        if m is None:
            return name
        if m[2] == "gate":
            new = f"{m[1]}{self.moe_block}.gate{m[5]}"
        else:
            new = f"{m[1]}{self.moe_block}.experts.{m[3]}.{self.expert_roles[ROLE_OF_HF[m[4]]]}{m[5]}"
        return new + name[m.end():]

    def layer_linears(self, layer: int) -> list[LinearInfo]:
        c = self.config
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        shapes = {"q": (q_out, c.hidden_size), "k": (kv_out, c.hidden_size), "v": (kv_out, c.hidden_size),
                  "o": (c.hidden_size, q_out)}
        out = [LinearInfo(self.attention_name(layer, r), "attention", r, *shapes[r], layer=layer) for r in ATTN_ROLES]
        if not self.is_moe_layer(layer):
            return out + _mlp_infos(self.dense_name, "dense_mlp", layer, c.dense_intermediate_size, c.hidden_size)
        for e in range(c.num_experts):
            out.append(LinearInfo(self.expert_name(layer, e, "w1"), "expert", "w1", c.intermediate_size,
                                  c.hidden_size, layer, e))
            out.append(LinearInfo(self.expert_name(layer, e, "w2"), "expert", "w2", c.hidden_size,
                                  c.intermediate_size, layer, e))
            out.append(LinearInfo(self.expert_name(layer, e, "w3"), "expert", "w3", c.intermediate_size,
                                  c.hidden_size, layer, e))
        out.append(LinearInfo(self.router_name(layer), "router", "gate", c.num_experts, c.hidden_size, layer))
        if c.shared_expert_size:
            out += _mlp_infos(self.shared_name, "shared_expert", layer, c.shared_expert_size, c.hidden_size)
            if c.shared_expert_gate:
                out.append(LinearInfo(self.shared_gate_name(layer), "router", "shared_gate", 1, c.hidden_size, layer))
        return out

    def global_linears(self) -> list[LinearInfo]:
        c = self.config
        out = [LinearInfo("model.embed_tokens", "embedding", "embed", c.vocab_size, c.hidden_size)]
        if not c.tie_word_embeddings:
            out.append(LinearInfo("lm_head", "lm_head", "lm_head", c.vocab_size, c.hidden_size))
        return out

    @property
    def embed_name(self) -> str:
        return "model.embed_tokens.weight"

    @property
    def final_norm_name(self) -> str:
        return "model.norm.weight"

    @property
    def lm_head_name(self) -> str:
        return self.embed_name if self.config.tie_word_embeddings else "lm_head.weight"

    def layer_vectors(self, layer: int) -> dict[str, tuple[int, str]]:
        """Every 1-D tensor of layer ``layer`` (norms, q/k norms, biases): its size and the config field behind it."""
        c = self.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        out = {name: (c.hidden_size, "hidden_size") for name in self.norm_names(layer)}
        attn = f"model.layers.{layer}.self_attn."
        if c.qk_norm == "head":
            out |= {attn + "q_norm.weight": (c.head_dim, "head_dim"), attn + "k_norm.weight": (c.head_dim, "head_dim")}
        elif c.qk_norm == "proj":
            out |= {attn + "q_norm.weight": (q, _Q), attn + "k_norm.weight": (kv, _KV)}
        if c.qkv_bias:
            out |= {self.attention_name(layer, r) + ".bias": (n, f) for r, n, f in (("q", q, _Q), ("k", kv, _KV),
                                                                                      ("v", kv, _KV))}
        if c.o_bias:
            out[self.attention_name(layer, "o") + ".bias"] = (c.hidden_size, "hidden_size")
        return out

    def size_fields(self) -> dict[str, str]:
        """The config.json field behind each size a linear's shape is made of, for messages."""
        return {"experts": "num_experts", "expert": "moe_intermediate_size", "dense_mlp": "intermediate_size",
                "shared_expert": "shared_expert_intermediate_size"}

    # -- maths ---------------------------------------------------------------------------
    def sliding_window(self, layer: int) -> int | None:
        """The attention window of layer ``layer`` in tokens (``None``: full causal attention)."""
        return self.config.sliding_window

    def rotary(self, seqlen: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` of shape ``[T, rotary_dim or head_dim]`` in float32 for positions ``0..T-1``."""
        if self._inv_freq is None:
            self._inv_freq, self._attention_scaling = self._rope_inv_freq()
        pos = torch.arange(seqlen, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, self._inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self._attention_scaling, emb.sin() * self._attention_scaling

    def _rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        c = self.config
        if c.rope_type == "default":
            dim = c.rotary_dim or c.head_dim
            exponent = torch.arange(0, dim, 2, dtype=torch.float32) / dim
            return 1.0 / (c.rope_theta**exponent), 1.0
        try:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[c.rope_type](self.hf_config, "cpu")
        except Exception as exc:
            raise MoequantError(f"rope type {c.rope_type!r} in config.json is not supported") from exc
        return inv_freq.float(), float(scaling)

    def attention(self, h: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor,
                  window: int | None = None) -> torch.Tensor:
        """Causal grouped-query self-attention up to (not including) ``o_proj``.

        Args:
            h: normed hidden states ``[B, T, H]``.
            w: the layer's weights: ``q [nh*hd, H]``, ``k``, ``v [nkv*hd, H]``, their biases and q/k
                norms where the family has them.
            cos, sin: ``[T, hd]`` from :meth:`rotary`.
            window: the sliding window in tokens, or ``None``.

        Returns:
            ``[B, T, nh*hd]``, the input of ``o_proj``.
        """
        c = self.config
        b, t, _ = h.shape
        q, k, v = (F.linear(h, wt, w.bias.get(r)) for r, wt in (("q", w.q), ("k", w.k), ("v", w.v)))
        if c.qk_norm == "proj":
            q, k = self.norm(q, w.q_norm), self.norm(k, w.k_norm)
        if c.clip_qkv is not None:
            q, k, v = (x.clamp(-c.clip_qkv, c.clip_qkv) for x in (q, k, v))
        q = q.view(b, t, c.num_heads, c.head_dim)
        k = k.view(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "head":
            q, k = self.norm(q, w.q_norm), self.norm(k, w.k_norm)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = cos[:t].to(h.dtype), sin[:t].to(h.dtype)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        rep = c.num_heads // c.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if window is not None and t > window:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=_sliding_causal_mask(t, window, h.device))
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return ctx.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim)

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        """RMSNorm over the last dimension, computed in float32 (``eps``: the config's ``rms_norm_eps``)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + (self.config.rms_norm_eps if eps is None else eps))
        return weight.to(x.dtype) * xf.to(x.dtype)

    def route(self, h: torch.Tensor, w: LayerWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k softmax routing.

        Args:
            h: ``[T, H]`` normed hidden states; w: the layer's weights (the router ``gate [E, H]``).

        Returns:
            ``probs [T, E]`` (float32 softmax over all experts), ``topk_ids [T, k]`` and
            ``topk_weights [T, k]`` (float32; renormalised over the chosen k where the family does).
        """
        logits = F.linear(h, w.gate.to(h.dtype)).float()
        probs = torch.softmax(logits, dim=-1)
        top_w, top_ids = torch.topk(probs, self.config.top_k, dim=-1)
        if self.config.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return probs, top_ids, top_w

    @staticmethod
    def gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """A gated MLP's activation from its gate and up projections' outputs: ``silu(gate) * up``."""
        return F.silu(gate) * up

    def expert_mlp(self, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        """``w2 (silu(w1 x) * w3 x)`` for ``x [t, H]``; returns ``[t, H]``."""
        return F.linear(self.gated(F.linear(x, w.w1), F.linear(x, w.w3)), w.w2)

    def add_experts(self, out: torch.Tensor, h: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor,
                    experts: dict[int, ExpertWeights], rows: int | None = None) -> None:
        """Add the weighted outputs of ``experts`` (by index, in order) for their routed tokens of ``h [T, H]``
        to ``out [T, H]``, ``rows`` tokens at a time (``None``: all of an expert's tokens at once)."""
        for e, w in sorted(experts.items()):
            token, slot = torch.where(top_ids == e)
            step = rows or max(token.numel(), 1)
            for start in range(0, token.numel(), step):
                t, s = token[start : start + step], slot[start : start + step]
                out.index_add_(0, t, self.expert_mlp(h[t], w) * top_w[t, s, None].to(h.dtype))

    def read_layer(self, get: WeightGetter, layer: int) -> LayerWeights:
        """Layer ``layer``'s weights but its routed experts, through ``get``."""
        c = self.config
        in_norm, post_norm = self.norm_names(layer)
        w = LayerWeights(input_norm=get(in_norm), post_norm=get(post_norm))
        self.read_attention(get, layer, w)
        if not self.is_moe_layer(layer):
            w.mlp = ExpertWeights(*(get(self.dense_name(layer, r) + ".weight") for r in MLP_ROLES))
            return w
        w.gate = get(self.router_name(layer) + ".weight")
        if c.shared_expert_size:
            w.mlp = ExpertWeights(*(get(self.shared_name(layer, r) + ".weight") for r in MLP_ROLES))
            if c.shared_expert_gate:
                w.shared_gate = get(self.shared_gate_name(layer) + ".weight")
        return w

    def read_attention(self, get: WeightGetter, layer: int, w: LayerWeights) -> None:
        """Layer ``layer``'s attention weights into ``w``: q/k/v/o, their biases and q/k norms."""
        c = self.config
        w.q, w.k, w.v, w.o = (get(self.attention_name(layer, r) + ".weight") for r in ATTN_ROLES)
        roles = [r for r in ("q", "k", "v") if c.qkv_bias] + (["o"] if c.o_bias else [])
        w.bias = {r: get(self.attention_name(layer, r) + ".bias") for r in roles}
        if c.qk_norm:
            w.q_norm, w.k_norm = (get(f"model.layers.{layer}.self_attn.{r}_norm.weight") for r in ("q", "k"))

    def read_expert(self, get: WeightGetter, layer: int, expert: int) -> ExpertWeights:
        """One expert's matrices through ``get``."""
        return ExpertWeights(*(get(self.expert_name(layer, expert, r) + ".weight") for r in MLP_ROLES))

    def layer_forward(self, x: torch.Tensor, layer: int, get: WeightGetter, cos: torch.Tensor, sin: torch.Tensor,
                      chunking: Chunking, expert_batch: int = 1,
                      observer: LayerObserver | None = None) -> torch.Tensor:
        """Decoder layer ``layer`` applied to ``x [B, T, H]`` in place; returns ``top_ids [B*T, k]``
        (all -1 for a dense layer).

        Attention runs on ``chunking.windows`` windows at a time; a dense layer then applies its
        MLP to every token; an MoE layer routes every token, reads the experts ``expert_batch`` at a
        time and applies them to the tokens routed to them, and adds the shared expert where the
        family has one; the experts' outputs are summed before they join the residual, as
        transformers does. Weights are read through ``get`` as the forward reaches them;
        ``observer`` sees the inputs of each linear and may settle its weights first (see
        :class:`LayerObserver`).
        """
        obs = observer or LayerObserver()
        c = self.config
        w = self.read_layer(get, layer)
        chunks = torch.split(x, chunking.windows)

        obs.stage("attention")
        self.attention_block(chunks, layer, w, cos, sin, obs)

        flat = x.view(-1, c.hidden_size)
        tokens = flat.shape[0]
        rows = chunking.route_rows or tokens
        h = torch.empty_like(flat)
        for start in range(0, tokens, rows):
            h[start:start + rows] = self.norm(flat[start:start + rows], w.post_norm)
        if not self.is_moe_layer(layer):
            obs.stage("mlp")
            flat += self._dense_mlp(h, w.mlp, [self.dense_name(layer, r) for r in MLP_ROLES], rows, obs)
            return torch.full((tokens, c.top_k), -1, dtype=torch.int64, device=x.device)

        obs.stage("routing")
        probs = torch.empty(tokens, c.num_experts, dtype=torch.float32, device=x.device)
        top_ids = torch.empty(tokens, c.top_k, dtype=torch.int64, device=x.device)
        top_w = torch.empty(tokens, c.top_k, dtype=torch.float32, device=x.device)
        for start in range(0, tokens, rows):
            sl = slice(start, start + rows)
            probs[sl], top_ids[sl], top_w[sl] = self.route(h[sl], w)
        obs.routed(h, probs, top_ids, top_w)

        obs.stage("experts")
        routed = torch.bincount(top_ids.flatten(), minlength=c.num_experts).tolist()
        moe_out = torch.zeros_like(flat)
        for first in range(0, c.num_experts, expert_batch):
            group = [e for e in range(first, min(first + expert_batch, c.num_experts))
                     if routed[e] or obs.settles_weights]
            experts = {e: self.read_expert(get, layer, e) for e in group}
            obs.experts(experts)
            self.add_experts(moe_out, h, top_ids, top_w, experts, chunking.expert_rows)
            del experts
        if c.shared_expert_size:
            obs.stage("shared expert")
            shared = self._dense_mlp(h, w.mlp, [self.shared_name(layer, r) for r in MLP_ROLES], rows, obs)
            if w.shared_gate is not None:
                shared *= torch.sigmoid(F.linear(h, w.shared_gate))
            moe_out += shared
        flat += moe_out
        return top_ids

    def attention_block(self, chunks: tuple[torch.Tensor, ...], layer: int, w: LayerWeights, cos: torch.Tensor,
                        sin: torch.Tensor, obs: LayerObserver) -> None:
        """Add the attention's output to each chunk ``[b, T, H]`` of the residual, in place; ``obs`` settles
        q/k/v (one input), then o."""
        window = self.sliding_window(layer)
        names = [self.attention_name(layer, r) for r in ATTN_ROLES]
        w.q, w.k, w.v = obs.shared_input(names[:3], [w.q, w.k, w.v],
                                         (self.norm(xc, w.input_norm) for xc in chunks))
        if obs.settles_weights:
            ctx = [self.attention(self.norm(xc, w.input_norm), w, cos, sin, window) for xc in chunks]
            (w.o,) = obs.shared_input(names[3:], [w.o], ctx)
            for xc, cc in zip(chunks, ctx, strict=True):
                xc += F.linear(cc, w.o, w.bias.get("o"))
            del ctx
        else:
            for xc in chunks:
                xc += F.linear(self.attention(self.norm(xc, w.input_norm), w, cos, sin, window), w.o,
                               w.bias.get("o"))

    def _dense_mlp(self, h: torch.Tensor, w: ExpertWeights, names: list[str], rows: int,
                   obs: LayerObserver) -> torch.Tensor:
        """A gated MLP that every token of ``h [T, H]`` passes through, its linears ``names`` (gate, up,
        down) shown to ``obs`` first."""
        parts = torch.split(h, rows)
        w.w1, w.w3 = obs.shared_input(names[:2], [w.w1, w.w3], parts)
        act = [self.gated(F.linear(p, w.w1), F.linear(p, w.w3)) for p in parts]
        if obs.settles_weights:
            (w.w2,) = obs.shared_input(names[2:], [w.w2], act)
        return torch.cat([F.linear(a, w.w2) for a in act])


def _mlp_infos(name_of, kind: str, layer: int, inter: int, hidden: int) -> list[LinearInfo]:
    return [LinearInfo(name_of(layer, "w1"), kind, "w1", inter, hidden, layer),
            LinearInfo(name_of(layer, "w2"), kind, "w2", hidden, inter, layer),
            LinearInfo(name_of(layer, "w3"), kind, "w3", inter, hidden, layer)]


def _check_fused(name: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(shape) != want:
        raise MoequantError(f"fused experts {name} have shape {list(shape)}; config.json implies {list(want)} "
                            "([experts, rows, columns])")


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the leading ``cos.shape[-1]`` of each head (all of it, or a part), the rest kept."""
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return torch.cat((_apply_rope(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _sliding_causal_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return (j <= i) & (i - j < window)
