"""What each candidate width would cost each module: measured layer by layer on the 16-bit model.

The cost of module ``m`` at ``b`` bits is the error it adds to the residual stream when it alone
is rounded to ``b`` bits (RTN on the recipe's grid), summed over the calibration tokens::

    c_m(b) = sum_t g_t^2 ||y_t(Q_b(W_m)) - y_t(W_m)||^2

``y_t`` is the output of the block that holds ``m`` (the attention block for q/k/v/o, the expert or
MLP for gate/up/down) for token ``t`` and ``g_t`` the router's weight of the expert for that token
(1 for attention and dense or shared MLPs), so an expert's cost counts how often and how strongly
the router uses it, and every module's cost is in the one currency of the residual stream.
Experts routed fewer than the recipe's ``min_tokens`` also take every token weighted by the
router's probability for them. The model runs on the first calibration windows, up to
``WINDOW_TOKENS`` tokens (every layer sees the 16-bit model's hidden states), and each block's
errors are measured on at most ``SAMPLE_TOKENS`` of its tokens, scaled to all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moequant.arch.base import Chunking, ExpertWeights, LayerObserver
from moequant.compression.job import Job
from moequant.quant.rtn import rtn
from moequant.quant.types import QuantSpec

SAMPLE_TOKENS = 512
WINDOW_TOKENS = 8192
_MLP_KINDS = ("dense_mlp", "shared_expert")


def rounded(weight: torch.Tensor, spec: QuantSpec, bits: int) -> torch.Tensor:
    """``weight [..., N, K]`` rounded to ``bits`` on ``spec``'s grid, dequantised (float32)."""
    return rtn(weight, bits, spec.group_size, spec.sym, spec.clip_grid).dequantize()


def measure_costs(job: Job, hidden: torch.Tensor, planned: dict[str, QuantSpec], widths: Iterable[int],
                  sample_tokens: int = SAMPLE_TOKENS) -> dict[str, dict[int, float]]:
    """``c_m(b)`` of every module named in ``planned`` (by its spec) at each of ``widths``.

    ``hidden [S, L, H]`` are the model's embeddings of the calibration windows, turned into each
    layer's output in turn (in place).
    """
    arch, widths = job.arch, tuple(widths)
    costs: dict[str, dict[int, float]] = {}
    cos, sin = arch.rotary(hidden.shape[1], job.device)
    n_layers = arch.config.num_layers
    job.progress.begin(n_layers, "measuring widths")
    try:
        for layer in range(n_layers):
            job.progress.stage(layer, "attention")
            _attention_costs(job, layer, hidden, cos, sin, planned, widths, sample_tokens, costs)
            meter = _Meter(job, layer, planned, widths, sample_tokens, costs)
            arch.layer_forward(hidden, layer, job.weights(), cos, sin, Chunking(job.windows), job.expert_batch, meter)
            job.progress.advance(layer)
    finally:
        job.progress.end()
    return costs


