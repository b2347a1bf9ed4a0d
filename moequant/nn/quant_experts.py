"""The experts of one sparse-MoE layer, computed from GPTQ-packed weights.

``QuantExperts`` takes the place of transformers' ``MixtralExperts`` (``model.layers.N.mlp.experts``)
with the same call: ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

Two storage layouts:

- **stacked** (every expert quantised, w1/w3 of an expert sharing bits, group size and
  ``g_idx``, all experts alike): buffers ``w13_*`` hold gate and up joined along N
  (``W13_e = [W1_e; W3_e]``, ``[2I, H]``) and ``w2_*`` the down projections, each with a
  leading expert dimension as in :class:`~moequant.packed.experts.PackedExperts`. The triton
  backend runs the fused MoE kernel on them.
- **per-expert** (anything else: mixed bit widths, some experts kept 16-bit): ``experts[e]``
  holds ``w1``, ``w3``, ``w2`` as :class:`QuantLinear` or plain ``nn.Linear``, computed one
  expert at a time (with a one-time warning where the fused kernel was asked for).

The torch path visits only the experts that received tokens and dequantises each one's
weights on the fly.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from moequant.errors import MoequantError
from moequant.kernels import dispatch
from moequant.nn.quant_linear import QuantLinear, keep_dtype_apply, packed_matmul, shared_zero
from moequant.packed.experts import PackedExperts
from moequant.packed.shapes import packed_shapes
from moequant.packed.widths import PACKED_KEYS, effective_group_size, is_monotone_g_idx

EXPERT_ROLES = ("w1", "w3", "w2")


@dataclass(frozen=True)
class LinearSpec:
    """How one linear is stored: ``bits`` and configured ``group_size`` (-1: one group)."""

    bits: int
    group_size: int


# One expert linear: a float weight kept 16-bit, or its spec and packed tensors.
ExpertWeight = torch.Tensor | tuple[LinearSpec, Mapping[str, torch.Tensor]]


def stacked_specs(specs: list[dict[str, LinearSpec | None]]) -> tuple[LinearSpec, LinearSpec] | None:
    """``(w13, w2)`` specs when every expert can live in the stacked layout, else None.

    ``specs[e][role]`` is the spec of expert ``e``'s ``w1``, ``w3`` or ``w2`` (None = 16-bit).
    """
    if not specs:
        return None
    w13, w2 = specs[0].get("w1"), specs[0].get("w2")
    if w13 is None or w2 is None:
        return None
    for s in specs:
        if s.get("w1") != w13 or s.get("w3") != w13 or s.get("w2") != w2:
            return None
    return w13, w2


class _ExpertLinears(nn.Module):
    """One expert's ``w1``, ``w3`` (``[I, H]``) and ``w2`` (``[H, I]``), each packed or plain."""

    def __init__(self, hidden: int, inter: int, specs: dict[str, LinearSpec | None], backend: str) -> None:
        super().__init__()
        for role in EXPERT_ROLES:
            k, n = (inter, hidden) if role == "w2" else (hidden, inter)
            spec = specs.get(role)
            layer = (nn.Linear(k, n, bias=False) if spec is None
                     else QuantLinear(k, n, spec.bits, spec.group_size, backend=backend))
            setattr(self, role, layer)


