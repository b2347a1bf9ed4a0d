"""GPTQ (Frantar et al. 2022): quantise ``W`` column by column, pushing each column's rounding
error onto the columns not yet quantised, weighted by the inverse input Hessian.

Notation follows the paper. For ``W [N, K]`` and ``H = 2 X Xᵀ`` (``[K, K]``, X the layer inputs):

1. dead columns (``H_ii = 0``, input feature never active) get ``H_ii = 1``; their weights are
   kept and quantised on the grid like any other (they only never receive propagated error);
2. damping ``λ = damp · mean(diag H)`` (mean taken after step 1) is added to the diagonal; if
   a Cholesky factorisation fails, that matrix alone is retried with ``damp`` ×10 (capped at
   1.0), then 100, and the fraction used is reported per matrix;
3. ``H⁻¹`` comes from a Cholesky factorisation and is replaced by its upper Cholesky factor
   ``U`` (``H⁻¹ = Uᵀ U``), whose rows give the error propagation of each step;
4. columns are processed in blocks of ``B`` (``spec.block_size``): inside a block, after
   quantising column ``q`` to ``Q_q``, ``W[:, j] -= (W_q - Q_q) / U_qq · U_qj`` for the later
   columns ``j`` of the block; the columns after the block receive the block's accumulated
   errors in one matrix product at its end (lazy batch update).

Groups: without act-order a group's scale and zero are found when its first column is reached,
from the current (error-updated) weights of the whole group, including the pending lazy updates
of columns beyond the current block, so the result does not depend on the block size. With
act-order (``spec.act_order``) columns are processed in order of decreasing ``diag(H)`` but
groups are *static*: every group's
scale and zero come from the original ``W`` over the group's original columns before the pass.
``g_idx = k // g`` therefore stays monotone, which kernels prefer, and codes are returned in
the original column order.

A batch of ``E`` matrices (the experts of a layer) is solved together with batched tensor ops;
each matrix keeps its own Hessian, column order and damping.
"""

from __future__ import annotations

import math

import torch

from moequant.errors import MoequantError
from moequant.packed.widths import BITS
from moequant.quant.grid import dequantize, find_params, quantize
from moequant.quant.types import QuantResult, QuantSpec

