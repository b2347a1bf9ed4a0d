"""The compression loop: one decoder layer at a time, from checkpoint to GPTQ layout.

For every layer: read its weights, run the calibration activations through it with the explicit
layer forward, build Hessians (q/k/v share one; o_proj follows the quantised q/k/v; the router
then routes the output of the quantised attention and every expert gets a Hessian from the tokens
routed to it, w1 and w3 sharing it and w2 taking that expert's activated intermediate), solve,
pack, write the layer's shard, and hand the output of the *quantised* layer to the next one.

With no module that needs calibration (all RTN) the loop streams one tensor at a time instead.
After every layer the partial output holds enough state (the next layer's inputs and the record
so far) to resume; a resumed run writes byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moequant import __version__
from moequant.arch.base import LinearInfo
from moequant.arch.mixtral import ExpertWeights, MixtralAdapter, load_expert_weights, load_layer_weights
from moequant.arch.registry import adapter_for
from moequant.calib import check_token_ids, load_text, load_tokenizer, random_windows, tokenize
from moequant.checkpoint.gptq_config import quantization_config
from moequant.checkpoint.reader import QUANT_CONFIG_FILES, CheckpointReader, resolve_source
from moequant.checkpoint.writer import CheckpointWriter, check_output, partial_dir_for, write_json_atomic
from moequant.device import resolve_device
from moequant.errors import MoequantError
from moequant.kernels.packed import stored_group_size
from moequant.memory import map_large_blocks, release_freed_memory
from moequant.progress import Progress
from moequant.quant.gptq import gptq_quantize, output_error
from moequant.quant.hessian import HessianAccumulator
from moequant.quant.pack import check_packable, pack_result
from moequant.quant.rtn import rtn
from moequant.quant.types import QuantSpec
from moequant.recipe import Recipe, load_recipe
from moequant.serving import engine_limits
from moequant.sizes import packed_bits

RECORD_FILE = "moequant.json"
RECIPE_FILE = "recipe.yaml"
_COPY_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
_GLOBALS_KEY = "globals"
RANDOM_CALIB = "random"  # uniformly random token ids: for timing runs, never for real calibration


@dataclass
class CalibSettings:
    """Calibration data: a dataset name or text file, and how many windows of what length."""

    source: str = "builtin"
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0


@dataclass
class CompressResult:
    """What :func:`compress` produced: the output folder and its record (``moequant.json``)."""

    path: Path
    record: dict


@dataclass
class _Run:
    reader: CheckpointReader
    adapter: MixtralAdapter
    recipe: Recipe
    specs: dict[str, QuantSpec | None]
    device: torch.device
    writer: CheckpointWriter
    progress: Progress
    calibrate: bool
    batch: int
    expert_batch: int
    modules: dict[str, dict] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of the current layer

    @contextmanager
    def phase(self, name: str):
        """Add the seconds spent inside to ``phases[name]`` (device work finished at both ends)."""
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan(adapter: MixtralAdapter, recipe: Recipe, method: str | None = None) -> dict[str, QuantSpec | None]:
    """The spec of every linear module (``None`` = keep 16-bit), checked against the model's shapes."""
    specs: dict[str, QuantSpec | None] = {}
    infos = [i for layer in range(adapter.config.num_layers) for i in adapter.layer_linears(layer)]
    for info in infos + adapter.global_linears():
        spec = recipe.spec_for(info.name, method)
        if spec is not None:
            spec = replace(spec, group_size=stored_group_size(spec.group_size, info.in_features))
            _check_spec(info, spec, recipe)
        specs[info.name] = spec
    return specs


def _check_spec(info: LinearInfo, spec: QuantSpec, recipe: Recipe) -> None:
    rule = recipe.rule_for(info.name)
    where = f"recipe {recipe.name}, rule {rule[0] + 1} ({rule[1].match!r})" if rule else f"recipe {recipe.name}"
    if info.kind == "router":
        raise MoequantError(f"{where} would quantise the router {info.name}; routers stay 16-bit, narrow the match")
    if info.kind == "embedding":
        raise MoequantError(f"{where} would quantise {info.name}; embeddings stay 16-bit in the GPTQ layout")
    try:
        check_packable(info.out_features, info.in_features, spec.bits, spec.group_size)
    except MoequantError as exc:
        raise MoequantError(
            f"{where}: {info.name} cannot be packed: {exc}; keep such modules 16-bit with a rule "
            "'bits: 16' placed before this one"
        ) from exc