class QuantExperts(nn.Module):
    """Packed replacement for ``MixtralExperts``.

    Args:
        num_experts, hidden_size, intermediate_size: E, H and I.
        specs: ``specs[e][role]`` for roles ``w1, w3, w2`` (None keeps that linear 16-bit).
        hidden_act: activation name (``silu`` for Mixtral).
        backend: ``torch``, ``triton`` or ``auto``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 specs: list[dict[str, LinearSpec | None]], hidden_act: str = "silu", backend: str = "auto",
                 force_per_expert: bool = False) -> None:
        super().__init__()
        if len(specs) != num_experts:
            raise MoequantError(f"got specs for {len(specs)} experts, expected {num_experts}")
        dispatch.check_backend(backend)
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.backend = backend
        self.act_fn = ACT2FN[hidden_act]
        stacked = None if force_per_expert else stacked_specs(specs)
        self.stacked = stacked is not None
        self._layout: tuple[tuple[bool, int | None], tuple[bool, int | None]] | None = None
        self._resolved: tuple[torch.device, str] | None = None
        self._warned = False
        if stacked is not None:
            self.w13_spec, self.w2_spec = stacked
            self._register_stacked("w13", 2 * intermediate_size, hidden_size, self.w13_spec)
            self._register_stacked("w2", hidden_size, intermediate_size, self.w2_spec)
            self.experts = None
        else:
            self.w13_spec = self.w2_spec = None
            self.experts = nn.ModuleList(
                _ExpertLinears(hidden_size, intermediate_size, s, backend) for s in specs
            )

    @classmethod
    def from_experts(cls, experts: Sequence[Mapping[str, ExpertWeight]], hidden_act: str = "silu",
                     backend: str = "auto", force_per_expert: bool = False) -> QuantExperts:
        """Experts from their weights, on the device of the first one.

        ``experts[e][role]`` for roles ``w1``, ``w3`` (``[I, H]``) and ``w2`` (``[H, I]``) is either a
        float weight (kept 16-bit) or ``(LinearSpec, packed)`` with ``packed`` the dict of
        ``qweight, qzeros, scales, g_idx``. The stacked layout is used when it fits.
        """
        def spec_of(w: ExpertWeight) -> LinearSpec | None:
            return None if isinstance(w, torch.Tensor) else w[0]

        def shape_of(w: ExpertWeight) -> tuple[int, int]:
            if isinstance(w, torch.Tensor):
                return int(w.shape[0]), int(w.shape[1])
            return int(w[1]["qweight"].shape[1]), int(w[1]["g_idx"].shape[-1])

        def tensor_of(w: ExpertWeight) -> torch.Tensor:
            return w if isinstance(w, torch.Tensor) else w[1]["qweight"]

        inter, hidden = shape_of(experts[0]["w1"])
        specs = [{r: spec_of(ex[r]) for r in EXPERT_ROLES} for ex in experts]
        same_g_idx = all(
            isinstance(ex["w1"], torch.Tensor) or isinstance(ex["w3"], torch.Tensor)
            or torch.equal(ex["w1"][1]["g_idx"], ex["w3"][1]["g_idx"])
            for ex in experts
        )
        module = cls(len(experts), hidden, inter, specs, hidden_act, backend,
                     force_per_expert=force_per_expert or not same_g_idx)
        module.to(tensor_of(experts[0]["w1"]).device)
        with torch.no_grad():
            for e, ex in enumerate(experts):
                for role in EXPERT_ROLES:
                    want = (hidden, inter) if role == "w2" else (inter, hidden)
                    if shape_of(ex[role]) != want:
                        raise MoequantError(f"expert {e} {role} is {list(shape_of(ex[role]))}, expected {list(want)}")
                if module.stacked:
                    module._fill_stacked(e, ex)
                else:
                    for role in EXPERT_ROLES:
                        layer = getattr(module.experts[e], role)
                        w = ex[role]
                        if isinstance(w, torch.Tensor):
                            layer.weight.copy_(w)
                        else:
                            for key in PACKED_KEYS:
                                getattr(layer, key).copy_(w[1][key])
        return module

    def _fill_stacked(self, e: int, ex: Mapping[str, ExpertWeight]) -> None:
        inter = self.intermediate_dim
        widths = {"qweight": inter, "qzeros": inter * self.w13_spec.bits // 32, "scales": inter}
        for key, width in widths.items():
            target = getattr(self, f"w13_{key}")[e]
            target[:, :width].copy_(ex["w1"][1][key])
            target[:, width:].copy_(ex["w3"][1][key])
        self.w13_g_idx[e].copy_(ex["w1"][1]["g_idx"])
        for key in PACKED_KEYS:
            getattr(self, f"w2_{key}")[e].copy_(ex["w2"][1][key])
        self._layout = None

    def _register_stacked(self, prefix: str, n: int, k: int, spec: LinearSpec) -> None:
        e = self.num_experts
        shapes = packed_shapes(n, k, spec.bits, spec.group_size)
        dtypes = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}
        for key in PACKED_KEYS:
            self.register_buffer(f"{prefix}_{key}", torch.empty((e, *shapes[key]), dtype=dtypes[key]))

    # -- views for the kernels ---------------------------------------------------------------
    def packed_experts(self) -> tuple[PackedExperts, PackedExperts]:
        """The stacked weights as ``(w13, w2)`` :class:`PackedExperts` (views, no copy)."""
        if not self.stacked:
            raise MoequantError("per-expert storage has no stacked packed weights")
        (s13, _), (s2, _) = self.layout()
        return (
            PackedExperts(self.w13_qweight, self.w13_qzeros, self.w13_scales, self.w13_g_idx,
                          self.w13_spec.bits, self.w13_spec.group_size, sorted_groups=s13),
            PackedExperts(self.w2_qweight, self.w2_qzeros, self.w2_scales, self.w2_g_idx,
                          self.w2_spec.bits, self.w2_spec.group_size, sorted_groups=s2),
        )

    def layout(self) -> tuple[tuple[bool, int | None], tuple[bool, int | None]]:
        """``(sorted_groups, shared zero)`` of the stacked w13 and w2 (see ``QuantLinear.layout``), cached."""
        if self._layout is None:
            self._layout = (
                (is_monotone_g_idx(self.w13_g_idx, effective_group_size(self.w13_spec.group_size, self.hidden_dim)),
                 shared_zero(self.w13_qzeros, self.w13_spec.bits)),
                (is_monotone_g_idx(self.w2_g_idx,
                                   effective_group_size(self.w2_spec.group_size, self.intermediate_dim)),
                 shared_zero(self.w2_qzeros, self.w2_spec.bits)),
            )
        return self._layout

    def resolved_backend(self, device: torch.device) -> str:
        if self._resolved is None or self._resolved[0] != device:
            self._resolved = (device, dispatch.resolve_backend(self.backend, device))
        return self._resolved[1]

    # -- compute -------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """``sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(x_t)``: ``[T, H]`` in the input dtype."""
        backend = self.resolved_backend(hidden_states.device)
        if backend == "triton":
            if self.stacked:
                w13, w2 = self.packed_experts()
                return dispatch.fused_moe(hidden_states, top_k_index, top_k_weights, w13, w2, backend="triton")
            if not self._warned:
                warnings.warn("the experts of this layer differ in bits, group size or g_idx, so the fused MoE "
                              "kernel cannot run them; computing them one expert at a time", stacklevel=2)
                self._warned = True
        return self._torch_forward(hidden_states, top_k_index, top_k_weights)

    def _torch_forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        flat_weights = top_k_weights.reshape(-1)
        start = 0
        for e, count in enumerate(counts[: self.num_experts]):
            if count == 0:
                continue
            slots = order[start : start + count]
            start += count
            tokens = slots // top_k
            y = self._expert(e, x[tokens]) * flat_weights[slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens ``x [t, H]`` -> ``[t, H]`` in ``x.dtype``."""
        if self.stacked:
            unit = self.host_expert(e)
            return self._stacked_expert(unit["w13"], unit["w2"], x, "torch")
        return self.run_expert(self.experts[e], x)

    # -- one expert at a time, for offloading ---------------------------------------------------
    def host_expert(self, e: int) -> object:
        """Expert ``e``'s weights as one unit: views of its stacked tensors, or its per-expert module."""
        if self.stacked:
            return {p: {k: getattr(self, f"{p}_{k}")[e] for k in PACKED_KEYS} for p in ("w13", "w2")}
        return self.experts[e]

    def expert_bytes(self, e: int) -> int:
        """Bytes of expert ``e``'s weights."""
        return sum(t.numel() * t.element_size() for t in self.expert_tensors(self.host_expert(e)))

    def expert_to(self, unit: object, device: torch.device, non_blocking: bool = False) -> object:
        """A copy of an expert's unit (:meth:`host_expert`) on ``device``."""
        if self.stacked:
            return {p: {k: t.to(device, non_blocking=non_blocking) for k, t in part.items()} for p, part in unit.items()}
        memo = {id(t): t.to(device, non_blocking=non_blocking) for t in unit.buffers()}
        memo.update({id(p): nn.Parameter(p.to(device, non_blocking=non_blocking), requires_grad=False)
                     for p in unit.parameters()})
        return copy.deepcopy(unit, memo)

    def expert_tensors(self, unit: object) -> list[torch.Tensor]:
        """Every tensor of an expert's unit."""
        if self.stacked:
            return [t for part in unit.values() for t in part.values()]
        return [*unit.parameters(), *unit.buffers()]

    def run_expert(self, unit: object, x: torch.Tensor) -> torch.Tensor:
        """An expert's unit (on ``x``'s device) on its tokens ``x [t, H]`` -> ``[t, H]`` in ``x.dtype``."""
        if not self.stacked:
            return _linear(unit.w2, self.act_fn(_linear(unit.w1, x)) * _linear(unit.w3, x))
        return self._stacked_expert(unit["w13"], unit["w2"], x, self.resolved_backend(x.device))

    def _stacked_expert(self, w13: Mapping[str, torch.Tensor], w2: Mapping[str, torch.Tensor], x: torch.Tensor,
                        backend: str) -> torch.Tensor:
        (s13, z13), (s2, z2) = self.layout()
        gate_up = packed_matmul(x, w13["qweight"], w13["qzeros"], w13["scales"], w13["g_idx"], self.w13_spec.bits,
                                effective_group_size(self.w13_spec.group_size, self.hidden_dim), s13, backend, z13)
        gate, up = gate_up.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        return packed_matmul(h, w2["qweight"], w2["qzeros"], w2["scales"], w2["g_idx"], self.w2_spec.bits,
                             effective_group_size(self.w2_spec.group_size, self.intermediate_dim), s2, backend, z2)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self._resolved = None
        names = ("w13_scales", "w2_scales") if self.stacked else ()
        return keep_dtype_apply(self, fn, recurse, names)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._layout = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        layout = (f"stacked, w13 {self.w13_spec.bits}-bit g{self.w13_spec.group_size}, "
                  f"w2 {self.w2_spec.bits}-bit g{self.w2_spec.group_size}" if self.stacked else "per-expert")
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"{layout}, backend={self.backend}")


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One per-expert linear: a QuantLinear on its own backend, or a 16-bit weight in ``x``'s dtype."""
    if isinstance(layer, QuantLinear):
        return layer(x)
    return nn.functional.linear(x, layer.weight.to(x.dtype))
