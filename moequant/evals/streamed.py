"""Scoring a model, and comparing it with a baseline, over token windows.

Two engines produce the same :class:`EvalResult`:

``streamed`` (the default) walks one decoder layer at a time over every window, the model and its
baseline side by side, with the hidden states of all windows (``[W, L, H]`` per model, in the
compute dtype on the compute device) as the only state kept between layers. Within a layer the
attention weights are read once and applied to the windows in chunks; then every token is routed
and the experts are read one at a time, each applied to all tokens routed to it. Tensors are read
with positional reads, one at a time, and dropped once applied, so peak memory is about one
layer's attention plus one expert plus the hidden states, whatever the depth of the model, and
models larger than memory can be evaluated. Original and compressed checkpoints run through the
same code: packed GPTQ modules are dequantised as they are read. This is the default because it works for every size; the ``memory`` engine is faster
only where whole models fit.

``memory`` runs whole ``transformers`` models (``moequant.load`` for compressed checkpoints) on
chunks of windows; it suits models that fit in memory and serves as a cross-check.

After the last layer the final norm and the LM head score each chunk of windows: the NLL of every
next token, and with a baseline ``KL(base || model)`` per token (the KL of the model's next-token
distribution from the baseline's, ``sum p_base * log(p_base / p_model)``), whether both argmax
tokens agree, the share of token-layer pairs whose top-k expert set is equal, and per layer the
relative hidden-state error ``||h_model - h_base|| / ||h_base||`` over all tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moequant.arch.base import Architecture, Chunking, LayerObserver
from moequant.arch.registry import adapter_for
from moequant.calib import check_token_ids
from moequant.checkpoint.against_config import check_tensors
from moequant.checkpoint.gptq_config import quantization_config_of
from moequant.checkpoint.reader import CheckpointReader, resolve_source
from moequant.checkpoint.weights import tensor_getter
from moequant.errors import MoequantError
from moequant.evals.agreement import kl_divergence, top1_equal, topk_sets_equal
from moequant.evals.perplexity import next_token_nll
from moequant.nn.offload import total_stats
from moequant.numeric import check_int
from moequant.progress import Progress

ENGINES = ("streamed", "memory")
_ACT_BUDGET = 64 << 20
_LOGIT_BUDGET = 16 << 20


@dataclass
class EvalResult:
    """Per-token and per-layer measurements of one evaluation.

    Attributes:
        windows: the token windows ``[W, L]`` (int64).
        nll: the model's NLL of every next token ``[W, L-1]`` (float32, nats).
        topk_ids: the model's top-k experts ``[n_layers, W*L, k]`` (int16, CPU; -1 in dense layers).
        base_nll, kl, top1, base_topk_ids: the same for the baseline; ``kl [W, L-1]`` is
            ``KL(base || model)`` per predicted position and ``top1 [W, L-1]`` whether both argmax
            tokens agree. ``None`` without a baseline.
        hidden_error: per layer, ``||h_model - h_base|| / ||h_base||`` over all tokens of all windows.
        engine: ``streamed`` or ``memory``; time_s: wall time of the evaluation.
        expert_cache: with offloaded experts, the model's cache statistics (hit rate, prefetch accuracy,
            bytes copied).
    """

    windows: torch.Tensor
    nll: torch.Tensor
    topk_ids: torch.Tensor
    base_nll: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    base_topk_ids: torch.Tensor | None = None
    hidden_error: list[float] | None = None
    engine: str = "streamed"
    expert_cache: dict | None = None
    time_s: float = 0.0

    @property
    def num_layers(self) -> int:
        return int(self.topk_ids.shape[0])

    def router_agreement_per_layer(self) -> list[float | None] | None:
        """Share of tokens per layer whose top-k expert set matches the baseline's (``None`` for a dense layer)."""
        if self.base_topk_ids is None:
            return None
        return [None if bool((self.topk_ids[i] < 0).all()) else
                float(topk_sets_equal(self.topk_ids[i], self.base_topk_ids[i]).double().mean())
                for i in range(self.num_layers)]


