"""Calibrating experts: which tokens build each expert's Hessian, and the policy for starved experts.

An expert routed fewer than ``min_tokens`` calibration tokens is *starved*; the recipe's
``expert_calibration`` says how it is calibrated: ``routed`` (its routed tokens only; with none
it is rounded to nearest), ``augmented`` (its routed tokens plus every token weighted by the
router's probability for it) or ``all`` (every token, unweighted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moequant.arch.base import ExpertWeights
from moequant.compression.job import Job
from moequant.compression.policy import ALL, AUGMENTED, NO_TOKENS, ROUTED, Policy
from moequant.compression.record import Record
from moequant.compression.solve import solve_modules
from moequant.quant.hessian import HessianAccumulator

_ROWS_PER_ADD = 1 << 16


@dataclass
class Routing:
    """One layer's routing of its calibration tokens ``h [T, H]``: ``probs [T, E]``, ``top_ids [T, k]``,
    ``top_w [T, k]``, tokens routed per expert and the starved experts."""

    h: torch.Tensor
    probs: torch.Tensor
    top_ids: torch.Tensor
    top_w: torch.Tensor
    counts: list[int]
    starved: list[int]


def calibration_rows(job: Job, e: int, r: Routing) -> tuple[torch.Tensor, torch.Tensor | None, Policy]:
    """Rows of ``r.h`` that calibrate expert ``e``, their weights (``None``: all 1), and the policy applied."""
    token, slot = torch.where(r.top_ids == e)
    weights = r.top_w[token, slot] if job.recipe.hessian_weighting == "router" else None
    if e not in r.starved or job.recipe.expert_calibration == "routed":
        return token, weights, ROUTED if token.numel() else NO_TOKENS
    everyone = torch.arange(r.h.shape[0], device=r.h.device)
    if job.recipe.expert_calibration == "all":
        return everyone, None, ALL
    routed_w = weights if weights is not None else torch.ones(token.numel(), device=r.h.device)
    return torch.cat([token, everyone]), torch.cat([routed_w, r.probs[:, e]]), AUGMENTED


def solve_experts(job: Job, record: Record, layer: int, experts: dict[int, ExpertWeights], r: Routing,
                  tensors: dict[str, torch.Tensor]) -> None:
    """Quantise a batch of experts together; their weights in ``experts`` become the dequantised ones.

    w1 and w3 share one Hessian per expert, from its calibration rows of ``r.h``; w2's comes from
    the same rows through the expert's quantised w1 and w3.
    """
    a = job.arch
    c = a.config
    group = sorted(experts)
    rows = [calibration_rows(job, e, r) for e in group]
    with job.phases("hessians"):
        acc = HessianAccumulator(len(group), c.hidden_size, job.device)
        for i, (idx, wt, _) in enumerate(rows):
            for part_idx, part_w in _row_chunks(idx, wt):
                acc.add(r.h[part_idx], i, part_w)
        h13 = acc.hessian(inplace=True)
    routed = [r.counts[e] for e in group]
    policies = [p for _, _, p in rows]
    for role in ("w1", "w3"):
        stacked = torch.stack([getattr(experts[e], role) for e in group])
        names = [a.expert_name(layer, e, role) for e in group]
        deq = solve_modules(job, record, names, stacked, h13, tensors, routed, policies)
        for i, e in enumerate(group):
            setattr(experts[e], role, deq[i])
    del h13, acc
    with job.phases("hessians"):
        acc = HessianAccumulator(len(group), c.intermediate_size, job.device)
        for i, (idx, wt, _) in enumerate(rows):
            ew = experts[group[i]]
            for part_idx, part_w in _row_chunks(idx, wt):
                hx = r.h[part_idx]
                acc.add(a.gated(F.linear(hx, ew.w1), F.linear(hx, ew.w3)), i, part_w)
    stacked = torch.stack([experts[e].w2 for e in group])
    names = [a.expert_name(layer, e, "w2") for e in group]
    deq = solve_modules(job, record, names, stacked, acc.hessian(inplace=True), tensors, routed, policies)
    for i, e in enumerate(group):
        experts[e].w2 = deq[i]


def _row_chunks(idx: torch.Tensor, weights: torch.Tensor | None):
    for s in range(0, idx.numel(), _ROWS_PER_ADD):
        yield idx[s : s + _ROWS_PER_ADD], None if weights is None else weights[s : s + _ROWS_PER_ADD]
