"""What each candidate width would cost each module: measured layer by layer on the 16-bit model.

The cost of module ``m`` at ``b`` bits is the error GPTQ is expected to leave in the model's
output when it quantises ``m`` alone to ``b`` bits on the recipe's grid::

    c_m(b) = sum_t g_t^2 E||D d_t||^2 / r_t^2

``d_t`` is the change of the output of the block that holds ``m`` (the attention block for
q/k/v/o, the expert or MLP for gate/up/down) for token ``t``; ``g_t`` the router's weight of the
expert for that token (1 for attention and dense or shared MLPs), so an expert's cost counts how
often and how strongly the router uses it. An error joins the residual stream and stays there to
the final norm, which divides it by ``r_t`` (the root mean square of the token's last hidden
state) before the unembedding ``W_U [V, H]`` reads it: ``D = (W_U - mean row) diag(w_norm)``, its
rows centred because the softmax ignores what moves every logit alike, so errors in directions
the output does not read cost little.

For expert and MLP linears the expectation is taken in closed form
(:func:`moequant.budget.gain.expected_errors`): each weight's rounding error independent, of the
mean square rounding leaves in its group and row at ``b`` bits, moved by GPTQ along the Cholesky
factor of the module's Hessian (over all its tokens), and carried to first order through the
gated activation and the down projection. What a particular rounding happens to leave in the few
directions its inputs use is not measured: GPTQ rounds differently anyway. For attention
linears ``d_t`` is what rounding changes in the block's output, times ``rho_m``, GPTQ's expected
error over rounding's (:func:`moequant.budget.gain.gptq_gain`), the error counted by the token's
mean square entering the layer (standing for ``r_t^2``, not known until the last layer).

Experts routed fewer than the recipe's ``min_tokens`` also take every token weighted by the
router's probability for them. The model runs on the first calibration windows, at most
``WINDOW_TOKENS`` tokens and at most ``1 / WINDOW_SHARE`` of the windows, so that planning costs a
fraction of the compress run (every layer sees the 16-bit model's hidden states); each block's errors
are measured on at most ``SAMPLE_TOKENS`` of its tokens, scaled to all of them, and its Hessians
take all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moequant.arch.base import Chunking, ExpertWeights, LayerObserver
from moequant.budget.gain import (
    Factor,
    expected_errors,
    gptq_factor,
    gptq_gain,
    group_variance,
    identity_factor,
    shrunk,
    step_squares,
)
from moequant.compression.job import Job
from moequant.quant.rtn import rtn
from moequant.quant.types import QuantResult, QuantSpec

SAMPLE_TOKENS = 256
WINDOW_TOKENS = 8192
WINDOW_SHARE = 4
_MLP_KINDS = ("dense_mlp", "shared_expert")
_ROW_CHUNK = 8192


@dataclass
class _Errors:
    """The planned modules' errors as measured, read at the end: for each module the flat indices ``[t]`` of the
    tokens it was measured on, its output-read errors ``[t]`` at each width, the tokens each stands for and
    (attention linears) its ``rho``."""

    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)
    gain: dict[str, float] = field(default_factory=dict)

    def costs(self, last_hidden: torch.Tensor, eps: float) -> dict[str, dict[int, float]]:
        """``c_m(b)`` from the model's last hidden states ``[S, L, H]`` (before the final norm)."""
        ms = last_hidden.reshape(-1, last_hidden.shape[-1]).float().pow(2).mean(-1) + eps
        return {name: {b: self.gain.get(name, 1.0) * self.spread[name]
                       * float((err / ms[self.tokens[name]]).sum()) for b, err in by_width.items()}
                for name, by_width in self.errors.items()}


def rounded(weight: torch.Tensor, spec: QuantSpec, bits: int) -> QuantResult:
    """``weight [..., N, K]`` rounded to ``bits`` on ``spec``'s grid."""
    return rtn(weight, bits, spec.group_size, spec.sym, spec.clip_grid)


