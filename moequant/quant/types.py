"""Plain records passed between the recipe, the solvers and the packer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moequant.packed.widths import effective_group_size


@dataclass(frozen=True)
class QuantSpec:
    """How one module is quantised: the grid and the solver settings.

    ``group_size`` is -1 for one group over the whole input dimension.
    """

    bits: int
    group_size: int = 128
    sym: bool = True
    method: str = "gptq"
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    clip_grid: int = 0

    def effective_group_size(self, in_features: int) -> int:
        return effective_group_size(self.group_size, in_features)


@dataclass
class QuantResult:
    """Codes and grid of one quantised weight, or of a batch of E weights.

    Shapes for a single weight ``W [N, K]`` with ``G = ceil(K / g)`` groups (a batch adds a
    leading ``E`` dimension to every tensor):

    - ``codes``  int32 ``[N, K]``, values in ``[0, 2**bits - 1]``
    - ``scales`` float16 ``[G, N]``
    - ``zeros``  int32 ``[G, N]``, the zero point ``z`` itself (the v1 layout stores ``z - 1``)
    - ``g_idx``  int32 ``[K]``, group of every input column (monotone: static groups)
    - ``error``  float32 ``[]`` or ``[E]``: relative output error ``||(W - Q) X|| / ||W X||``
      (for RTN without a Hessian: relative weight error ``||W - Q|| / ||W||``)
    - ``damp``   float32 ``[]`` or ``[E]``: the damping fraction actually used (0 for RTN)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    error: torch.Tensor
    damp: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))

    def dequantize(self) -> torch.Tensor:
        """Dequantised weight ``[..., N, K]`` in float32: ``s * (q - z)`` per group."""
        g = self.g_idx.long()
        s = self.scales.float().index_select(-2, g)  # [..., K, N]
        z = self.zeros.float().index_select(-2, g)
        return (self.codes.float() - z.transpose(-1, -2)) * s.transpose(-1, -2)
