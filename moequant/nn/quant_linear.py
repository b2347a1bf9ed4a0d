"""A linear layer that holds only GPTQ-packed weights and computes from them.

``QuantLinear`` keeps the checkpoint's four packed tensors as buffers (``qweight`` int32
``[K*b/32, N]``, ``qzeros`` int32 ``[G, N*b/32]``, ``scales`` float16 ``[G, N]``, ``g_idx``
int32 ``[K]``) and an optional ``bias [N]``. The torch backend dequantises a few groups of
input rows at a time into a transient float32 block and multiplies; no full-precision copy of
the weight outlives a call. The triton backend dequantises inside the kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moequant.errors import MoequantError
from moequant.kernels import dispatch
from moequant.packed.bitstream import unpack_cols, unpack_rows
from moequant.packed.shapes import packed_shapes
from moequant.packed.widths import effective_group_size, is_monotone_g_idx

# Largest transient float32 block (elements) the torch path dequantises at once: 16 MiB.
CHUNK_ELEMENTS = 1 << 22
_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def grouped_dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    zero: int | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``x @ W^T`` for a packed ``W [N, K]`` whose ``g_idx`` is ``k // group_size``.

    Dequantises whole groups of input rows at a time (``W^T`` rows ``[k0, k1)``, float32
    ``[k1 - k0, N]``, at most ``chunk_elements`` of them) and accumulates their products.

    Args:
        x: ``[..., K]`` activations.
        qweight: int32 ``[K*b/32, N]``; qzeros: int32 ``[G, N*b/32]`` (v1, ``z - 1``);
            scales: ``[G, N]``.
        bits: 2, 3, 4 or 8.
        group_size: effective group size (a multiple of 32 that divides K).
        zero: the zero point of every group and column when they all share one (symmetric
            grids), which skips unpacking ``qzeros``.

    Returns:
        ``[..., N]`` in ``x.dtype``, accumulated in float32.
    """
    k = x.shape[-1]
    n = qweight.shape[1]
    g = group_size
    x2 = x.reshape(-1, k).float()
    m = x2.shape[0]
    zeros = unpack_cols(qzeros, bits) + 1 if zero is None else None  # [G, N]
    scale = scales.float()
    groups_per_chunk = max(1, chunk_elements // (g * n))
    out: torch.Tensor | None = None
    for g0 in range(0, k // g, groups_per_chunk):
        g1 = min(g0 + groups_per_chunk, k // g)
        k0, k1 = g0 * g, g1 * g
        codes = unpack_rows(qweight[k0 * bits // 32 : k1 * bits // 32], bits).view(g1 - g0, g, n)
        z = zero if zeros is None else zeros[g0:g1, None]
        xc = x2[:, k0:k1]
        if m < g:
            # few rows: sum x*q per group, then scale and remove the zero point per group,
            # instead of dequantising the whole block
            xg = xc.reshape(m, g1 - g0, g).transpose(0, 1)  # [Gc, m, g]
            prod = torch.bmm(xg, codes.to(torch.float32)) - xg.sum(-1, keepdim=True) * z  # [Gc, m, N]
            part = (prod * scale[g0:g1, None]).sum(0)
        else:
            part = xc @ ((codes - z) * scale[g0:g1, None]).view(k1 - k0, n)
        out = part if out is None else out.add_(part)
    assert out is not None
    return out.to(x.dtype).view(*x.shape[:-1], n)


def shared_zero(qzeros: torch.Tensor, bits: int) -> int | None:
    """The zero point shared by every group and column of ``qzeros`` (v1), or None if they differ."""
    zeros = unpack_cols(qzeros.reshape(-1, qzeros.shape[-1]), bits)
    first = int(zeros.reshape(-1)[0]) if zeros.numel() else 0
    return first + 1 if bool((zeros == first).all()) else None


def keep_dtype_apply(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool,
                     names: tuple[str, ...]) -> nn.Module:
    """``module._apply(fn)`` that moves the float buffers ``names`` without changing their dtype.

    Model-wide casts (``model.to(torch.bfloat16)``, ``.half()``) would otherwise round the
    float16 scales; they are passed through ``fn`` as same-sized integers instead.
    """
    kept = {name: module._buffers.pop(name) for name in names if module._buffers.get(name) is not None}
    try:
        nn.Module._apply(module, fn, recurse)
    finally:
        for name, t in kept.items():
            as_int = _SAME_SIZE_INT.get(t.element_size())
            module._buffers[name] = fn(t) if as_int is None else fn(t.view(as_int)).view(t.dtype)
    return module


class QuantLinear(nn.Module):
    """``y = x W^T (+ b)`` with ``W [out_features, in_features]`` stored GPTQ-packed.

    Args:
        in_features, out_features: K and N, multiples of 32.
        bits: 2, 3, 4 or 8.
        group_size: input columns per group, or -1 for one group.
        bias: whether the layer has a bias (kept in the model's dtype).
        backend: ``torch``, ``triton`` or ``auto`` (Triton for CUDA tensors when available).
        scales_dtype: dtype of ``scales`` (float16 in GPTQ checkpoints).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 backend: str = "auto", scales_dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        dispatch.check_backend(backend)
        shapes = packed_shapes(out_features, in_features, bits, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.backend = backend
        self.register_buffer("qweight", torch.empty(shapes["qweight"], dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(shapes["qzeros"], dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(shapes["scales"], dtype=scales_dtype, device=device))
        self.register_buffer("g_idx", torch.empty(shapes["g_idx"], dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self._layout: tuple[bool, int | None] | None = None
        self._resolved: tuple[torch.device, str] | None = None

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor], bits: int, group_size: int,
                    bias: torch.Tensor | None = None, backend: str = "auto") -> QuantLinear:
        """A layer holding ``packed`` (keys ``qweight, qzeros, scales, g_idx``), on their device."""
        qweight = packed["qweight"]
        k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
        layer = cls(k, n, bits, group_size, bias=bias is not None, backend=backend,
                    scales_dtype=packed["scales"].dtype, device=qweight.device)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            buf = getattr(layer, name)
            if tuple(packed[name].shape) != tuple(buf.shape):
                raise MoequantError(f"packed {name} has shape {list(packed[name].shape)}, expected {list(buf.shape)}")
            buf.copy_(packed[name])
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    @property
    def effective_group_size(self) -> int:
        return effective_group_size(self.group_size, self.in_features)

    def layout(self) -> tuple[bool, int | None]:
        """``(sorted_groups, zero)``: whether ``g_idx`` is ``k // group_size``, and the zero point
        shared by all groups (None if they differ). Read from the buffers once, then cached."""
        if self._layout is None:
            self._layout = (is_monotone_g_idx(self.g_idx, self.effective_group_size),
                            shared_zero(self.qzeros, self.bits))
        return self._layout

    def resolved_backend(self, device: torch.device) -> str:
        """``torch`` or ``triton`` for activations on ``device`` (cached per device)."""
        if self._resolved is None or self._resolved[0] != device:
            self._resolved = (device, dispatch.resolve_backend(self.backend, device))
        return self._resolved[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features]`` -> ``[..., out_features]`` in ``x.dtype``."""
        if x.shape[-1] != self.in_features:
            raise MoequantError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        sorted_groups, zero = self.layout()
        y = packed_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                          self.effective_group_size, sorted_groups, self.resolved_backend(x.device), zero)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self._resolved = None
        return keep_dtype_apply(self, fn, recurse, ("scales",))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._layout = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend}")


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor, bits: int, group_size: int, sorted_groups: bool, backend: str,
                  zero: int | None = None) -> torch.Tensor:
    """``x @ W^T`` for one packed weight on a resolved backend (``torch`` or ``triton``).

    ``group_size`` is the effective size; ``sorted_groups`` says ``g_idx == k // group_size``;
    ``zero`` is the zero point every group shares, if any (see :func:`shared_zero`).
    The torch path works group by group when groups are sorted and 32-aligned, else through
    the reference kernel (one transient float32 ``[K, N]``).
    """
    if backend == "triton":
        return dispatch.dequant_matmul(x, qweight, qzeros, scales, g_idx, bits, group_size, backend="triton",
                                       sorted_groups=sorted_groups)
    if sorted_groups and group_size % 32 == 0 and x.shape[-1] % group_size == 0:
        return grouped_dequant_matmul(x, qweight, qzeros, scales, bits, group_size, zero)
    return dispatch.dequant_matmul(x, qweight, qzeros, scales, g_idx, bits, group_size, backend="torch")