def compress(
    model: str | Path,
    out: str | Path,
    recipe: str | Path | Recipe = "mixtral-a4e3",
    method: str | None = None,
    device: str = "auto",
    calib: CalibSettings | None = None,
    overwrite: bool = False,
    resume: bool = False,
    allow_pickle: bool = False,
    expert_batch: int = 0,
    progress: Progress | None = None,
    stop_after_layers: int | None = None,
) -> CompressResult:
    """Compress the MoE checkpoint ``model`` into ``out`` (GPTQ layout).

    Args:
        model: local checkpoint folder or hub id.
        out: output folder; written complete or not at all.
        recipe: built-in recipe name, YAML path or a :class:`Recipe`.
        method: ``gptq`` or ``rtn`` to override the recipe's solver for every module.
        device: ``auto``, ``cpu`` or ``cuda``.
        calib: calibration settings (only used when some module is solved with GPTQ).
        overwrite: replace an existing ``out``.
        resume: continue a partial run of the same settings from its last completed layer.
        allow_pickle: accept pickled ``.bin`` weights (loaded with ``weights_only=True``).
        expert_batch: experts solved together (0: all experts of a layer at once).
        progress: receives progress events.
        stop_after_layers: stop (leaving a resumable partial run) after this many layers; for tests.
    """
    progress = progress or Progress()
    calib = calib or CalibSettings()
    map_large_blocks()
    if method is not None and method not in ("gptq", "rtn"):
        raise MoequantError(f"unknown method {method!r}; use gptq or rtn")
    started = time.perf_counter()
    source = resolve_source(model)
    out_path = Path(out).expanduser().resolve()
    check_output(out_path, source, overwrite, resume)
    partial = partial_dir_for(out_path)
    if partial.exists() and not resume and not overwrite:
        raise MoequantError(
            f"a partial run of {out_path} exists at {partial}; pass --resume to continue it or --overwrite to start over"
        )
    reader = CheckpointReader(source, allow_pickle=allow_pickle)
    if reader.config.get("quantization_config"):
        raise MoequantError(f"{source} is already quantised; compress the original 16-bit checkpoint")
    adapter = adapter_for(reader.config)
    recipe_obj = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    specs = plan(adapter, recipe_obj, method)
    _check_tensors_present(reader, adapter)
    dev = resolve_device(device)
    calibrate = any(s is not None and s.method == "gptq" for s in specs.values())

    fingerprint = _fingerprint(reader, recipe_obj, method, calib if calibrate else None)
    state = _load_state(partial, fingerprint) if resume else None
    n_layers = adapter.config.num_layers
    start_layer = 0
    hidden: torch.Tensor | None = None
    calib_info: dict | None = None
    if state is None and calibrate:
        ids, calib_info = _calibration_ids(source, calib, adapter)
        check_token_ids(ids, reader.shape(adapter.embed_name)[0], adapter.embed_name)
        hidden = reader.get(adapter.embed_name, dtype=torch.float32, device=dev)[ids.to(dev)]
    writer = CheckpointWriter(out_path, fresh=state is None)
    run = _Run(reader, adapter, recipe_obj, specs, dev, writer, progress, calibrate,
               batch=_calib_batch(calib, adapter), expert_batch=expert_batch or adapter.config.num_experts)
    if state is not None:
        start_layer = state["completed_layers"]
        run.modules, run.layers, calib_info = state["modules"], state["layers"], state["calibration"]
        if calibrate:
            hidden = load_file(str(partial / "resume" / "hidden.safetensors"))["hidden"].to(dev)
        progress.note(f"resuming from layer {start_layer} of {n_layers}")

    progress.begin(n_layers, f"compressing {source.name}")
    for layer in range(start_layer):
        progress.advance(layer)
    try:
        for layer in range(start_layer, n_layers):
            t0 = time.perf_counter()
            run.phases = {}
            if calibrate:
                tensors, hidden, layer_record = _calibrated_layer(run, layer, hidden)
            else:
                tensors, layer_record = _streamed_layer(run, layer)
            layer_record["time_s"] = round(time.perf_counter() - t0, 3)
            if run.phases:
                layer_record["phases_s"] = {name: round(sec, 3) for name, sec in run.phases.items()}
            writer.write_shard(_layer_key(layer), tensors)
            del tensors  # not held while the next layer is computed
            run.layers.append(layer_record)
            _save_state(partial, fingerprint, layer + 1, run, calib_info, hidden)
            release_freed_memory()
            progress.advance(layer, layer_record)
            if stop_after_layers is not None and layer + 1 >= stop_after_layers and layer + 1 < n_layers:
                raise MoequantError(f"stopped after {layer + 1} layers as asked; continue with --resume")
    except BaseException:
        if not run.layers:  # nothing worth resuming: leave no partial folder behind
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        progress.end()

    writer.write_shard(_GLOBALS_KEY, _global_tensors(run, hidden))
    record = _finish_record(run, source, calib_info, method, started)
    _write_metadata(run, source, record)
    final = writer.finish([_layer_key(i) for i in range(n_layers)] + [_GLOBALS_KEY], overwrite=overwrite)
    return CompressResult(path=final, record=record)