def output_reader(job: Job) -> torch.Tensor:
    """``D^T D [H, H]``: how the unembedding reads an error of the final norm's output, rows of ``W_U`` centred."""
    arch, reader = job.arch, job.reader
    norm = reader.get(arch.final_norm_name, dtype=torch.float32, device=job.device)
    unembed = reader.get(arch.lm_head_name, dtype=torch.float32, device=job.device)
    mean = unembed.mean(0)
    gram = torch.zeros(norm.numel(), norm.numel(), dtype=torch.float32, device=job.device)
    for start in range(0, unembed.shape[0], _ROW_CHUNK):
        rows = (unembed[start:start + _ROW_CHUNK] - mean) * norm
        gram += rows.T @ rows
    return gram


def measure_costs(job: Job, hidden: torch.Tensor, planned: dict[str, QuantSpec], widths: Iterable[int],
                  sample_tokens: int = SAMPLE_TOKENS) -> dict[str, dict[int, float]]:
    """``c_m(b)`` of every module named in ``planned`` (by its spec) at each of ``widths``.

    ``hidden [S, L, H]`` are the model's embeddings of the calibration windows, turned into each
    layer's output in turn (in place).
    """
    arch, widths = job.arch, tuple(widths)
    found = _Errors()
    read = output_reader(job)
    cos, sin = arch.rotary(hidden.shape[1], job.device)
    n_layers = arch.config.num_layers
    job.progress.begin(n_layers, "measuring widths")
    try:
        for layer in range(n_layers):
            job.progress.stage(layer, "attention")
            _attention_costs(job, layer, hidden, cos, sin, planned, widths, sample_tokens, read, found)
            entering = hidden.reshape(-1, hidden.shape[-1]).pow(2).mean(-1) + arch.config.rms_norm_eps
            meter = _Meter(job, layer, planned, widths, sample_tokens, read, found, entering)
            arch.layer_forward(hidden, layer, job.weights(), cos, sin, Chunking(job.windows), job.expert_batch, meter)
            job.progress.advance(layer)
    finally:
        job.progress.end()
    return found.costs(hidden, arch.config.rms_norm_eps)


