"""One decoder layer compressed: calibrated through the layer forward (GPTQ), or rounded tensor by tensor.

A calibrated layer follows the reference GPTQ sequential order. The layer forward of the
family runs on the quantised model's inputs and a :class:`Calibrator` settles each linear as
the forward reaches it: q/k/v (one Hessian from the normed input), o (from the attention output of
the quantised q/k/v), then the router routes the output of the quantised attention and every
expert is solved from the tokens its calibration policy gives it. The layer's output, computed
with the quantised weights, is the next layer's input.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from moequant.arch.base import QUANTISABLE_KINDS, Chunking, ExpertWeights, LayerObserver
from moequant.compression.experts import Routing, solve_experts
from moequant.compression.job import Job
from moequant.compression.parallel import deal, expert_cost, gather_records, share_experts
from moequant.compression.record import Record, module_record
from moequant.compression.solve import solve_modules
from moequant.quant.hessian import HessianAccumulator
from moequant.quant.pack import pack_result
from moequant.quant.rtn import rtn


class Calibrator(LayerObserver):
    """Quantises each linear of one layer from the inputs the layer forward shows it."""

    settles_weights = True

    def __init__(self, job: Job, record: Record, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        self.job, self.record, self.layer, self.tensors = job, record, layer, tensors
        self.routing: Routing | None = None
        self.owner: dict[int, int] = {}  # the rank that solves each expert, in an expert-parallel run
        self.shared_bytes = 0
        self.experts_s = 0.0  # wall time of solving (and sharing) the experts

    def stage(self, name: str) -> None:
        self.job.progress.stage(self.layer, name)

    def shared_input(self, names: list[str], weights: list[torch.Tensor],
                     inputs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        in_features = weights[0].shape[1]
        with self.job.phases("hessians"):
            acc = HessianAccumulator(1, in_features, self.job.device)
            for x in inputs:
                acc.add(x.reshape(-1, in_features))
            hessian = acc.hessian(inplace=True)
        tokens = [int(acc.tokens[0])]
        return [solve_modules(self.job, self.record, [name], w[None], hessian, self.tensors, tokens, [None])[0]
                for name, w in zip(names, weights, strict=True)]

    def routed(self, h: torch.Tensor, probs: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor) -> None:
        job, c = self.job, self.job.arch.config
        counts = torch.bincount(top_ids.flatten(), minlength=c.num_experts).tolist()
        starved = [e for e in range(c.num_experts) if counts[e] < job.recipe.min_tokens]
        self.routing = Routing(h, probs, top_ids, top_w, counts, starved)
        if job.group.world > 1:
            rows = {e: counts[e] + (h.shape[0] if e in starved and job.recipe.expert_calibration != "routed" else 0)
                    for e in range(c.num_experts)}
            self.owner = deal({e: expert_cost(r, c.hidden_size, c.intermediate_size) for e, r in rows.items()},
                              job.group.world)
            job.unread = {job.arch.expert_name(self.layer, e, role) + ".weight" for e, rank in self.owner.items()
                          if rank != job.group.rank for role in ("w1", "w3", "w2")
                          if job.specs[job.arch.expert_name(self.layer, e, role)] is not None}

    def experts(self, experts: dict[int, ExpertWeights]) -> None:
        started = time.perf_counter()
        self._experts(experts)
        self.experts_s += time.perf_counter() - started

    def _experts(self, experts: dict[int, ExpertWeights]) -> None:
        job = self.job
        if job.group.world == 1:
            solve_experts(job, self.record, self.layer, experts, self.routing, self.tensors)
            return
        mine = {e: w for e, w in experts.items() if self.owner[e] == job.group.rank}
        if mine:
            solve_experts(job, self.record, self.layer, mine, self.routing, self.tensors)
        names = {e: {role: job.arch.expert_name(self.layer, e, role) for role in ("w1", "w3", "w2")} for e in experts}
        shapes = {i.name: (i.out_features, i.in_features) for i in job.arch.layer_linears(self.layer)}
        with job.phases("share"):
            dequantised, sent = share_experts(job.group, {e: self.owner[e] for e in experts}, names, job.specs,
                                              shapes, self.tensors)
            self.shared_bytes += sent
            solved = [n for e in mine for n in names[e].values()]
            self.record.modules.update(gather_records(job.group, {n: self.record.modules[n] for n in solved}))
        for e, w in experts.items():
            if e in mine:
                continue
            for role, name in names[e].items():
                if name in dequantised:
                    setattr(w, role, dequantised[name].to(job.device))
                else:  # kept 16-bit: as read
                    self.tensors[name + ".weight"] = job.reader.get(name + ".weight")

    def layer_record(self) -> dict:
        r = self.routing
        if r is None:
            return {"layer": self.layer, "dense": True}
        out = {"layer": self.layer, "routing_histogram": r.counts, "starved_experts": r.starved,
               "calibration_policy": self.job.recipe.expert_calibration if r.starved else "routed",
               "experts_s": round(self.experts_s, 3)}
        if self.job.group.world > 1:
            out["shared_bytes"] = self.shared_bytes
        return out


def calibrated_layer(job: Job, record: Record, layer: int, x: torch.Tensor) -> tuple[dict, dict]:
    """Quantise layer ``layer`` on its calibration inputs ``x [S, L, H]``, which become its outputs (in place).

    Returns the layer's tensors as they are written, and its record.
    """
    a = job.arch
    job.unread = set()
    with job.phases("read"):
        tensors = passthrough(job, layer)
    cos, sin = a.rotary(x.shape[1], job.device)
    calibrator = Calibrator(job, record, layer, tensors)
    timed_before = sum(job.phases.seconds.values())
    started = time.perf_counter()
    a.layer_forward(x, layer, job.weights(), cos, sin, Chunking(job.windows), job.expert_batch, calibrator)
    timed_inside = sum(job.phases.seconds.values()) - timed_before
    job.phases.seconds["forward"] = max(0.0, time.perf_counter() - started - timed_inside)
    return tensors, calibrator.layer_record()


def rounded_layer(job: Job, record: Record, layer: int) -> tuple[dict, dict]:
    """RTN for every module of a layer, one tensor in memory at a time."""
    tensors = passthrough(job, layer)
    get = job.weights()
    for info in job.arch.layer_linears(layer):
        if info.kind == "router":
            continue
        spec = job.specs[info.name]
        shape = (info.out_features, info.in_features)
        if spec is None:
            tensors[info.weight] = job.reader.get(info.weight)
            record.modules[info.name] = module_record(shape, None)
            continue
        weight = get(info.weight)
        result = rtn(weight, spec.bits, spec.group_size, spec.sym, spec.clip_grid)
        del weight
        for key, value in pack_result(result, spec.bits).items():
            tensors[f"{info.name}.{key}"] = value.cpu()
        record.modules[info.name] = module_record(shape, spec, None, None, "rtn", error=float(result.error),
                                                  error_kind="weight")
        del result
    return tensors, {"layer": layer}


def passthrough(job: Job, layer: int) -> dict[str, torch.Tensor]:
    """Every tensor of the layer but the weights of quantisable linears (written where they are solved)."""
    prefix = job.arch.layer_prefix(layer)
    solved = {i.weight for i in job.arch.layer_linears(layer) if i.kind in QUANTISABLE_KINDS}
    return {name: job.reader.get(name, check_finite=True) for name in job.reader.names
            if name.startswith(prefix) and name not in solved}


def global_tensors(job: Job, record: Record, hidden: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors outside the layers; lm_head quantised when the recipe names it, on the final hidden
    states ``hidden [S, L, H]`` where there are any."""
    a = job.arch
    layer_prefixes = tuple(a.layer_prefix(i) for i in range(a.config.num_layers))
    lm_spec = job.specs.get("lm_head")
    out = {name: job.reader.get(name, check_finite=True) for name in job.reader.names
           if not name.startswith(layer_prefixes) and not (name == "lm_head.weight" and lm_spec is not None)}
    if lm_spec is not None:
        weight = job.reader.get("lm_head.weight", dtype=torch.float32, device=job.device, check_finite=True)
        hess = None
        if hidden is not None:
            acc = HessianAccumulator(1, a.config.hidden_size, job.device)
            norm = job.reader.get(a.final_norm_name, dtype=torch.float32, device=job.device)
            for xc in torch.split(hidden, job.windows):
                acc.add(a.norm(xc, norm).reshape(-1, a.config.hidden_size))
            hess = acc.hessian(inplace=True)
        tokens = int(hidden.shape[0] * hidden.shape[1]) if hidden is not None else 0
        solve_modules(job, record, ["lm_head"], weight[None], hess, out, [tokens], [None])
    return out
