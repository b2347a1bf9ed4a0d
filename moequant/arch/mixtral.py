"""Mixtral: on-disk names, shapes, and an explicit decoder-layer forward.

The forward is written out in plain torch (RMSNorm, rotary embeddings, grouped-query attention
with an optional sliding window, top-k softmax routing, gated-MLP experts), one layer at a time,
so that compression can see the inputs of every linear and settle its quantised weights between
steps, and evaluation can stream a model larger than memory. All maths runs in the dtype of its
inputs.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moequant.arch import fields
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
_HF_ROLE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_ROLE_OF_HF = {v: k for k, v in _HF_ROLE.items()}
_EXPERT_CANONICAL = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.experts\.(\d+)\.(w[123])(\.|$)")
_ROUTER_CANONICAL = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.gate(\.|$)")
_EXPERT_HF = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)(\.|$)")
_ROUTER_HF = re.compile(r"^(model\.layers\.\d+\.)mlp\.gate(\.|$)")


def parse_mixtral_config(raw: Mapping) -> MoEConfig:
    """The numbers of a Mixtral ``config.json`` (top-level ``rope_theta`` or ``rope_parameters``), checked.

    Raises:
        MoequantError: one line naming the first field that is missing, null where a value is needed,
            of the wrong type, out of range, or inconsistent with another field.
    """
    hidden = fields.integer(raw, "hidden_size")
    heads, kv_heads = _heads(raw)
    experts = fields.integer(raw, "num_local_experts")
    top_k = fields.integer(raw, "num_experts_per_tok")
    if top_k > experts:
        raise MoequantError(f"config.json field num_experts_per_tok is {top_k}, more than the {experts} experts of "
                            "num_local_experts; it must be between 1 and num_local_experts")
    act = fields.text(raw, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise MoequantError(f"config.json field hidden_act is {act!r}; Mixtral experts compute silu, so it must be "
                            "'silu'")
    theta, rope_type = _rope(raw)
    config = MoEConfig(
        model_type=fields.text(raw, "model_type", "mixtral", nullable=True),
        hidden_size=hidden,
        intermediate_size=fields.integer(raw, "intermediate_size"),
        num_layers=fields.integer(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_head_dim(raw, hidden, heads),
        num_experts=experts,
        top_k=top_k,
        rms_norm_eps=fields.positive_number(raw, "rms_norm_eps", 1e-5),
        vocab_size=fields.integer(raw, "vocab_size"),
        max_position_embeddings=fields.integer(raw, "max_position_embeddings", 4096),
        sliding_window=_sliding_window(raw),
        rope_theta=theta,
        rope_type=rope_type,
        tie_word_embeddings=fields.flag(raw, "tie_word_embeddings", False),
    )
    _check_transformers_accepts(raw)
    return config


def _check_transformers_accepts(raw: Mapping) -> None:
    """Refuse what transformers' ``MixtralConfig`` refuses (a float field given as an integer, rope
    settings a rope type does not take, ...): a checkpoint with such a config could not be loaded."""
    from transformers import MixtralConfig

    fields_only = {k: v for k, v in raw.items() if k not in ("quantization_config", "architectures")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            MixtralConfig.from_dict(fields_only)
        except Exception as exc:
            text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            reason = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__
            raise MoequantError(f"transformers refuses config.json: {reason}") from exc


def _heads(raw: Mapping) -> tuple[int, int]:
    """``(num_attention_heads, num_key_value_heads)``; query heads must split evenly over key/value heads."""
    heads = fields.integer(raw, "num_attention_heads")
    kv_heads = fields.integer(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise MoequantError(f"config.json field num_attention_heads is {heads}, not a multiple of "
                            f"num_key_value_heads {kv_heads}; each key/value head must serve a whole number of "
                            "query heads")
    return heads, kv_heads


def _head_dim(raw: Mapping, hidden: int, heads: int) -> int:
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


def _sliding_window(raw: Mapping) -> int | None:
    """The attention window in tokens, or None (null or absent) for full causal attention."""
    value = raw.get("sliding_window")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fields.refusal("sliding_window", value, "a positive number of tokens, or null for full attention")
    return value


def _rope(raw: Mapping) -> tuple[float, str]:
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


def _check_fused(name: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(shape) != want:
        raise MoequantError(f"fused experts {name} have shape {list(shape)}; config.json implies {list(want)} "
                            "([experts, rows, columns])")


@dataclass
class LayerWeights:
    """The float weights of one decoder layer but its experts, keyed by role."""

    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor


class MixtralAdapter:
    """Names and maths of ``MixtralForCausalLM`` checkpoints."""

    family = "mixtral"
    architectures = ("MixtralForCausalLM",)

    def __init__(self, raw_config: dict) -> None:
        self.raw_config = raw_config
        self.config = parse_mixtral_config(raw_config)
        self._inv_freq: torch.Tensor | None = None
        self._attention_scaling = 1.0

    # -- names ---------------------------------------------------------------------------
    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def attention_name(self, layer: int, role: str) -> str:
        return f"model.layers.{layer}.self_attn.{role}_proj"

    def expert_name(self, layer: int, expert: int, role: str) -> str:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{role}"

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.gate"

    def canonical_views(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, TensorView]:
        """The canonical per-module names over tensors stored under other names.

        - experts stored fused, as transformers writes them with ``save_original_format=False``:
          ``mlp.experts.gate_up_proj [E, 2I, H]`` (each expert's w1 rows, then its w3 rows),
          ``mlp.experts.down_proj [E, H, I]``;
        - experts stored one by one under transformers' module names
          (``mlp.experts.E.gate_proj/up_proj/down_proj``, any tensor of them: ``weight``,
          ``qweight``, ...), as the ``gptqmodel`` layout and GPTQModel write them;
        - the router at ``mlp.gate``.

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
            for block in ("mlp", "block_sparse_moe"):
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

    # -- layouts: the names a written checkpoint uses ------------------------------------------
    layouts = ("vllm", "gptqmodel")

    def disk_name(self, name: str, layout: str) -> str:
        """The name under which ``layout`` stores the tensor or module canonically named ``name``."""
        if layout == "vllm":
            return name
        name = _EXPERT_CANONICAL.sub(lambda m: f"{m[1]}mlp.experts.{m[2]}.{_HF_ROLE[m[3]]}{m[4]}", name)
        return _ROUTER_CANONICAL.sub(r"\1mlp.gate\2", name)

    def canonical_name(self, name: str) -> str:
        """The canonical name of a tensor or module stored as ``name`` under any layout."""
        name = _EXPERT_HF.sub(lambda m: f"{m[1]}block_sparse_moe.experts.{m[2]}.{_ROLE_OF_HF[m[3]]}{m[4]}", name)
        return _ROUTER_HF.sub(r"\1block_sparse_moe.gate\2", name)

    def norm_names(self, layer: int) -> tuple[str, str]:
        p = self.layer_prefix(layer)
        return p + "input_layernorm.weight", p + "post_attention_layernorm.weight"

    def layer_linears(self, layer: int) -> list[LinearInfo]:
        c = self.config
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        shapes = {"q": (q_out, c.hidden_size), "k": (kv_out, c.hidden_size), "v": (kv_out, c.hidden_size),
                  "o": (c.hidden_size, q_out)}
        out = [LinearInfo(self.attention_name(layer, r), "attention", r, *shapes[r], layer=layer) for r in ATTN_ROLES]
        for e in range(c.num_experts):
            out.append(LinearInfo(self.expert_name(layer, e, "w1"), "expert", "w1", c.intermediate_size,
                                  c.hidden_size, layer, e))
            out.append(LinearInfo(self.expert_name(layer, e, "w2"), "expert", "w2", c.hidden_size,
                                  c.intermediate_size, layer, e))
            out.append(LinearInfo(self.expert_name(layer, e, "w3"), "expert", "w3", c.intermediate_size,
                                  c.hidden_size, layer, e))
        out.append(LinearInfo(self.router_name(layer), "router", "gate", c.num_experts, c.hidden_size, layer))
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

    # -- maths ---------------------------------------------------------------------------
    def rotary(self, seqlen: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` of shape ``[T, head_dim]`` in float32 for positions ``0..T-1``."""
        if self._inv_freq is None:
            self._inv_freq, self._attention_scaling = self._rope_inv_freq()
        pos = torch.arange(seqlen, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, self._inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self._attention_scaling, emb.sin() * self._attention_scaling

    def _rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        c = self.config
        if c.rope_type == "default":
            exponent = torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim
            return 1.0 / (c.rope_theta**exponent), 1.0
        try:
            from transformers import MixtralConfig
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            hf_config = MixtralConfig(**{k: v for k, v in self.raw_config.items() if k != "architectures"})
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[c.rope_type](hf_config, "cpu")
        except Exception as exc:
            raise MoequantError(f"rope type {c.rope_type!r} in config.json is not supported") from exc
        return inv_freq.float(), float(scaling)

    def attention(self, h: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal grouped-query self-attention up to (not including) ``o_proj``.

        Args:
            h: normed hidden states ``[B, T, H]``.
            wq, wk, wv: ``[nh*hd, H]``, ``[nkv*hd, H]``, ``[nkv*hd, H]``.
            cos, sin: ``[T, hd]`` from :meth:`rotary`.

        Returns:
            ``[B, T, nh*hd]``, the input of ``o_proj``.
        """
        c = self.config
        b, t, _ = h.shape
        q = F.linear(h, wq).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = F.linear(h, wk).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = F.linear(h, wv).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = cos[:t].to(h.dtype), sin[:t].to(h.dtype)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        rep = c.num_heads // c.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if c.sliding_window is not None and t > c.sliding_window:
            mask = _sliding_causal_mask(t, c.sliding_window, h.device)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return ctx.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim)

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dimension, computed in float32."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight.to(x.dtype) * xf.to(x.dtype)

    def route(self, h: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k softmax routing.

        Args:
            h: ``[T, H]`` normed hidden states; gate: ``[E, H]`` router weight.

        Returns:
            ``probs [T, E]`` (float32 softmax over all experts), ``topk_ids [T, k]`` and
            ``topk_weights [T, k]`` (renormalised over the chosen k, float32).
        """
        logits = F.linear(h, gate.to(h.dtype)).float()
        probs = torch.softmax(logits, dim=-1)
        top_w, top_ids = torch.topk(probs, self.config.top_k, dim=-1)
        if self.config.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return probs, top_ids, top_w

    @staticmethod
    def expert_mlp(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        """``w2 (silu(w1 x) * w3 x)`` for ``x [t, H]``; returns ``[t, H]``."""
        return F.linear(F.silu(F.linear(x, w.w1)) * F.linear(x, w.w3), w.w2)

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
        """Layer ``layer``'s weights but its experts, through ``get``."""
        in_norm, post_norm = self.norm_names(layer)
        q, k, v, o = (get(self.attention_name(layer, r) + ".weight") for r in ATTN_ROLES)
        return LayerWeights(input_norm=get(in_norm), q=q, k=k, v=v, o=o, post_norm=get(post_norm),
                            gate=get(self.router_name(layer) + ".weight"))

    def read_expert(self, get: WeightGetter, layer: int, expert: int) -> ExpertWeights:
        """One expert's matrices through ``get``."""
        return ExpertWeights(*(get(self.expert_name(layer, expert, r) + ".weight") for r in ("w1", "w3", "w2")))

    def layer_forward(self, x: torch.Tensor, layer: int, get: WeightGetter, cos: torch.Tensor, sin: torch.Tensor,
                      chunking: Chunking, expert_batch: int = 1,
                      observer: LayerObserver | None = None) -> torch.Tensor:
        """Decoder layer ``layer`` applied to ``x [B, T, H]`` in place; returns ``top_ids [B*T, k]``.

        Attention runs on ``chunking.windows`` windows at a time, then every token is routed and
        the experts are read ``expert_batch`` at a time and applied to the tokens routed to them;
        their outputs are summed before they join the residual, as transformers does. Weights are
        read through ``get`` as the forward reaches them; ``observer`` sees the inputs of each
        linear and may settle its weights first (see :class:`LayerObserver`).
        """
        obs = observer or LayerObserver()
        c = self.config
        w = self.read_layer(get, layer)
        chunks = torch.split(x, chunking.windows)

        obs.stage("attention")
        names = [self.attention_name(layer, r) for r in ATTN_ROLES]
        w.q, w.k, w.v = obs.shared_input(names[:3], [w.q, w.k, w.v],
                                         (self.norm(xc, w.input_norm) for xc in chunks))
        if obs.settles_weights:
            ctx = [self.attention(self.norm(xc, w.input_norm), w.q, w.k, w.v, cos, sin) for xc in chunks]
            (w.o,) = obs.shared_input(names[3:], [w.o], ctx)
            for xc, cc in zip(chunks, ctx, strict=True):
                xc += F.linear(cc, w.o)
            del ctx
        else:
            for xc in chunks:
                xc += F.linear(self.attention(self.norm(xc, w.input_norm), w.q, w.k, w.v, cos, sin), w.o)

        obs.stage("routing")
        flat = x.view(-1, c.hidden_size)
        tokens = flat.shape[0]
        h = torch.empty_like(flat)
        probs = torch.empty(tokens, c.num_experts, dtype=torch.float32, device=x.device)
        top_ids = torch.empty(tokens, c.top_k, dtype=torch.int64, device=x.device)
        top_w = torch.empty(tokens, c.top_k, dtype=torch.float32, device=x.device)
        rows = chunking.route_rows or tokens
        for start in range(0, tokens, rows):
            sl = slice(start, start + rows)
            h[sl] = self.norm(flat[sl], w.post_norm)
            probs[sl], top_ids[sl], top_w[sl] = self.route(h[sl], w.gate)
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
        flat += moe_out
        return top_ids


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _sliding_causal_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return (j <= i) & (i - j < window)
