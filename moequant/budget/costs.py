"""What each candidate width would cost each module: measured layer by layer on the 16-bit model.

The cost of module ``m`` at ``b`` bits is the error it alone adds to the model's output when
rounded to ``b`` bits (RTN on the recipe's grid), times the part of it GPTQ would leave::

    c_m(b) = rho_m * sum_t g_t^2 ||D d_t||^2 / r_t^2,     d_t = y_t(Q_b(W_m)) - y_t(W_m)

``y_t`` is the output of the block that holds ``m`` (the attention block for q/k/v/o, the expert or
MLP for gate/up/down) for token ``t``; ``g_t`` the router's weight of the expert for that token (1
for attention and dense or shared MLPs), so an expert's cost counts how often and how strongly the
router uses it. An error joins the residual stream and stays there to the final norm, which
divides it by ``r_t`` (the root mean square of the token's last hidden state) before the
unembedding ``W_U [V, H]`` reads it: ``D = (W_U - mean row) diag(w_norm)``, its rows centred
because the softmax ignores what moves every logit alike, so errors in directions the output
does not read cost little. ``rho_m`` is GPTQ's expected error over rounding's
(:mod:`moequant.budget.gain`) from the module's Hessian over its tokens, the error counted by
``g_t^2`` over the token's mean square entering the layer (standing for ``r_t^2``, not known
until the last layer); 1 for modules the recipe rounds. One ``rho_m``, taken at the narrowest
width, serves them all: a grid's steps scale alike in all its groups from one width to the next
(but for what a clipping search changes).

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
from moequant.budget.gain import Factor, gptq_factor, gptq_gain, shrunk, step_squares
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
    its ``rho``."""

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
    """Measures the planned linears of one layer as its forward reaches them, changing nothing: the errors of
    the MLP linears, and every planned linear's ``rho`` from its inputs."""

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
        self.held: tuple[dict[str, str], list[torch.Tensor], torch.Tensor, torch.Tensor, int] | None = None

    def shared_input(self, names: list[str], weights: list[torch.Tensor],
                     inputs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        if not any(n in self.planned for n in names) and names[0] not in self.dense:
            return weights
        x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
        if any(n in self.planned for n in names):
            with self.job.phases("measure"):
                self._gains([[n] for n in names], [wt[None] for wt in weights], x[None],
                            torch.tensor([x.shape[0]], device=x.device), (1 / self.entering)[None])
        if self.held is not None and names[0] == self.held[0]["w2"]:  # down, after gate and up
            mlp, (w1, w3), sample, tokens, total = self.held
            self.held = None
            mlps = [_Mlp(mlp, ExpertWeights(w1, w3, weights[0]), sample, tokens,
                         torch.ones(sample.shape[0], device=x.device), total / sample.shape[0])]
            self._measure(mlps, _stacked(mlps))
        elif names[0] in self.dense:  # gate and up: a sample of their input, held until down
            rows = _spread(x.shape[0], self.sample_tokens, x.device)
            self.held = (self.dense[names[0]], weights, x[rows], rows, x.shape[0])
        return weights

    def routed(self, h: torch.Tensor, probs: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor) -> None:
        self.routing = (h, probs, top_ids, top_w)

    def experts(self, experts: dict[int, ExpertWeights]) -> None:
        h, probs, top_ids, top_w = self.routing
        arch = self.job.arch
        mlps, inputs, counted = [], [], []
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
            counted.append(gain.float().pow(2) / self.entering[token])
            rows = _spread(token.numel(), self.sample_tokens, h.device)
            mlps.append(_Mlp(names, w, h[token[rows]], token[rows], gain[rows], token.numel() / max(rows.numel(), 1)))
        if not mlps:
            return
        with self.job.phases("measure"):
            rows = torch.tensor([x.shape[0] for x in inputs], device=h.device)
            x = _padded(inputs)
            c = _padded(counted)
            w = _stacked(mlps)
            names = {role: [m.names[role] for m in mlps] for role in w}
            self._gains([names["w1"], names["w3"]], [w["w1"], w["w3"]], x, rows, c)
            act = arch.gated(x @ w["w1"].transpose(1, 2), x @ w["w3"].transpose(1, 2))
            self._gains([names["w2"]], [w["w2"]], act, rows, c)
            del x, act
        self._measure(mlps, w)

    def _gains(self, names: list[list[str]], weights: list[torch.Tensor], x: torch.Tensor, rows: torch.Tensor,
               counted: torch.Tensor) -> None:
        """``rho`` of the planned ``names[i][e]`` among the linears ``weights[i] [E, N, K]`` that take the inputs
        ``x [E, T, K]`` (the first ``rows [E]`` of each), their errors counted by ``counted [E, T]`` (the router's
        weight squared over the token's mean square entering the layer, standing for the final one)."""
        x = x.float()
        hessian = x.transpose(1, 2) @ x
        moment = shrunk((x * counted[..., None]).transpose(1, 2) @ x, rows)
        factors: dict[tuple[float, bool], tuple[list[int], Factor]] = {}
        for role_names, weight in zip(names, weights, strict=True):
            by_spec: dict[QuantSpec, list[int]] = {}
            for e, name in enumerate(role_names):
                spec = self.planned.get(name)
                if spec is not None and spec.method == "gptq":
                    by_spec.setdefault(spec, []).append(e)
            for spec, members in by_spec.items():
                key = (spec.damp, spec.act_order)
                if key not in factors or factors[key][0] != members:
                    factors[key] = (members, gptq_factor(hessian[members], *key))
                r = rounded(weight[members], spec, self.widths[0])
                rho = gptq_gain(factors[key][1], moment[members], step_squares(r.scales, r.g_idx)).tolist()
                for e, value in zip(members, rho, strict=True):
                    self.found.gain[role_names[e]] = value

    def _measure(self, mlps: list[_Mlp], w: dict[str, torch.Tensor]) -> None:
        """The errors of the planned linears of ``mlps`` (their weights ``w`` by role, :func:`_stacked`): each role
        rounded at each width, all MLPs at once (their samples padded with rows that weigh nothing)."""
        gated = self.job.arch.gated
        with self.job.phases("measure"):
            rows = max(m.x.shape[0] for m in mlps)
            x = torch.stack([F.pad(m.x, (0, 0, 0, rows - m.x.shape[0])) for m in mlps])  # [M, T, H]
            weight = torch.stack([F.pad(m.gain.float().pow(2), (0, rows - m.x.shape[0])) for m in mlps])  # [M, T]
            gate, up = x @ w["w1"].transpose(1, 2), x @ w["w3"].transpose(1, 2)
            act = gated(gate, up)
            for role in ("w1", "w3", "w2"):
                by_spec: dict[QuantSpec, list[int]] = {}
                for i, m in enumerate(mlps):
                    if m.names[role] in self.planned:
                        by_spec.setdefault(self.planned[m.names[role]], []).append(i)
                for spec, members in by_spec.items():
                    at = torch.tensor(members, device=x.device)
                    down = w["w2"][at].transpose(1, 2)
                    for b in self.widths:
                        q = rounded(w[role][at], spec, b).dequantize().transpose(1, 2)
                        if role == "w2":
                            diff = act[at] @ (q - down)
                        else:
                            changed = gated(x[at] @ q, up[at]) if role == "w1" else gated(gate[at], x[at] @ q)
                            diff = (changed - act[at]) @ down
                        errors = _read_errors(diff, self.read) * weight[at]
                        for j, i in enumerate(members):
                            m = mlps[i]
                            name = m.names[role]
                            self.found.tokens[name], self.found.spread[name] = m.tokens, m.spread
                            self.found.errors.setdefault(name, {})[b] = errors[j, :m.x.shape[0]]
                        del q, diff


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
