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
    """GPTQ's order of the input columns ``[K]`` and ``U [K, K]`` in that order (``None``: no factor exists)."""

    order: torch.Tensor
    u: torch.Tensor | None


def gptq_factor(hessian: torch.Tensor, damp: float, act_order: bool) -> Factor:
    """``U`` of ``hessian [K, K]`` as GPTQ takes it: dead columns set to 1, ``damp`` times the mean diagonal added."""
    h = hessian.float().clone()
    k = h.shape[0]
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    h += damp * float(h.diagonal().mean()) * torch.eye(k, dtype=h.dtype, device=h.device)
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order \
        else torch.arange(k, device=h.device)
    h = h[order][:, order]
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # not positive definite even damped
        u = None
    return Factor(order, u)


def shrunk(moment: torch.Tensor, rows: int) -> torch.Tensor:
    """``moment [K, K]`` of ``rows`` rows shrunk toward its diagonal by ``K / (rows + K)``."""
    k = moment.shape[0]
    shrink = k / (rows + k)
    return (1 - shrink) * moment.float() + shrink * torch.diag(moment.float().diagonal())


def step_squares(scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``s_j^2 [K]``: the mean over rows of the squared step of each column's group (``scales [G, N]``)."""
    return scales.float().pow(2).mean(-1).index_select(0, g_idx.long())


def gptq_gain(factor: Factor, moment: torch.Tensor, steps: torch.Tensor) -> float:
    """``rho`` from GPTQ's :class:`Factor`, the second moment ``moment [K, K]`` the error is counted against and
    :func:`step_squares` ``[K]``; 1 where the module sees no input or no factor exists, at most 1."""
    o = factor.order
    m = moment.float()[o][:, o]
    s = steps.float()[o]
    rounding = float((s * m.diagonal().clamp_min(0)).sum())
    if rounding <= 0 or factor.u is None:
        return 1.0
    u = factor.u
    left = ((u @ m) * u).sum(-1) / u.diagonal().pow(2)
    return min(1.0, float((s * left).sum()) / rounding)