class _Swap(LayerObserver):
    """Applies the linears ``swaps`` names rounded (name -> spec and width), every other as read."""

    settles_weights = True

    def __init__(self, swaps: dict[str, tuple[QuantSpec, int]]) -> None:
        self.swaps = swaps

    def shared_input(self, names: list[str], weights: list[torch.Tensor],
                     inputs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        return [rounded(w, *self.swaps[n]) if n in self.swaps else w for n, w in zip(names, weights, strict=True)]


def _attention_costs(job: Job, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     planned: dict[str, QuantSpec], widths: tuple[int, ...], sample_tokens: int,
                     costs: dict[str, dict[int, float]]) -> None:
    """Each planned attention linear of ``layer`` rounded alone: the change of the attention block's output on
    the first windows of ``hidden [S, L, H]``, scaled to all windows."""
    arch = job.arch
    names = [i.name for i in arch.layer_linears(layer) if i.kind == "attention" and i.name in planned]
    if not names:
        return
    weights = arch.read_layer(job.weights(), layer)
    windows = max(1, min(hidden.shape[0], sample_tokens // hidden.shape[1]))
    sample = hidden[:windows]

    def attend(observer: LayerObserver) -> torch.Tensor:
        out = sample.clone()
        copied = dataclasses.replace(weights, extra=dict(weights.extra), bias=dict(weights.bias))
        arch.attention_block(torch.split(out, job.windows), layer, copied, cos, sin, observer)
        return out

    with job.phases("measure"):
        base = attend(_Swap({}))
        for name in names:
            costs[name] = {b: float((attend(_Swap({name: (planned[name], b)})) - base).pow(2).sum())
                           * hidden.shape[0] / windows for b in widths}


@dataclass
class _Mlp:
    """One gated MLP to measure: its linears' names by role, weights, a sample of its inputs ``x [t, H]``, the
    gain ``[t]`` its outputs join the residual with, and the tokens each sampled row stands for."""

    names: dict[str, str]
    w: ExpertWeights
    x: torch.Tensor
    gain: torch.Tensor
    spread: float


class _Meter(LayerObserver):
    """Measures the planned MLP linears of one layer as its forward reaches them, changing nothing."""

    settles_weights = True  # shows o_proj, down_proj and every expert

    def __init__(self, job: Job, layer: int, planned: dict[str, QuantSpec], widths: tuple[int, ...],
                 sample_tokens: int, costs: dict[str, dict[int, float]]) -> None:
        self.job, self.layer, self.planned, self.widths = job, layer, planned, widths
        self.sample_tokens, self.costs = sample_tokens, costs
        dense: dict[str, dict[str, str]] = {}
        for info in job.arch.layer_linears(layer):
            if info.kind in _MLP_KINDS:
                dense.setdefault(info.kind, {})[info.role] = info.name
        # a dense or shared MLP's gate name -> its names by role, for those with a planned linear
        self.dense = {m["w1"]: m for m in dense.values() if any(n in planned for n in m.values())}
        self.routing: tuple[torch.Tensor, ...] | None = None
        self.held: tuple[dict[str, str], list[torch.Tensor], torch.Tensor, int] | None = None

    def shared_input(self, names: list[str], weights: list[torch.Tensor],
                     inputs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        if self.held is not None and names[0] == self.held[0]["w2"]:  # down, after gate and up
            mlp, (w1, w3), x, total = self.held
            self.held = None
            self._measure([_Mlp(mlp, ExpertWeights(w1, w3, weights[0]), x, torch.ones(x.shape[0], device=x.device),
                                total / x.shape[0])])
        elif names[0] in self.dense:  # gate and up: a sample of their input, held until down
            x = torch.cat(list(inputs))
            self.held = (self.dense[names[0]], weights, x[_spread(x.shape[0], self.sample_tokens, x.device)],
                         x.shape[0])
        return weights

    def routed(self, h: torch.Tensor, probs: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor) -> None:
        self.routing = (h, probs, top_ids, top_w)

    def experts(self, experts: dict[int, ExpertWeights]) -> None:
        h, probs, top_ids, top_w = self.routing
        arch = self.job.arch
        mlps = []
        for e, w in experts.items():
            names = {role: arch.expert_name(self.layer, e, role) for role in ("w1", "w3", "w2")}
            if not any(n in self.planned for n in names.values()):
                continue
            token, slot = torch.where(top_ids == e)
            gain = top_w[token, slot]
            if token.numel() < self.job.recipe.min_tokens:  # starved: what the router would send it elsewhere
                everyone = torch.arange(h.shape[0], device=h.device)
                token, gain = torch.cat([token, everyone]), torch.cat([gain, probs[:, e]])
            rows = _spread(token.numel(), self.sample_tokens, h.device)
            mlps.append(_Mlp(names, w, h[token[rows]], gain[rows], token.numel() / max(rows.numel(), 1)))
        self._measure(mlps)

    def _measure(self, mlps: list[_Mlp]) -> None:
        """The costs of the planned linears of ``mlps``: each role rounded at each width, all MLPs at once."""
        gated = self.job.arch.gated
        with self.job.phases("measure"):
            gate = [F.linear(m.x, m.w.w1) for m in mlps]
            up = [F.linear(m.x, m.w.w3) for m in mlps]
            act = [gated(g, u) for g, u in zip(gate, up, strict=True)]
            weight = [m.gain.float().pow(2)[:, None] for m in mlps]
            for role in ("w1", "w3", "w2"):
                by_spec: dict[QuantSpec, list[int]] = {}
                for i, m in enumerate(mlps):
                    if m.names[role] in self.planned:
                        by_spec.setdefault(self.planned[m.names[role]], []).append(i)
                for spec, members in by_spec.items():
                    stacked = torch.stack([getattr(mlps[i].w, role) for i in members])
                    for b in self.widths:
                        q = rounded(stacked, spec, b)
                        for j, i in enumerate(members):
                            m = mlps[i]
                            if role == "w2":
                                diff = F.linear(act[i], q[j] - m.w.w2)
                            else:
                                changed = gated(F.linear(m.x, q[j]), up[i]) if role == "w1" else \
                                    gated(gate[i], F.linear(m.x, q[j]))
                                diff = F.linear(changed - act[i], m.w.w2)
                            self.costs.setdefault(m.names[role], {})[b] = \
                                float((diff.pow(2) * weight[i]).sum()) * m.spread
                        del q


def _spread(n: int, most: int, device: torch.device) -> torch.Tensor:
    """At most ``most`` indices spread evenly over ``range(n)``."""
    if n <= most:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, most, device=device).round().long()
