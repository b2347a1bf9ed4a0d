"""How much smaller GPTQ's output error is than rounding's, from a module's Hessian alone.

GPTQ quantises the columns of ``W [N, K]`` one at a time, in its order (descending ``diag(H)``
under act order), and moves each column's error onto the columns after it along the rows of
``U``, the upper Cholesky factor of its damped inverse Hessian (``(H + lambda I)^-1 = U^T U``).
What it leaves is ``dW = E U`` with ``E_ij = r_ij / U_jj``, ``r_ij`` the rounding error at column
``j``. Taking each ``r_ij`` as independent and uniform over its step, with ``s_j^2`` the mean
over the rows of the squared step at column ``j``, the expected error against a second moment
``M`` of the inputs is::

    rounding:  sum_j s_j^2 M_jj
    GPTQ:      sum_j s_j^2 (U M U^T)_jj / U_jj^2          (columns in GPTQ's order)

and :func:`gptq_gain` is their ratio ``rho``. ``M`` is the inputs' second moment weighted as the
error will be counted (by the router's weight of each token, say). A sample of ``n`` rows shows
GPTQ correlations that new inputs do not all share, so ``M`` is the sample's shrunk toward its
diagonal by ``K / (n + K)`` (:func:`shrunk`): many rows, the sample itself; few, only its
diagonal, which GPTQ's moves do not help.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factor:
    """GPTQ's order of the input columns ``[..., K]``, ``U [..., K, K]`` in that order, and whether it exists
    ``[...]`` (the damped Hessian positive definite)."""

    order: torch.Tensor
    u: torch.Tensor
    ok: torch.Tensor


def gptq_factor(hessian: torch.Tensor, damp: float, act_order: bool) -> Factor:
    """``U`` of each ``hessian [..., K, K]`` as GPTQ takes it: dead columns set to 1, ``damp`` times the mean
    diagonal added."""
    h = hessian.float().clone()
    k = h.shape[-1]
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag[diag <= 0] = 1.0
    diag += damp * diag.mean(-1, keepdim=True)
    if act_order:
        order = torch.argsort(diag, dim=-1, descending=True, stable=True)
    else:
        order = torch.arange(k, device=h.device).expand(h.shape[:-1])
    lower, info = torch.linalg.cholesky_ex(_permuted(h, order))
    ok = info == 0
    lower[~ok] = torch.eye(k, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    return Factor(order, u, ok)


def shrunk(moment: torch.Tensor, rows: int | torch.Tensor) -> torch.Tensor:
    """Each ``moment [..., K, K]`` of ``rows`` (``int`` or ``[...]``) rows shrunk toward its diagonal by
    ``K / (rows + K)``."""
    m = moment.float()
    k = m.shape[-1]
    shrink = k / (torch.as_tensor(rows, dtype=m.dtype, device=m.device) + k)
    shrink = shrink[..., None, None]
    return (1 - shrink) * m + shrink * torch.diag_embed(m.diagonal(dim1=-2, dim2=-1))


def step_squares(scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``s_j^2 [..., K]``: the mean over rows of the squared step of each column's group (``scales [..., G, N]``)."""
    return scales.float().pow(2).mean(-1).index_select(-1, g_idx.long())


def gptq_gain(factor: Factor, moment: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``rho [...]`` from GPTQ's :class:`Factor`, the second moment ``moment [..., K, K]`` the error is counted
    against and :func:`step_squares` ``[..., K]``: at most 1, and 1 where a module sees no input or has no factor."""
    m = _permuted(moment.float(), factor.order)
    s = steps.float().gather(-1, factor.order)
    u = factor.u
    rounding = (s * m.diagonal(dim1=-2, dim2=-1).clamp_min(0)).sum(-1)
    left = ((u @ m) * u).sum(-1) / u.diagonal(dim1=-2, dim2=-1).pow(2)
    rho = (s * left).sum(-1) / rounding.clamp_min(torch.finfo(rounding.dtype).tiny)
    return torch.where((rounding > 0) & factor.ok, rho.clamp(max=1.0), torch.ones_like(rho))


def _permuted(m: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``m[..., order, :][..., :, order]`` for ``m [..., K, K]`` and ``order [..., K]``."""
    m = m.gather(-1, order[..., None, :].expand_as(m))
    return m.gather(-2, order[..., :, None].expand_as(m))
