"""Pick a kernel backend: "torch" (reference, any device), "triton", or "auto".

"triton" runs compiled on CUDA, and on CPU only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported). "auto" takes Triton for CUDA
tensors when it is importable, else torch.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from moequant.errors import MoequantError
from moequant.kernels.reference import dequant_matmul_ref, fused_moe_ref
from moequant.packed.experts import PackedExperts
from moequant.packed.widths import monotone_g_idx

BACKENDS = ("auto", "torch", "triton")


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run on ``device`` (default: CUDA if present, else CPU)."""
    return _triton_problem(_device(device)) is None


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _triton_problem(device: torch.device) -> str | None:
    """Why Triton cannot run on ``device``, or None."""
    if not triton_installed():
        return "the triton backend needs Triton: install moequant[triton] (pip install 'moequant[triton]')"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "the triton backend needs a working CUDA device"
    if device.type == "cpu" and interpreting():
        return None
    return (
        f"the triton backend needs CUDA or TRITON_INTERPRET=1, but the tensors are on {device.type}: "
        "move them to a GPU or choose backend='torch'"
    )


def check_backend(backend: str) -> str:
    """``backend`` if it names one of :data:`BACKENDS`, else a one-line MoequantError."""
    if backend not in BACKENDS:
        raise MoequantError(f"unknown kernel backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device``; raises a MoequantError if triton cannot run."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_problem(device) is None else "torch"
    problem = _triton_problem(device)
    if problem is not None:
        raise MoequantError(problem)
    return "triton"


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    backend: str = "auto",
    *,
    sorted_groups: bool = False,
) -> torch.Tensor:
    """``x @ W^T`` for a packed ``W [N, K]``: ``x [..., K]`` -> ``[..., N]`` in ``x.dtype``.

    ``g_idx`` None means ``k // group_size``; pass ``sorted_groups=True`` when a given ``g_idx``
    is known to equal it, so the Triton kernel need not read it.
    """
    if resolve_backend(backend, x.device) == "torch":
        if g_idx is None:
            g_idx = monotone_g_idx(x.shape[-1], group_size, x.device)
        return dequant_matmul_ref(x, qweight, qzeros, scales, g_idx, bits)
    from moequant.kernels.triton_matmul import dequant_matmul_triton

    return dequant_matmul_triton(
        x, qweight, qzeros, scales, g_idx, bits, group_size, sorted_groups=sorted_groups
    )


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: PackedExperts,
    w2: PackedExperts,
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse-MoE block over packed experts: ``x [T, H]`` -> ``[T, H]`` (see :func:`fused_moe_ref`)."""
    if resolve_backend(backend, x.device) == "torch":
        return fused_moe_ref(x, topk_ids, topk_weights, w13, w2)
    from moequant.kernels.triton_moe import fused_moe_triton

    return fused_moe_triton(x, topk_ids, topk_weights, w13, w2)
