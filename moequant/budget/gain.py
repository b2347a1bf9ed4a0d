"""GPTQ's expected output error, from a module's Hessian and its rounding grid alone.

GPTQ quantises the columns of ``W [N, K]`` one at a time, in its order (descending ``diag(H)``
under act order), and moves each column's error onto the columns after it along the rows of
``U``, the upper Cholesky factor of its damped inverse Hessian (``(H + lambda I)^-1 = U^T U``).
What it leaves is ``dW = E U`` with ``E_ij = r_ij / U_jj``, ``r_ij`` the rounding error at column
``j``. Taking the ``r_ij`` as independent, of variance ``v_ij``, the expected error on an input
``x`` (columns in GPTQ's order) is::

    E (dW_i x)^2 = sum_j v_ij (U x)_j^2 / U_jj^2          rounding alone: sum_j v_ij x_j^2

:func:`expected_errors` sums it over output channels weighed as the model's output reads them;
:func:`gptq_gain` is GPTQ's over rounding's for a second moment ``M`` of the inputs and ``v_ij``
alike in every row (``s_j^2``, the squared step)::

    rho = sum_j s_j^2 (U M U^T)_jj / U_jj^2  /  sum_j s_j^2 M_jj

A sample of ``n`` rows shows GPTQ correlations that new inputs do not all share, so ``M`` (or
each token's ``x x^T``) is shrunk toward its diagonal by ``K / (n + K)`` (:func:`shrunk`): many
rows, the sample itself; few, only its diagonal, which GPTQ's moves do not help.
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


def expected_errors(factor: Factor, x: torch.Tensor, read: torch.Tensor, variance: torch.Tensor,
                    g_idx: torch.Tensor, shrink: torch.Tensor) -> torch.Tensor:
    """``E sum_i read_ti (dW_i x_t)^2 [..., t]``: GPTQ's expected output error of ``W [..., N, K]`` on each input
    ``x [..., t, K]``, its output channels weighed by ``read [..., t, N]``.

    The rounding errors are independent, of ``variance [..., G, N]`` in each group and row (:func:`group_variance`;
    leading dimensions beyond the factor's, such as one per width, give a result each), ``g_idx [K]`` the group of
    each column; each token's outer product is shrunk toward its diagonal by ``shrink [...]`` (as :func:`shrunk`).
    The identity :class:`Factor` gives rounding's."""
    order = factor.order[..., None, :]
    xp = x.float().gather(-1, order.expand(*x.shape))
    u = factor.u
    z2 = (xp @ u.transpose(-1, -2)).pow(2)
    diagonal = xp.pow(2) @ u.pow(2).transpose(-1, -2)
    s = shrink[..., None, None]
    moved = ((1 - s) * z2 + s * diagonal) / u.diagonal(dim1=-2, dim2=-1).pow(2)[..., None, :]
    weighed = (read.float() @ variance.float().transpose(-1, -2)).index_select(-1, g_idx.long())  # [..., t, K]
    return (weighed.gather(-1, order.expand(*weighed.shape)) * moved).sum(-1)


def group_variance(error: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``[..., G, N]``: the mean square of a rounding ``error [..., N, K]`` over each group's columns (``g_idx [K]``)."""
    groups = int(g_idx.max()) + 1
    g = g_idx.long().to(error.device)
    sums = error.new_zeros(*error.shape[:-2], groups, error.shape[-2])
    sums.index_add_(-2, g, error.float().pow(2).transpose(-1, -2))
    return sums / torch.bincount(g, minlength=groups)[:, None]


def identity_factor(batch: tuple[int, ...], k: int, device: torch.device) -> Factor:
    """The :class:`Factor` of plain rounding (no error moved) for a batch of ``[*batch, K, K]``."""
    order = torch.arange(k, device=device).expand(*batch, k)
    u = torch.eye(k, device=device).expand(*batch, k, k)
    return Factor(order, u, torch.ones(batch, dtype=torch.bool, device=device))
