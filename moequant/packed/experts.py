"""Packed linears joined: along N (w1 and w3 into one w13), and the experts of a layer stacked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from moequant.errors import MoequantError
from moequant.packed.shapes import check_packed
from moequant.packed.widths import PACKED_KEYS, check_bits, effective_group_size, is_monotone_g_idx


def concat_out_features(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join packed linears that share their input along N, e.g. w1 and w3 into one "w13".

    Every part must have the same ``g_idx`` and ``N % 32 == 0`` so that packed zero words stay
    whole. Returns the packed dict of ``W = cat([W_0, W_1, ...], dim=0)``.
    """
    if not parts:
        raise MoequantError("concat_out_features needs at least one packed linear")
    first = parts[0]
    for p in parts[1:]:
        if p["qweight"].shape[0] != first["qweight"].shape[0] or not torch.equal(p["g_idx"], first["g_idx"]):
            raise MoequantError("packed linears joined along N must share K, group size and g_idx")
    return {
        "qweight": torch.cat([p["qweight"] for p in parts], dim=-1),
        "qzeros": torch.cat([p["qzeros"] for p in parts], dim=-1),
        "scales": torch.cat([p["scales"] for p in parts], dim=-1),
        "g_idx": first["g_idx"],
    }


@dataclass
class PackedExperts:
    """The packed weights of E experts' same-shaped linears (each ``W_e [N, K]``), stacked.

    - ``qweight`` int32 ``[E, K*b/32, N]``
    - ``qzeros``  int32 ``[E, G, N*b/32]`` (``z - 1``)
    - ``scales``  fp16  ``[E, G, N]``
    - ``g_idx``   int32 ``[E, K]`` or ``[K]`` (shared by every expert)

    ``group_size`` is the effective size (``-1`` is resolved to K on construction).
    ``sorted_groups`` says whether ``g_idx`` is ``k // group_size`` (lets the kernels skip reading
    it); ``None`` means "not known yet" and is worked out on first use.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sorted_groups: bool | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.qweight.dim() != 3:
            raise MoequantError(
                f"PackedExperts.qweight must be [E, K*b/32, N], got {tuple(self.qweight.shape)}"
            )
        k = self.qweight.shape[1] * 32 // self.bits
        if self.qweight.shape[1] * 32 % self.bits or k % 32:
            raise MoequantError(f"qweight rows {self.qweight.shape[1]} do not hold a multiple of 32 values at "
                                f"{self.bits} bits")
        self.group_size = effective_group_size(self.group_size, k)
        _, groups = check_packed(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, k, "PackedExperts")
        if groups != -(-k // self.group_size):
            raise MoequantError(f"PackedExperts.scales hold {groups} groups, not the {-(-k // self.group_size)} "
                                f"of group size {self.group_size} over K={k}")

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        """K, the input dimension of every expert's linear."""
        return self.qweight.shape[1] * 32 // self.bits

    @property
    def out_features(self) -> int:
        """N, the output dimension of every expert's linear."""
        return self.qweight.shape[2]

    def expert_g_idx(self, e: int) -> torch.Tensor:
        """``g_idx`` of expert ``e``: int32 ``[K]``."""
        return self.g_idx if self.g_idx.dim() == 1 else self.g_idx[e]

    def expert(self, e: int) -> dict[str, torch.Tensor]:
        """The packed dict of expert ``e`` (views, no copy)."""
        return {
            "qweight": self.qweight[e],
            "qzeros": self.qzeros[e],
            "scales": self.scales[e],
            "g_idx": self.expert_g_idx(e),
        }

    def has_sorted_groups(self) -> bool:
        """Whether every expert's ``g_idx`` is ``k // group_size`` (checked once, then cached)."""
        if self.sorted_groups is None:
            self.sorted_groups = is_monotone_g_idx(self.g_idx, self.group_size)
        return self.sorted_groups

    def to(self, device: torch.device | str) -> PackedExperts:
        """A copy on ``device``."""
        return PackedExperts(
            qweight=self.qweight.to(device),
            qzeros=self.qzeros.to(device),
            scales=self.scales.to(device),
            g_idx=self.g_idx.to(device),
            bits=self.bits,
            group_size=self.group_size,
            sorted_groups=self.sorted_groups,
        )

    @classmethod
    def stack(
        cls, experts: Sequence[Mapping[str, torch.Tensor]], bits: int, group_size: int
    ) -> PackedExperts:
        """Stack per-expert packed dicts (keys ``qweight, qzeros, scales, g_idx``) along a new E dim.

        ``g_idx`` is kept as one ``[K]`` tensor when all experts share it, else ``[E, K]``.
        """
        if not experts:
            raise MoequantError("PackedExperts.stack needs at least one expert")
        for i, ex in enumerate(experts):
            missing = [key for key in PACKED_KEYS if key not in ex]
            if missing:
                raise MoequantError(f"expert {i} lacks packed tensors {missing}")
        shapes = {tuple(ex["qweight"].shape) for ex in experts}
        if len(shapes) != 1:
            raise MoequantError(
                f"experts of one layer must share a shape, got qweight shapes {sorted(shapes)}"
            )
        g0 = experts[0]["g_idx"].to(torch.int32)
        shared = all(torch.equal(ex["g_idx"].to(torch.int32), g0) for ex in experts[1:])
        g_idx = g0 if shared else torch.stack([ex["g_idx"].to(torch.int32) for ex in experts])
        return cls(
            qweight=torch.stack([ex["qweight"] for ex in experts]),
            qzeros=torch.stack([ex["qzeros"] for ex in experts]),
            scales=torch.stack([ex["scales"] for ex in experts]),
            g_idx=g_idx,
            bits=bits,
            group_size=group_size,
        )