def _read_errors(diff: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """``||D d_t||^2 [..., t]`` for ``diff [..., t, H]``."""
    return ((diff @ read) * diff).sum(-1)


class _Swap(LayerObserver):
    """Applies the linears ``swaps`` names rounded (name -> spec and width), every other as read."""

    settles_weights = True

    def __init__(self, swaps: dict[str, tuple[QuantSpec, int]]) -> None:
        self.swaps = swaps

    def shared_input(self, names: list[str], weights: list[torch.Tensor],
                     inputs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        return [rounded(w, *self.swaps[n]).dequantize() if n in self.swaps else w
                for n, w in zip(names, weights, strict=True)]


def _attention_costs(job: Job, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     planned: dict[str, QuantSpec], widths: tuple[int, ...], sample_tokens: int,
                     read: torch.Tensor, found: _Errors) -> None:
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
        tokens = torch.arange(windows * hidden.shape[1], device=hidden.device)
        for name in names:
            found.tokens[name], found.spread[name] = tokens, hidden.shape[0] / windows
            found.errors[name] = {b: _read_errors((attend(_Swap({name: (planned[name], b)})) - base)
                                                  .reshape(-1, hidden.shape[-1]), read) for b in widths}


@dataclass
class _Mlp:
    """One gated MLP to measure: its linears' names by role, weights, a sample of its inputs ``x [t, H]``, their
    flat token indices ``[t]``, the gain ``[t]`` its outputs join the residual with, and the tokens each
    sampled row stands for."""

    names: dict[str, str]
    w: ExpertWeights
    x: torch.Tensor
    tokens: torch.Tensor
    gain: torch.Tensor
    spread: float


class _Meter(LayerObserver):
    """Measures the planned linears of one layer as its forward reaches them, changing nothing: the expected errors
    of the MLP linears, and the attention linears' ``rho`` from their inputs."""

    settles_weights = True  # shows o_proj, down_proj and every expert

    def __init__(self, job: Job, layer: int, planned: dict[str, QuantSpec], widths: tuple[int, ...],
                 sample_tokens: int, read: torch.Tensor, found: _Errors, entering: torch.Tensor) -> None:
        self.job, self.layer, self.planned, self.widths = job, layer, planned, widths
        self.sample_tokens, self.read, self.found, self.entering = sample_tokens, read, found, entering
        dense: dict[str, dict[str, str]] = {}
        for info in job.arch.layer_linears(layer):
            if info.kind in _MLP_KINDS:
                dense.setdefault(info.kind, {})[info.role] = info.name
        # a dense or shared MLP's gate name -> its names by role, for those with a planned linear
        self.dense = {m["w1"]: m for m in dense.values() if any(n in planned for n in m.values())}
        self.routing: tuple[torch.Tensor, ...] | None = None
        self.held: tuple[dict[str, str], list[torch.Tensor], torch.Tensor] | None = None

    def shared_input(self, names: list[str], weights: list[torch.Tensor],
                     inputs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        if self.held is not None and names[0] == self.held[0]["w2"]:  # down, after gate and up
            mlp, (w1, w3), x = self.held
            self.held = None
            rows = _spread(x.shape[0], self.sample_tokens, x.device)
            mlps = [_Mlp(mlp, ExpertWeights(w1, w3, weights[0]), x[rows], rows,
                         torch.ones(rows.numel(), device=x.device), x.shape[0] / rows.numel())]
            self._expect(mlps, x[None])
        elif names[0] in self.dense:  # gate and up: their input, held until down
            self.held = (self.dense[names[0]], weights, torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]))
        elif any(n in self.planned for n in names):  # attention
            x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
            with self.job.phases("measure"):
                self._gains(names, weights, x)
        return weights

    def routed(self, h: torch.Tensor, probs: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor) -> None:
        self.routing = (h, probs, top_ids, top_w)

    def experts(self, experts: dict[int, ExpertWeights]) -> None:
        h, probs, top_ids, top_w = self.routing
        arch = self.job.arch
        mlps, inputs = [], []
        for e, w in experts.items():
            names = {role: arch.expert_name(self.layer, e, role) for role in ("w1", "w3", "w2")}
            if not any(n in self.planned for n in names.values()):
                continue
            token, slot = torch.where(top_ids == e)
            gain = top_w[token, slot]
            if token.numel() < self.job.recipe.min_tokens:  # starved: what the router would send it elsewhere
                everyone = torch.arange(h.shape[0], device=h.device)
                token, gain = torch.cat([token, everyone]), torch.cat([gain, probs[:, e]])
            inputs.append(h[token])
            rows = _spread(token.numel(), self.sample_tokens, h.device)
            mlps.append(_Mlp(names, w, h[token[rows]], token[rows], gain[rows], token.numel() / max(rows.numel(), 1)))
        if mlps:
            self._expect(mlps, _padded(inputs))

    def _expect(self, mlps: list[_Mlp], x: torch.Tensor) -> None:
        """The expected output-read errors of the planned linears of ``mlps`` on their sampled tokens at each width,
        as GPTQ would leave them with the Hessians of all their inputs ``x [M, T, H]`` (padded with zero rows)."""
        w = _stacked(mlps)
        with self.job.phases("measure"):
            hessians = {"w1": x.transpose(1, 2) @ x}
            hessians["w3"] = hessians["w1"]
            act = self.job.arch.gated(x @ w["w1"].transpose(1, 2), x @ w["w3"].transpose(1, 2))
            hessians["w2"] = act.transpose(1, 2) @ act
            del act
            inputs, reads, weight = self._reads(mlps, w)
            rows = torch.tensor([m.spread * m.x.shape[0] for m in mlps], device=x.device)
            factors: dict[tuple, Factor] = {}
            for role in ("w1", "w3", "w2"):
                by_spec: dict[QuantSpec, list[int]] = {}
                for i, m in enumerate(mlps):
                    if m.names[role] in self.planned:
                        by_spec.setdefault(self.planned[m.names[role]], []).append(i)
                for spec, members in by_spec.items():
                    at = torch.tensor(members, device=x.device)
                    k = inputs[role].shape[-1]
                    if spec.method == "gptq":  # gate and up share their input's factor
                        key = (role == "w2", spec.damp, spec.act_order, tuple(members))
                        if key not in factors:
                            factors[key] = gptq_factor(hessians[role][at], spec.damp, spec.act_order)
                        factor = factors[key]
                    else:
                        factor = identity_factor((len(members),), k, x.device)
                    variance = []
                    for b in self.widths:
                        r = rounded(w[role][at], spec, b)
                        variance.append(group_variance(r.dequantize() - w[role][at], r.g_idx))
                    errors = expected_errors(factor, inputs[role][at], reads[role][at], torch.stack(variance),
                                             r.g_idx, k / (rows[at] + k)) * weight[at]  # [widths, members, S]
                    for j, i in enumerate(members):
                        m = mlps[i]
                        name = m.names[role]
                        self.found.tokens[name], self.found.spread[name] = m.tokens, m.spread
                        self.found.errors[name] = {b: errors[v, j, :m.x.shape[0]] for v, b in enumerate(self.widths)}

    def _reads(self, mlps: list[_Mlp], w: dict[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """On the sampled tokens of ``mlps`` (padded to ``S``), by role: the linear's inputs ``[M, S, K]``, how the
        output reads each of its output channels ``[M, S, N]`` (its error carried on, to first order, through the
        activation and the down projection), and the router's weight squared ``[M, S]`` (0 on padding)."""
        longest = max(m.x.shape[0] for m in mlps)
        x = torch.stack([F.pad(m.x.float(), (0, 0, 0, longest - m.x.shape[0])) for m in mlps])  # [M, S, H]
        weight = torch.stack([F.pad(m.gain.float().pow(2), (0, longest - m.x.shape[0])) for m in mlps])
        with torch.enable_grad():
            gate = (x @ w["w1"].transpose(1, 2)).requires_grad_()
            up = (x @ w["w3"].transpose(1, 2)).requires_grad_()
            act = self.job.arch.gated(gate, up)
            d_gate, d_up = torch.autograd.grad(act.sum(), (gate, up))
        down = w["w2"].float()  # [M, H, N]
        inner = ((self.read @ down) * down).sum(1)[:, None]  # [M, 1, N]: diag(W2^T D^T D W2)
        reads = {"w1": d_gate.pow(2) * inner, "w3": d_up.pow(2) * inner,
                 "w2": self.read.diagonal().expand(len(mlps), longest, -1)}
        return {"w1": x, "w3": x, "w2": act.detach()}, reads, weight

    def _gains(self, names: list[str], weights: list[torch.Tensor], x: torch.Tensor) -> None:
        """``rho`` of each planned attention linear of ``names`` (weights ``[N, K]``) taking the inputs ``x [T, K]``,
        their errors counted by each token's mean square entering the layer (standing for the final one)."""
        x = x.float()
        hessian = x.T @ x
        moment = shrunk((x / self.entering[:, None]).T @ x, x.shape[0])
        factors: dict[tuple[float, bool], Factor] = {}  # q, k and v share their input's
        for name, weight in zip(names, weights, strict=True):
            spec = self.planned.get(name)
            if spec is not None and spec.method == "gptq":
                key = (spec.damp, spec.act_order)
                if key not in factors:
                    factors[key] = gptq_factor(hessian, *key)
                r = rounded(weight, spec, self.widths[0])
                self.found.gain[name] = float(gptq_gain(factors[key], moment, step_squares(r.scales, r.g_idx)))


def _stacked(mlps: list[_Mlp]) -> dict[str, torch.Tensor]:
    """The weights of ``mlps`` by role, each ``[M, N, K]``."""
    return {role: torch.stack([getattr(m.w, role) for m in mlps]) for role in ("w1", "w3", "w2")}


def _padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """``[E, T, ...]`` of tensors ``[t_e, ...]``, each padded with zeros to the longest."""
    longest = max(r.shape[0] for r in rows)
    return torch.stack([torch.cat([r, r.new_zeros((longest - r.shape[0], *r.shape[1:]))]) for r in rows])


def _spread(n: int, most: int, device: torch.device) -> torch.Tensor:
    """At most ``most`` indices spread evenly over ``range(n)``."""
    if n <= most:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, most, device=device).round().long()