# -- calibration ---------------------------------------------------------------------------
def _calibration_ids(source: Path, calib: CalibSettings, adapter: MixtralAdapter) -> tuple[torch.Tensor, dict]:
    seqlen = min(calib.seqlen, adapter.config.max_position_embeddings)
    if calib.source == RANDOM_CALIB:
        gen = torch.Generator().manual_seed(calib.seed)
        ids = torch.randint(0, adapter.config.vocab_size, (calib.samples, seqlen), generator=gen)
    else:
        try:
            tokenizer = load_tokenizer(source)
        except MoequantError as exc:
            raise MoequantError(f"{exc} (or compress without calibration: --method rtn)") from exc
        tokens = tokenize(tokenizer, load_text(calib.source, "calib"))
        ids = random_windows(tokens, calib.samples, seqlen, calib.seed)
    info = {"dataset": calib.source, "samples": calib.samples, "seqlen": seqlen, "seed": calib.seed,
            "tokens": int(ids.numel())}
    return ids, info


def _calib_batch(calib: CalibSettings, adapter: MixtralAdapter) -> int:
    """Windows per forward chunk, so activations stay around 64M floats."""
    per_window = max(1, calib.seqlen) * max(adapter.config.hidden_size, adapter.config.intermediate_size)
    return max(1, min(calib.samples, (64 << 20) // per_window))


# -- one layer, calibrated ----------------------------------------------------------------------
def _calibrated_layer(run: _Run, layer: int, x: torch.Tensor) -> tuple[dict, torch.Tensor, dict]:
    a, rec, dev = run.adapter, run.recipe, run.device
    c = a.config
    get = _getter(run.reader, dev)
    with run.phase("read"):
        w = load_layer_weights(a, get, layer, with_experts=False)
        tensors = _passthrough(run, layer)
    cos, sin = a.rotary(x.shape[1], dev)
    chunks = list(torch.split(x, run.batch))

    run.progress.stage(layer, "attention")
    with run.phase("hessians"):
        acc = HessianAccumulator(1, c.hidden_size, dev)
        for xc in chunks:
            acc.add(a.norm(xc, w.input_norm).reshape(-1, c.hidden_size))
        h_qkv = acc.hessian(inplace=True)[0]
    tokens = int(acc.tokens[0])
    for role in ("q", "k", "v"):
        setattr(w, role, _solve(run, [a.attention_name(layer, role)], getattr(w, role)[None], h_qkv[None],
                                tensors, [tokens], [None])[0])
    del h_qkv, acc
    with run.phase("forward"):
        acc = HessianAccumulator(1, c.num_heads * c.head_dim, dev)
        ctx = []
        for xc in chunks:
            ctx.append(a.attention(a.norm(xc, w.input_norm), w.q, w.k, w.v, cos, sin))
            acc.add(ctx[-1].reshape(-1, ctx[-1].shape[-1]))
    w.o = _solve(run, [a.attention_name(layer, "o")], w.o[None], acc.hessian(inplace=True), tensors,
                 [tokens], [None])[0]
    del acc
    x = torch.cat([xc + F.linear(cc, w.o) for xc, cc in zip(chunks, ctx, strict=True)])
    del ctx, chunks

    run.progress.stage(layer, "routing")
    h2 = a.norm(x, w.post_norm).reshape(-1, c.hidden_size)
    probs, top_ids, top_w = a.route(h2, w.gate)
    counts = torch.bincount(top_ids.flatten(), minlength=c.num_experts).cpu()
    starved = [e for e in range(c.num_experts) if counts[e] < rec.min_tokens]

    run.progress.stage(layer, "experts")
    moe_out = torch.zeros_like(h2)
    for first in range(0, c.num_experts, run.expert_batch):
        group = list(range(first, min(first + run.expert_batch, c.num_experts)))
        with run.phase("read"):
            experts = {e: load_expert_weights(a, get, layer, e) for e in group}
        _solve_experts(run, layer, experts, h2, probs, top_ids, top_w, starved, tensors)
        with run.phase("forward"):
            a.add_experts(moe_out, h2, top_ids, top_w, experts)
        del experts
    x = x + moe_out.view_as(x)
    layer_record = {
        "layer": layer,
        "routing_histogram": counts.tolist(),
        "starved_experts": starved,
        "calibration_policy": rec.expert_calibration if starved else "routed",
    }
    return tensors, x, layer_record


def _expert_rows(run: _Run, e: int, h: torch.Tensor, probs: torch.Tensor, top_ids: torch.Tensor,
                 top_w: torch.Tensor, starved: bool) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Rows of ``h [T, K]`` that calibrate expert ``e``, their weights, and the policy applied."""
    token, slot = torch.where(top_ids == e)
    weights = top_w[token, slot] if run.recipe.hessian_weighting == "router" else None
    if not starved or run.recipe.expert_calibration == "routed":
        return token, weights, "routed" if token.numel() else "routed (no tokens: plain rounding)"
    everyone = torch.arange(h.shape[0], device=h.device)
    if run.recipe.expert_calibration == "all":
        return everyone, None, "all"
    # augmented: routed tokens (weight 1, or routing weight) plus every token weighted by p_e
    routed_w = weights if weights is not None else torch.ones(token.numel(), device=h.device)
    return torch.cat([token, everyone]), torch.cat([routed_w, probs[:, e]]), "augmented"


def _solve_experts(run: _Run, layer: int, experts: dict[int, ExpertWeights], h2: torch.Tensor,
                   probs: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor, starved: list[int],
                   tensors: dict) -> None:
    """Quantise the experts of one batch; their weights in ``experts`` become the dequantised ones."""
    a = run.adapter
    c = a.config
    group = sorted(experts)
    rows = [_expert_rows(run, e, h2, probs, top_ids, top_w, e in starved) for e in group]
    with run.phase("hessians"):
        acc = HessianAccumulator(len(group), c.hidden_size, run.device)
        for i, (idx, wt, _) in enumerate(rows):
            for part in _row_chunks(idx, wt):
                acc.add(h2[part[0]], i, part[1])
        h13 = acc.hessian(inplace=True)
    routed = [int((top_ids == e).sum()) for e in group]
    policies = [r[2] for r in rows]
    for role in ("w1", "w3"):
        stacked = torch.stack([getattr(experts[e], role) for e in group])
        names = [a.expert_name(layer, e, role) for e in group]
        deq = _solve(run, names, stacked, h13, tensors, routed, policies)
        for i, e in enumerate(group):
            setattr(experts[e], role, deq[i])
    del h13, acc
    with run.phase("hessians"):
        acc = HessianAccumulator(len(group), c.intermediate_size, run.device)
        for i, (idx, wt, _) in enumerate(rows):
            ew = experts[group[i]]
            for part_idx, part_w in _row_chunks(idx, wt):
                hx = h2[part_idx]
                acc.add(F.silu(F.linear(hx, ew.w1)) * F.linear(hx, ew.w3), i, part_w)
    stacked = torch.stack([experts[e].w2 for e in group])
    names = [a.expert_name(layer, e, "w2") for e in group]
    deq = _solve(run, names, stacked, acc.hessian(inplace=True), tensors, routed, policies)
    for i, e in enumerate(group):
        experts[e].w2 = deq[i]


def _row_chunks(idx: torch.Tensor, weights: torch.Tensor | None, size: int = 1 << 16):
    for s in range(0, idx.numel(), size):
        yield idx[s : s + size], None if weights is None else weights[s : s + size]


def _solve(run: _Run, names: list[str], weights: torch.Tensor, hessians: torch.Tensor | None, tensors: dict,
           tokens: list[int], policies: list[str | None]) -> torch.Tensor:
    """Quantise ``weights [E, N, K]`` (one module per name) and return them dequantised.

    Modules that share a spec are solved as one batch; modules kept 16-bit are copied through.
    """
    out = weights.clone()
    by_spec: dict[QuantSpec | None, list[int]] = {}
    for i, name in enumerate(names):
        by_spec.setdefault(run.specs[name], []).append(i)
    for spec, members in by_spec.items():
        if spec is None:
            for i in members:
                tensors[names[i] + ".weight"] = run.reader.get(names[i] + ".weight")
                run.modules[names[i]] = _module_record(weights.shape[1:], None, tokens[i], policies[i])
            continue
        sel = torch.tensor(members, device=weights.device)
        w_sel = weights.index_select(0, sel)
        h_sel = None if hessians is None else hessians.index_select(0, sel.to(hessians.device))
        with run.phase("solve"):
            if spec.method == "gptq" and h_sel is not None:
                result = gptq_quantize(w_sel, h_sel, spec)
            else:
                result = rtn(w_sel, spec.bits, spec.group_size, spec.sym, spec.clip_grid)
                if h_sel is not None:
                    result.error = output_error(w_sel, result.dequantize(), h_sel)
        with run.phase("pack"):
            # Packed on the solver's device: b/32 of the codes' bytes cross to the host.
            packed = {key: value.cpu() for key, value in pack_result(result, spec.bits).items()}
        deq = result.dequantize()
        for j, i in enumerate(members):
            for key, value in packed.items():
                tensors[f"{names[i]}.{key}"] = value[j]
            starved_to_rtn = (policies[i] or "").startswith("routed (no tokens")
            applied = "gptq" if spec.method == "gptq" and h_sel is not None and not starved_to_rtn else "rtn"
            run.modules[names[i]] = _module_record(weights.shape[1:], spec, tokens[i], policies[i], applied,
                error=float(result.error[j]), damp=float(result.damp[j]),
                error_kind="output" if h_sel is not None else "weight",
            )
            out[i] = deq[j].to(out.dtype)
    return out


def _module_record(shape, spec: QuantSpec | None, tokens: int | None, policy: str | None,
                   applied: str | None = None, error: float | None = None, damp: float | None = None,
                   error_kind: str | None = None) -> dict:
    rec: dict = {"shape": [int(shape[0]), int(shape[1])]}
    if spec is None:
        rec.update(bits=16, method="keep")
    else:
        rec.update(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, method=applied or spec.method,
                   act_order=spec.act_order and (applied or spec.method) == "gptq")
        if damp is not None and (applied or spec.method) == "gptq":
            rec["damp"] = round(damp, 6)
        if error is not None:
            rec["error"] = round(error, 6)
            rec["error_kind"] = error_kind
    if tokens is not None:
        rec["tokens"] = tokens
    if policy is not None:
        rec["calibration"] = policy
    return rec


# -- one layer, streamed (no calibration) ----------------------------------------------------
def _streamed_layer(run: _Run, layer: int) -> tuple[dict, dict]:
    """RTN for every module of a layer, one tensor in memory at a time."""
    tensors = _passthrough(run, layer)
    get = _getter(run.reader, run.device)
    for info in run.adapter.layer_linears(layer):
        if info.kind == "router":
            continue
        spec = run.specs[info.name]
        if spec is None:
            tensors[info.weight] = run.reader.get(info.weight)
            run.modules[info.name] = _module_record((info.out_features, info.in_features), None,
                                                    None, None)
            continue
        weight = get(info.weight)
        result = rtn(weight, spec.bits, spec.group_size, spec.sym, spec.clip_grid)
        del weight
        for key, value in pack_result(result, spec.bits).items():
            tensors[f"{info.name}.{key}"] = value.cpu()
        run.modules[info.name] = _module_record((info.out_features, info.in_features), spec, None,
                                                None, "rtn", error=float(result.error), error_kind="weight")
        del result
    return tensors, {"layer": layer}


# -- tensors outside the quantised modules --------------------------------------------------------
def _passthrough(run: _Run, layer: int) -> dict:
    """Every tensor of the layer but the attention and expert weights (written where they are solved)."""
    prefix = run.adapter.layer_prefix(layer)
    solved = {i.weight for i in run.adapter.layer_linears(layer) if i.kind in ("attention", "expert")}
    return {name: run.reader.get(name, check_finite=True) for name in run.reader.names
            if name.startswith(prefix) and name not in solved}


def _global_tensors(run: _Run, hidden: torch.Tensor | None) -> dict:
    a = run.adapter
    n_layers = a.config.num_layers
    layer_prefixes = tuple(a.layer_prefix(i) for i in range(n_layers))
    out = {}
    lm_spec = run.specs.get("lm_head")
    for name in run.reader.names:
        if name.startswith(layer_prefixes):
            continue
        if name == "lm_head.weight" and lm_spec is not None:
            continue
        out[name] = run.reader.get(name, check_finite=True)
    if lm_spec is not None:
        weight = run.reader.get("lm_head.weight", dtype=torch.float32, device=run.device, check_finite=True)
        hess = None
        if hidden is not None:
            acc = HessianAccumulator(1, a.config.hidden_size, run.device)
            norm = run.reader.get(a.final_norm_name, dtype=torch.float32, device=run.device)
            for xc in torch.split(hidden, run.batch):
                acc.add(a.norm(xc, norm).reshape(-1, a.config.hidden_size))
            hess = acc.hessian(inplace=True)
        tokens = int(hidden.shape[0] * hidden.shape[1]) if hidden is not None else None
        _solve(run, ["lm_head"], weight[None], hess, out, [tokens or 0], [None])
    return out


# -- records, metadata and resume state ------------------------------------------------------------
def _finish_record(run: _Run, source: Path, calib_info: dict | None, method: str | None, started: float) -> dict:
    a = run.adapter
    all_infos = [i for layer in range(a.config.num_layers) for i in a.layer_linears(layer)] + a.global_linears()
    for info in all_infos:
        if info.name not in run.modules and (info.kind != "lm_head" or run.reader.has(info.weight)):
            run.modules[info.name] = _module_record((info.out_features, info.in_features), None, None, None)
        if info.name in run.modules:
            run.modules[info.name] = {"kind": info.kind, **run.modules[info.name]}
    source_params = sum(run.reader.numel(n) for n in run.reader.names)
    quant_params = sum(i.numel for i in all_infos if run.specs.get(i.name) is not None)
    out_bytes = sum(run.writer.shard_path(k).stat().st_size
                    for k in [_layer_key(i) for i in range(a.config.num_layers)] + [_GLOBALS_KEY])
    quant_bits = sum(packed_bits(i.out_features, i.in_features, s.bits, s.group_size)
                     for i in all_infos if (s := run.specs.get(i.name)) is not None)
    by_group: dict[str, dict] = {}
    for info in all_infos:
        spec = run.specs.get(info.name)
        g = by_group.setdefault(info.kind, {"modules": 0, "parameters": 0, "bits": {}, "error_sum": 0.0,
                                            "errors": 0})
        g["modules"] += 1
        g["parameters"] += info.numel
        key = str(16 if spec is None else spec.bits)
        g["bits"][key] = g["bits"].get(key, 0) + 1
        err = run.modules.get(info.name, {}).get("error")
        if err is not None:
            g["error_sum"] += err
            g["errors"] += 1
    groups = {k: {"modules": v["modules"], "parameters": v["parameters"], "bits": v["bits"],
                  "mean_error": round(v["error_sum"] / v["errors"], 6) if v["errors"] else None}
              for k, v in by_group.items()}
    source_bytes = run.reader.total_bytes()
    starved = [{"layer": r["layer"], "expert": e, "tokens": r["routing_histogram"][e], "policy": r["calibration_policy"]}
               for r in run.layers for e in r.get("starved_experts", [])]
    return {
        "moequant_version": __version__,
        "format": "gptq",
        "checkpoint_format": "gptq",
        "source": str(source),
        "architecture": (run.reader.config.get("architectures") or [a.family])[0],
        "recipe": {"name": run.recipe.name, "fingerprint": run.recipe.fingerprint(), "file": RECIPE_FILE},
        "method_override": method,
        "settings": {"act_order": run.recipe.act_order, "damp": run.recipe.damp, "block_size": run.recipe.block_size,
                     "min_tokens": run.recipe.min_tokens, "expert_calibration": run.recipe.expert_calibration,
                     "hessian_weighting": run.recipe.hessian_weighting},
        "calibration": calib_info,
        "totals": {
            "parameters": source_params,
            "quantised_parameters": quant_params,
            "bytes": out_bytes,
            "source_bytes": source_bytes,
            "bits_per_weight": round(8 * out_bytes / max(source_params, 1), 4),
            "bits_per_weight_quantised": round(quant_bits / max(quant_params, 1), 4),
            "compression_ratio": round(source_bytes / max(out_bytes, 1), 4),
        },
        "groups": groups,
        "starved_experts": starved,
        "engine_limits": engine_limits(a, {n: (s.bits, s.group_size, s.sym) for n, s in run.specs.items()
                                           if s is not None}),
        "layers": [{k: v for k, v in r.items() if k not in ("time_s", "phases_s")} for r in run.layers],
        "modules": dict(sorted(run.modules.items(), key=lambda kv: _natural(kv[0]))),
        "timing": {"total_s": round(time.perf_counter() - started, 3), "device": str(run.device),
                   "layers_s": [r.get("time_s") for r in run.layers],
                   "layer_phases_s": [r.get("phases_s") for r in run.layers]},
    }


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _write_metadata(run: _Run, source: Path, record: dict) -> None:
    config = dict(run.reader.config)
    quant_specs = {n: s for n, s in run.specs.items()
                   if not n.endswith(".gate") and n != "model.embed_tokens" and (n != "lm_head" or s is not None)}
    config["quantization_config"] = quantization_config(
        quant_specs, __version__, run.recipe.name, run.recipe.damp, run.recipe.act_order,
        lm_head=run.specs.get("lm_head") is not None, others=[n for n in run.specs if n not in quant_specs],
    )
    run.writer.write_json("config.json", config)
    run.writer.write_json(QUANT_CONFIG_FILES[0], config["quantization_config"])
    run.writer.write_json(RECORD_FILE, record)
    run.writer.write_text(RECIPE_FILE, run.recipe.to_yaml())
    for name in _COPY_FILES:
        if (source / name).is_file():
            run.writer.copy_file(source / name)


def _layer_key(layer: int) -> str:
    return f"layer-{layer:05d}"


def _getter(reader: CheckpointReader, device: torch.device):
    def get(name: str) -> torch.Tensor:
        return reader.get(name, dtype=torch.float32, device=device, check_finite=True)

    return get


def _check_tensors_present(reader: CheckpointReader, adapter: MixtralAdapter) -> None:
    for layer in range(adapter.config.num_layers):
        for info in adapter.layer_linears(layer):
            if not reader.has(info.weight):
                raise MoequantError(f"tensor {info.weight} is missing from the checkpoint at {reader.path}")
            shape = reader.shape(info.weight)
            if shape != (info.out_features, info.in_features):
                raise MoequantError(
                    f"tensor {info.weight} has shape {list(shape)}, config.json implies "
                    f"{[info.out_features, info.in_features]}"
                )
        for name in adapter.norm_names(layer):
            if not reader.has(name):
                raise MoequantError(f"tensor {name} is missing from the checkpoint at {reader.path}")
    for name in (adapter.embed_name, adapter.final_norm_name, adapter.lm_head_name):
        if not reader.has(name):
            raise MoequantError(f"tensor {name} is missing from the checkpoint at {reader.path}")


def _fingerprint(reader: CheckpointReader, recipe: Recipe, method: str | None, calib: CalibSettings | None) -> str:
    files = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in reader.files()]
    payload = json.dumps({"v": __version__, "config": reader.config, "files": files, "recipe": recipe.model_dump(),
                          "method": method, "calib": None if calib is None else vars(calib)}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _load_state(partial: Path, fingerprint: str) -> dict | None:
    state_file = partial / "resume" / "state.json"
    if not state_file.is_file():
        if partial.exists():
            shutil.rmtree(partial)
        return None
    state = json.loads(state_file.read_text())
    if state.get("fingerprint") != fingerprint:
        raise MoequantError(
            f"the partial run at {partial} used other settings or another source; rerun without --resume "
            "(with --overwrite) to start over"
        )
    return state


def _save_state(partial: Path, fingerprint: str, completed: int, run: _Run, calib_info: dict | None,
                hidden: torch.Tensor | None) -> None:
    resume_dir = partial / "resume"
    resume_dir.mkdir(exist_ok=True)
    if hidden is not None:
        tmp = resume_dir / "hidden.safetensors.tmp"
        save_file({"hidden": hidden.contiguous().cpu()}, str(tmp))
        tmp.replace(resume_dir / "hidden.safetensors")
    write_json_atomic(resume_dir / "state.json", {
        "fingerprint": fingerprint, "completed_layers": completed, "modules": run.modules, "layers": run.layers,
        "calibration": calib_info,
    })