class _Model:
    """One checkpoint under evaluation: its folder, its reader (headers only; tensors are read as
    needed) and its family."""

    def __init__(self, source: str | Path) -> None:
        self.path = resolve_source(source)
        self.reader = CheckpointReader(self.path)
        self.adapter: Architecture = adapter_for(self.reader.config)
        check_tensors(self.reader, self.adapter)
        self.quantised = quantization_config_of(self.reader.config) is not None

    def getter(self, dtype: torch.dtype, device: torch.device) -> Callable[[str], torch.Tensor]:
        return tensor_getter(self.reader, dtype, device)


def check_pair(model: Architecture, base: Architecture) -> None:
    """Refuse a baseline whose shape makes per-token comparison meaningless."""
    a, b = model.config, base.config
    for field in ("vocab_size", "num_layers", "hidden_size", "num_experts", "top_k"):
        if getattr(a, field) != getattr(b, field):
            raise MoequantError(
                f"model and baseline differ in {field} ({getattr(a, field)} vs {getattr(b, field)}); "
                "the baseline must be the checkpoint the model was compressed from"
            )


def check_engine(engine: str) -> str:
    """``engine`` if it is one of :data:`ENGINES`, else a one-line MoequantError."""
    if engine not in ENGINES:
        raise MoequantError(f"unknown engine {engine!r}; use {' or '.join(ENGINES)}")
    return engine


def check_batch(batch: int) -> int:
    """``batch`` (windows per forward chunk) if it is 0 (automatic) or positive."""
    return check_int(batch, "--batch", 0, meaning="windows per forward chunk; 0: automatic")