# Damping escalation when a Cholesky factorisation fails: ×10 steps capped at 1.0 of mean(diag H),
# then one last, large value (close to plain rounding), then an error.
_DAMP_STEP = 10.0
_DAMP_CAP = 1.0
_DAMP_LAST = 100.0
_DAMP_FLOOR = 1e-3


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Quantise ``W`` with GPTQ against the Hessian ``H``.

    Args:
        W: ``[N, K]`` or ``[E, N, K]`` weights (any float dtype); never modified.
        H: ``[K, K]`` or ``[E, K, K]`` accumulated Hessians (``∝ Xᵀ X``, any positive scale);
            never modified. An all-zero ``H`` (no inputs) gives the round-to-nearest result.
        spec: bits, group size, symmetry, act-order, damping fraction and block size.

    Returns:
        :class:`QuantResult` on ``W``'s device with ``codes`` int32 ``[.., N, K]``, ``scales``
        float16 and ``zeros`` int32 ``[.., G, N]`` (``G = ceil(K / g)``), ``g_idx`` int32 ``[K]``
        (``k // g``), ``error`` (relative output error, see :func:`output_error`) and ``damp``
        (damping fraction used) as float32 ``[]`` or ``[E]``.
    """
    _validate(W, H, spec)
    single = W.dim() == 2
    w_b = W[None] if single else W
    h_b = (H[None] if single else H).to(w_b.device)
    e, n, k = w_b.shape
    g = spec.effective_group_size(k)
    n_groups = math.ceil(k / g)

    perm = None
    if spec.act_order:
        diag = h_b.diagonal(dim1=-2, dim2=-1).float()
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)  # [E, K]
        scales, zeros = _static_group_params(w_b, g, spec.bits, spec.sym, spec.clip_grid, h_b)
    else:
        scales = torch.empty(e, n_groups, n, dtype=torch.float32, device=w_b.device)
        zeros = torch.empty(e, n_groups, n, dtype=torch.int32, device=w_b.device)

    w_t = _columns_first(w_b, perm)  # [E, K, N], float32, processing order
    u, damp = _inverse_factor(h_b, perm, spec.damp)  # [E, K, K]
    hdiag = None
    if spec.clip_grid and perm is None:
        hdiag = h_b.diagonal(dim1=-2, dim2=-1).float()  # [E, K]
    codes_t = _gptq_pass(w_t, u, scales, zeros, perm, g, spec.bits, spec.sym, spec.block_size,
                         spec.clip_grid, hdiag)
    del u, w_t

    result = QuantResult(
        codes=codes_t.transpose(1, 2).contiguous(),
        scales=scales.to(torch.float16),
        zeros=zeros,
        g_idx=(torch.arange(k, device=w_b.device) // g).to(torch.int32),
        error=torch.zeros(e, device=w_b.device),
        damp=damp,
    )
    result.error = output_error(w_b, result.dequantize(), h_b)
    if single:
        for name in ("codes", "scales", "zeros", "error", "damp"):
            setattr(result, name, getattr(result, name)[0])
    return result


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Relative output error ``||(W - Q) X|| / ||W X||`` computed from ``H ∝ X Xᵀ``.

    ``sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))`` with ``ΔW = W - Q``; the scale of ``H`` cancels. Where
    ``tr(W H Wᵀ) = 0`` (no inputs, e.g. an expert that saw no tokens) the relative weight error
    ``||ΔW|| / ||W||`` is returned instead, as :func:`moequant.quant.rtn.rtn` reports.

    Args:
        W: ``[.., N, K]`` original weights.
        Q: ``[.., N, K]`` quantised (dequantised) weights.
        H: ``[.., K, K]`` Hessians.

    Returns:
        float32 ``[..]`` (a scalar for a single matrix).
    """
    w = W.float()
    dw = w - Q.to(device=w.device, dtype=torch.float32)
    h = H.to(device=w.device, dtype=torch.float32)
    num = ((dw @ h) * dw).sum(dim=(-2, -1))
    den = ((w @ h) * w).sum(dim=(-2, -1))
    rel = (num.clamp(min=0.0) / den.clamp(min=torch.finfo(torch.float32).tiny)).sqrt()
    weight_err = dw.flatten(-2).norm(dim=-1) / w.flatten(-2).norm(dim=-1).clamp(min=1e-30)
    return torch.where(den > 0, rel, weight_err)


def _validate(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> None:
    if W.dim() not in (2, 3):
        raise ValueError(f"W must be [N, K] or [E, N, K], got shape {tuple(W.shape)}")
    k = W.shape[-1]
    if H.shape != (*W.shape[:-2], k, k):
        raise ValueError(f"H shape {tuple(H.shape)} does not fit W shape {tuple(W.shape)}")
    if spec.bits not in BITS:
        raise MoequantError(
            f"bits must be one of {', '.join(map(str, BITS))}, got {spec.bits}: fix the recipe"
        )
    if spec.group_size != -1 and not 1 <= spec.group_size <= k:
        raise MoequantError(
            f"group_size must be -1 or between 1 and {k}, got {spec.group_size}: fix the recipe"
        )
    if spec.damp < 0:
        raise MoequantError(f"damp must be >= 0, got {spec.damp}: fix the recipe")
    if spec.block_size < 1:
        raise MoequantError(f"block_size must be >= 1, got {spec.block_size}: fix the recipe")
    if not bool(torch.isfinite(W).all()):
        raise MoequantError("the weight to quantise has inf/NaN values: check the source checkpoint")
    if not bool(torch.isfinite(H).all()):
        raise MoequantError(
            "the Hessian has inf/NaN values: check the calibration activations (float16 overflow?)"
        )


def _static_group_params(w: torch.Tensor, g: int, bits: int, sym: bool, clip_grid: int = 0,
                         h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (float32) and zeros (int32), ``[E, G, N]``, from the original ``w [E, N, K]``.

    With ``clip_grid`` the clipping search weighs each column by the Hessian diagonal of ``h``.
    """
    e, n, k = w.shape
    full = k // g * g
    diag = h.diagonal(dim1=-2, dim2=-1).float() if (clip_grid and h is not None) else None
    parts = []
    if full:
        weight = None if diag is None else diag[:, :full].reshape(e, full // g, 1, g)
        parts.append(find_params(w[..., :full].reshape(e, n, full // g, g).transpose(1, 2), bits, sym,
                                 clip_grid, weight))
    if full < k:
        weight = None if diag is None else diag[:, None, full:]
        s, z = find_params(w[..., full:], bits, sym, clip_grid, weight)
        parts.append((s[:, None], z[:, None]))
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def _columns_first(w: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """A float32 copy of ``w [E, N, K]`` as ``[E, K, N]``, columns in processing order."""
    e, n, k = w.shape
    wt = w.transpose(1, 2)
    if perm is not None:
        return wt.gather(1, perm[:, :, None].expand(e, k, n)).float()
    out = torch.empty(e, k, n, dtype=torch.float32, device=w.device)
    return out.copy_(wt)


def _prepared_hessian(h: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """A float32 copy of ``h [E, K, K]`` in processing order with dead diagonals set to 1."""
    e, k, _ = h.shape
    if perm is None:
        a = torch.empty(e, k, k, dtype=torch.float32, device=h.device).copy_(h)
    else:
        a = h.gather(1, perm[:, :, None].expand(e, k, k))
        a = a.gather(2, perm[:, None, :].expand(e, k, k)).float()
    d = a.diagonal(dim1=-2, dim2=-1)
    d.masked_fill_(d == 0, 1.0)
    return a


def _inverse_factor(
    h: torch.Tensor, perm: torch.Tensor | None, damp0: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` per matrix, and the damping fraction used.

    Matrices whose factorisation fails are retried alone with more damping; the caller's ``h``
    is re-read for them, so only two ``[E, K, K]`` buffers are live at a time.
    """
    a = _prepared_hessian(h, perm)
    mean = a.diagonal(dim1=-2, dim2=-1).mean(dim=-1)  # [E]
    damp = torch.full_like(mean, damp0)
    u, ok = _factor(a, damp * mean)
    del a
    while not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        if bool((damp[bad] >= _DAMP_LAST).any()):
            raise MoequantError(
                f"the Hessian of matrix {int(bad[0])} is not positive definite even with damping {_DAMP_LAST}× "
                "its mean diagonal: check the calibration activations"
            )
        step = torch.where(
            damp[bad] >= _DAMP_CAP,
            torch.full_like(damp[bad], _DAMP_LAST),
            (damp[bad] * _DAMP_STEP).clamp(min=_DAMP_FLOOR, max=_DAMP_CAP),
        )
        damp[bad] = step
        u_bad, ok_bad = _factor(
            _prepared_hessian(h[bad], None if perm is None else perm[bad]), step * mean[bad]
        )
        u[bad] = u_bad
        ok[bad] = ok_bad
    return u, damp


def _factor(a: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` with ``Uᵀ U = (a + diag(lam))⁻¹`` and a success mask ``[E]``; overwrites ``a``."""
    a.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    low, info = torch.linalg.cholesky_ex(a)
    ok = info == 0
    if not bool(ok.all()):
        # A failed factor is partial garbage: keep the inverse finite, the matrix is retried.
        low[~ok] = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    torch.cholesky_inverse(low, out=a)
    up, info = torch.linalg.cholesky_ex(a, upper=True, out=(low, info))
    ok &= info == 0
    ok &= torch.isfinite(up).all(dim=-1).all(dim=-1)
    return up, ok


def _gptq_pass(
    w: torch.Tensor,
    u: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    g: int,
    bits: int,
    sym: bool,
    block: int,
    clip_grid: int = 0,
    hdiag: torch.Tensor | None = None,
) -> torch.Tensor:
    """The column loop. Returns codes ``[E, K, N]`` in original column order.

    ``w [E, K, N]`` (processing order) is updated in place; ``u [E, K, K]`` is the upper factor
    of ``H⁻¹`` in processing order. Without ``perm`` the group parameters ``scales``/``zeros``
    ``[E, G, N]`` are filled in here; with ``perm`` they are the static ones, read by column.
    """
    e, k, n = w.shape
    codes = torch.empty(e, k, n, dtype=torch.int32, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        cnt = i2 - i1
        w1 = w[:, i1:i2]  # view: the block is updated in place
        u1 = u[:, i1:i2, i1:i2]
        err1 = torch.zeros(e, cnt, n, dtype=w.dtype, device=w.device)
        q1 = torch.empty(e, cnt, n, dtype=w.dtype, device=w.device)
        if perm is not None:
            gcol = (perm[:, i1:i2] // g)[:, :, None].expand(e, cnt, n)
            s1 = scales.gather(1, gcol)
            z1 = zeros.gather(1, gcol).float()
        for i in range(cnt):
            col = i1 + i
            if perm is None:
                if col % g == 0:
                    src = _current_group(w, u, err1, i1, i, min(col + g, k))
                    weight = None if hdiag is None else hdiag[:, None, col : col + src.shape[1]]
                    s, z = find_params(src.transpose(1, 2), bits, sym, clip_grid, weight)
                    scales[:, col // g] = s
                    zeros[:, col // g] = z
                    zf = z.float()
            else:
                s, zf = s1[:, i], z1[:, i]
            wq = w1[:, i]  # [E, N]
            q = quantize(wq, s, zf, bits)
            q1[:, i] = q
            err = (wq - dequantize(q, s, zf)) / u1[:, i, i, None]
            err1[:, i] = err
            if i + 1 < cnt:
                w1[:, i + 1 :].addcmul_(u1[:, i, i + 1 :, None], err[:, None, :], value=-1.0)
        if perm is None:
            codes[:, i1:i2] = q1.to(torch.int32)
        else:
            codes.scatter_(1, perm[:, i1:i2, None].expand(e, cnt, n), q1.to(torch.int32))
        if i2 < k:
            w[:, i2:].baddbmm_(u[:, i1:i2, i2:].transpose(1, 2), err1, alpha=-1.0)
    return codes


def _current_group(
    w: torch.Tensor, u: torch.Tensor, err1: torch.Tensor, i1: int, i: int, end: int
) -> torch.Tensor:
    """Up-to-date weights ``[E, end - c, N]`` of columns ``c = i1 + i`` to ``end``.

    Columns inside the current block already carry this block's updates; columns after it get
    the pending lazy update of the ``i`` columns quantised so far.
    """
    col = i1 + i
    i2 = i1 + err1.shape[1]
    if i == 0 or end <= i2:
        return w[:, col:end]
    tail = torch.baddbmm(w[:, i2:end], u[:, i1:col, i2:end].transpose(1, 2), err1[:, :i], alpha=-1.0)
    return torch.cat([w[:, col:i2], tail], dim=1)