def default_batch(adapter: Architecture, seqlen: int, windows: int) -> int:
    """Windows per forward chunk, so a chunk's activations stay around 64M floats."""
    c = adapter.config
    per_window = seqlen * max(c.hidden_size, c.intermediate_size, c.num_heads * seqlen)
    return max(1, min(windows, _ACT_BUDGET // per_window))


def evaluate_windows(
    model: str | Path,
    windows: torch.Tensor,
    baseline: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch: int = 0,
    engine: str = "streamed",
    progress: Progress | None = None,
    expert_slots: int | None = None,
) -> EvalResult:
    """Score ``model`` (and compare it with ``baseline``) on token windows ``[W, L]``.

    Args:
        model, baseline: checkpoint folders or hub ids, each original or compressed.
        windows: int64 ``[W, L]``; every window is scored on its own from an empty context.
        device: where the maths runs (hidden states live there too).
        dtype: compute and hidden-state dtype (float32 by default; logits are scored in float32).
        batch: windows per forward chunk (0: chosen from the model's shape).
        engine: ``streamed`` (one layer at a time, the default) or ``memory`` (whole models).
        progress: receives one step per decoder layer, then one per scored chunk.
        expert_slots: with the ``memory`` engine, run a compressed model with its experts offloaded to
            host memory behind a cache of this many per layer (:mod:`moequant.nn.offload`).
    """
    check_engine(engine)
    if expert_slots is not None and engine != "memory":
        raise MoequantError("offloaded experts run in whole models: add --engine memory")
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise MoequantError("evaluation needs at least one window of at least 2 tokens")
    check_batch(batch)
    progress = progress or Progress()
    device = torch.device(device)
    started = time.perf_counter()
    m = _Model(model)
    b = _Model(baseline) if baseline is not None else None
    if b is not None:
        check_pair(m.adapter, b.adapter)
    check_token_ids(windows, m.adapter.config.vocab_size, m.adapter.embed_name)
    batch = batch or default_batch(m.adapter, windows.shape[1], windows.shape[0])
    sides = [m] if b is None else [m, b]
    if engine == "streamed":
        result = _streamed(sides, windows.to(torch.int64), device, dtype, batch, progress)
    else:
        result = _in_memory(sides, windows.to(torch.int64), device, dtype, batch, progress, expert_slots)
    result.engine = engine
    result.time_s = time.perf_counter() - started
    return result


# -- streamed engine ------------------------------------------------------------------------
def _streamed(sides: list[_Model], windows: torch.Tensor, device: torch.device, dtype: torch.dtype,
              batch: int, progress: Progress) -> EvalResult:
    adapter = sides[0].adapter
    n_layers = adapter.config.num_layers
    w, seqlen = windows.shape
    ids = windows.to(device)
    hidden = [_embed(s, ids, dtype, device) for s in sides]
    cos, sin = adapter.rotary(seqlen, device)
    routes: list[list[torch.Tensor]] = [[] for _ in sides]
    err_sq = [[0.0, 0.0] for _ in range(n_layers)]
    two = len(sides) == 2

    progress.begin(n_layers, f"evaluating {sides[0].path.name}" + (f" against {sides[1].path.name}" if two else ""))
    for layer in range(n_layers):
        for i, side in enumerate(sides):
            label = "model" if i == 0 else "baseline"
            routes[i].append(_layer(side, layer, hidden[i], cos, sin, dtype, device, batch,
                                    lambda stage, label=label, layer=layer: progress.stage(layer, f"{label} {stage}")))
        if two:
            for hm, hb in zip(torch.split(hidden[0], batch), torch.split(hidden[1], batch), strict=True):
                err_sq[layer][0] += float((hm.double() - hb.double()).pow(2).sum())
                err_sq[layer][1] += float(hb.double().pow(2).sum())
        progress.advance(layer)
    progress.end()

    heads = [_head(s, dtype, device) for s in sides]
    scored = _Scores(two)
    chunk = _score_chunk(seqlen, adapter.config.vocab_size, w)
    progress.begin(-(-w // chunk), "scoring windows")
    for step, start in enumerate(range(0, w, chunk)):
        sl = slice(start, start + chunk)
        logits = [_logits(adapter, hidden[i][sl], *heads[i]) for i in range(len(sides))]
        scored.add(logits, ids[sl])
        progress.advance(step)
    progress.end()
    hidden_error = [(e / max(n, 1e-300)) ** 0.5 for e, n in err_sq] if two else None
    return scored.result(windows, [torch.stack(r) for r in routes], hidden_error)


def _embed(side: _Model, ids: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    table = side.reader.get(side.adapter.embed_name, device=device)
    return table[ids].to(dtype)


class _Stages(LayerObserver):
    """Reports the stages of one side's layer forward as progress."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.stage = report


def _layer(side: _Model, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype,
           device: torch.device, batch: int, stage: Callable[[str], None]) -> torch.Tensor:
    """Apply decoder layer ``layer`` to ``x [W, L, H]`` in place; return its top-k ids ``[W*L, k]`` (int16, CPU)."""
    c = side.adapter.config
    get = side.getter(dtype, device)
    chunking = Chunking(windows=batch, route_rows=batch * x.shape[1],
                        expert_rows=max(1, _ACT_BUDGET // (4 * c.intermediate_size)))
    top_ids = side.adapter.layer_forward(x, layer, get, cos, sin, chunking, observer=_Stages(stage))
    return top_ids.to(device="cpu", dtype=torch.int16)


def _head(side: _Model, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    get = side.getter(dtype, device)
    return get(side.adapter.final_norm_name), get(side.adapter.lm_head_name)


def _logits(adapter: Architecture, x: torch.Tensor, norm: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[B, L, V]`` of final hidden states ``x [B, L, H]``."""
    return F.linear(adapter.norm(x, norm), head).float()


def _score_chunk(seqlen: int, vocab: int, windows: int) -> int:
    return max(1, min(windows, _LOGIT_BUDGET // (seqlen * vocab)))


class _Scores:
    """Accumulates per-token scores of chunks of windows."""

    def __init__(self, two: bool) -> None:
        self.two = two
        self.nll: list[torch.Tensor] = []
        self.base_nll: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []
        self.top1: list[torch.Tensor] = []

    def add(self, logits: list[torch.Tensor], ids: torch.Tensor) -> None:
        """``logits``: the model's (and the baseline's) ``[B, L, V]``; ``ids [B, L]``."""
        self.nll.append(next_token_nll(logits[0], ids).cpu())
        if self.two:
            lm, lb = logits[0][:, :-1], logits[1][:, :-1]
            self.base_nll.append(next_token_nll(logits[1], ids).cpu())
            self.kl.append(kl_divergence(lb, lm).cpu())
            self.top1.append(top1_equal(lb, lm).cpu())

    def result(self, windows: torch.Tensor, routes: list[torch.Tensor], hidden_error: list[float] | None) -> EvalResult:
        cat = torch.cat
        if not self.two:
            return EvalResult(windows.cpu(), cat(self.nll), routes[0])
        return EvalResult(windows.cpu(), cat(self.nll), routes[0], base_nll=cat(self.base_nll), kl=cat(self.kl),
                          top1=cat(self.top1), base_topk_ids=routes[1], hidden_error=hidden_error)


# -- in-memory engine ------------------------------------------------------------------------
def _in_memory(sides: list[_Model], windows: torch.Tensor, device: torch.device, dtype: torch.dtype,
               batch: int, progress: Progress, expert_slots: int | None = None) -> EvalResult:
    models = [_load_model(s, dtype, device, expert_slots) for s in sides]
    n_layers = sides[0].adapter.config.num_layers
    top_k = sides[0].adapter.config.top_k
    two = len(sides) == 2
    scored = _Scores(two)
    routes: list[list[list[torch.Tensor]]] = [[[] for _ in range(n_layers)] for _ in sides]
    err_sq = [[0.0, 0.0] for _ in range(n_layers)]
    w = windows.shape[0]
    progress.begin(-(-w // batch), f"evaluating {sides[0].path.name} in memory")
    for step, start in enumerate(range(0, w, batch)):
        ids = windows[start : start + batch].to(device)
        logits, layer_out = [], []
        for i, model in enumerate(models):
            captured: list[torch.Tensor] = []
            chosen: dict[int, torch.Tensor] = {}
            hooks = [layer.register_forward_hook(_capture(captured)) for layer in model.model.layers]
            hooks += [model.model.layers[n].mlp.gate.register_forward_hook(_capture_choice(chosen, n))
                      for n in range(n_layers) if sides[i].adapter.is_moe_layer(n)]
            try:
                with torch.no_grad():
                    out = model(input_ids=ids, use_cache=False)
            finally:
                for h in hooks:
                    h.remove()
            logits.append(out.logits.float())
            layer_out.append(captured)
            for layer in range(n_layers):
                ids_k = chosen.get(layer, torch.full((ids.numel(), top_k), -1))
                routes[i][layer].append(ids_k.to(device="cpu", dtype=torch.int16))
        if two:
            for layer, (hm, hb) in enumerate(zip(*layer_out, strict=True)):
                err_sq[layer][0] += float((hm.double() - hb.double()).pow(2).sum())
                err_sq[layer][1] += float(hb.double().pow(2).sum())
        scored.add(logits, ids)
        progress.advance(step)
    progress.end()
    hidden_error = [(e / max(n, 1e-300)) ** 0.5 for e, n in err_sq] if two else None
    stacked = [torch.stack([torch.cat(chunks) for chunks in per_side]) for per_side in routes]
    result = scored.result(windows, stacked, hidden_error)
    stats = total_stats(models[0])
    if stats is not None:
        result.expert_cache = {"slots": expert_slots, "hit_rate": round(stats.hit_rate, 4),
                               "prefetch_accuracy": round(stats.prefetch_accuracy, 4), "bytes_copied": stats.bytes}
    return result


def _capture_choice(store: dict[int, torch.Tensor], layer: int):
    """A hook on a router that keeps the expert ids it chose (the last of its outputs, ``[T, k]``)."""

    def hook(module, args, output):
        store[layer] = output[-1].detach()

    return hook


def _capture(store: list[torch.Tensor]):
    def hook(module, args, output):
        store.append((output[0] if isinstance(output, tuple) else output).detach())

    return hook


def _load_model(side: _Model, dtype: torch.dtype, device: torch.device, expert_slots: int | None = None):
    """A whole ``transformers`` model: ``moequant.load`` (packed kernels, experts offloaded behind a cache of
    ``expert_slots`` where given) for compressed checkpoints."""
    if side.quantised:
        from moequant.loading import load

        offload = None if expert_slots is None else "experts"
        return load(side.path, device=device, dtype=dtype, offload=offload, expert_slots=expert_slots).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(side.path), dtype=dtype).to(device).eval()
