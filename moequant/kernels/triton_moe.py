"""Fused MoE over GPTQ-packed experts: Triton kernels and the routing bookkeeping.

The ``T * k`` routed slots (slot ``s = t * k + j`` is token ``t``'s ``j``-th expert) are sorted by
expert and each expert's run is padded to a multiple of ``BLOCK_M``, so that every block of
``BLOCK_M`` sorted slots belongs to one expert (:func:`moe_align`). Then:

1. ``gate_up``: per block, ``silu(x W1_e^T) * (x W3_e^T)`` from the packed ``w13`` of expert
   ``e`` -> intermediate ``[T*k, I]`` (in the activation dtype);
2. ``down``: per block, ``topk_weight * (h W2_e^T)`` -> float32 ``[T*k, H]`` (split-K programs add
   atomically), and the ``k`` slots of each token are summed afterwards.

When experts see at most two tokens each (decode), the same two steps run without sorting, one
routed slot per program with the GEMV inner loop of :mod:`moequant.kernels.triton_gemv`; split-K
parts and a token's ``k`` slots meet in a float32 workspace, summed in order by the last program
to arrive, which writes the output in the activation dtype (two launches in all).

Experts without tokens get no blocks and are never read. Import after ``TRITON_INTERPRET`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moequant.kernels.reference import check_moe_shapes
from moequant.kernels.triton_dot import decode_row, rows_dot
from moequant.kernels.triton_launch import (
    check_tiles,
    device_programs,
    dot_dtype,
    inline_asm,
    launch_fitting,
    packed_args,
    pick_block_k,
    pipeline_depth,
    rows_args,
    stages_for,
    weights_left_applies,
)
from moequant.kernels.triton_split import k_split, last_to_arrive, split_counters, split_for
from moequant.kernels.triton_unpack import group_mode
from moequant.packed.experts import PackedExperts


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort routed slots by expert and pad each expert's run to a multiple of ``block_m``.

    Runs on the ids' device without synchronising.

    Args:
        topk_ids: int ``[T, k]`` expert of every slot.
        num_experts: E.
        block_m: block size of the kernels.

    Returns:
        ``(sorted_ids, expert_ids, num_post_pad)``:

        - ``sorted_ids`` int32 ``[P]``: slot indices (``t * k + j``) grouped by expert in ascending
          expert order, stable within an expert; padding entries hold ``T * k``. ``P`` is a
          multiple of ``block_m`` large enough for any routing.
        - ``expert_ids`` int32 ``[P / block_m]``: the expert of each block, -1 past the end.
        - ``num_post_pad`` int32 ``[1]``: how many entries of ``sorted_ids`` are in use.
    """
    flat = topk_ids.reshape(-1).long()
    slots = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    first_sorted = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(slots, device=device) - first_sorted[expert_of]
    capacity = slots + min(num_experts, slots) * (block_m - 1)
    num_blocks = triton.cdiv(max(capacity, 1), block_m)
    sorted_ids = torch.full((num_blocks * block_m,), slots, dtype=torch.int32, device=device)
    sorted_ids[starts[expert_of] + rank] = order.to(torch.int32)
    block_starts = torch.arange(num_blocks, device=device) * block_m
    expert_ids = torch.searchsorted(ends, block_starts, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    num_post_pad = ends[-1:].to(torch.int32)
    return sorted_ids, expert_ids, num_post_pad


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    sorted_ptr,
    expert_ptr,
    npad_ptr,
    num_slots,
    top_k,
    H,
    inter,
    k_words,
    n_words,
    stride_xm,
    stride_xk,
    stride_qe,
    stride_qk,
    stride_qn,
    stride_ze,
    stride_zg,
    stride_zn,
    stride_se,
    stride_sg,
    stride_sn,
    stride_ge,
    stride_om,
    stride_on,
    group_size,
    BITS: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    WEIGHTS_LEFT: tl.constexpr,
    STAGES: tl.constexpr,
    ASM: tl.constexpr,
    EVEN: tl.constexpr = False,
):
    """One block of ``BLOCK_M`` sorted slots of one expert: ``silu(gate) * up``, gate and up from
    one :func:`rows_dot` loop (``WEIGHTS_LEFT`` and ``EVEN`` as there)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(npad_ptr):
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slot < num_slots
    tok = slot // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < inter
    qw_e = qw_ptr + e * stride_qe
    qz_e = qz_ptr + e * stride_ze
    s_e = s_ptr + e * stride_se
    g_e = g_ptr + e * stride_ge
    acc_gate, acc_up = rows_dot(
        x_ptr + tok * stride_xm, valid, stride_xk, qw_e, qz_e, s_e, g_e, offs_n, mask_n, 0, H,
        k_words, n_words, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
        BITS, GROUP_MODE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, IEEE_FP32, WEIGHTS_LEFT, STAGES, ASM,
        inter, True, False, EVEN,
    )  # fmt: skip
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(
        out_ptr + slot[:, None] * stride_om + offs_n[None, :] * stride_on,
        h.to(out_ptr.dtype.element_ty),
        mask=valid[:, None] & mask_n[None, :],
    )


@triton.jit
def _moe_down_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    weight_ptr,
    sorted_ptr,
    expert_ptr,
    npad_ptr,
    num_slots,
    inter,
    H,
    k_words,
    n_words,
    stride_xm,
    stride_xk,
    stride_qe,
    stride_qk,
    stride_qn,
    stride_ze,
    stride_zg,
    stride_zn,
    stride_se,
    stride_sg,
    stride_sn,
    stride_ge,
    stride_om,
    stride_on,
    group_size,
    k_per_split,
    BITS: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC_ADD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    WEIGHTS_LEFT: tl.constexpr,
    STAGES: tl.constexpr,
    ASM: tl.constexpr,
    EVEN: tl.constexpr = False,
):
    """One block of ``BLOCK_M`` sorted slots of one expert, one split of K: the routing-weighted
    down projection of the intermediate ``x [T*k, I]`` into float32 ``[T*k, H]`` (``WEIGHTS_LEFT``
    and ``EVEN`` as for the gate/up kernel)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(npad_ptr):
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slot < num_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    qw_e = qw_ptr + e * stride_qe
    qz_e = qz_ptr + e * stride_ze
    s_e = s_ptr + e * stride_se
    g_e = g_ptr + e * stride_ge
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, inter)
    acc = rows_dot(
        x_ptr + slot * stride_xm, valid, stride_xk, qw_e, qz_e, s_e, g_e, offs_n, mask_n,
        k_lo, k_hi, k_words, n_words, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
        group_size, BITS, GROUP_MODE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, IEEE_FP32, WEIGHTS_LEFT, STAGES,
        ASM, 0, False, False, EVEN,
    )  # fmt: skip
    route_w = tl.load(weight_ptr + slot, mask=valid, other=0.0).to(tl.float32)
    acc = acc * route_w[:, None]
    out_ptrs = out_ptr + slot[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = valid[:, None] & mask_n[None, :]
    if ATOMIC_ADD:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _moe_gemv_gate_up_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    ids_ptr,
    ws_ptr,
    count_ptr,
    top_k,
    H,
    inter,
    k_words,
    n_words,
    stride_xm,
    stride_xk,
    stride_qe,
    stride_qk,
    stride_qn,
    stride_ze,
    stride_zg,
    stride_zn,
    stride_se,
    stride_sg,
    stride_sn,
    stride_ge,
    stride_om,
    stride_on,
    group_size,
    k_per_split,
    splits,
    BITS: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ASM: tl.constexpr,
    EVEN: tl.constexpr,
    STAGES: tl.constexpr,
    WEIGHTS_LEFT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Decode form of the gate/up kernel: one routed slot per program (grid ``[T*k, I blocks,
    splits]``), :func:`decode_row` for the gate and up columns, ``silu(gate) * up`` stored for the
    slot. With split-K, gate and up parts meet in the float32 workspace ``[splits, T*k, 2I]`` and
    the last program of a tile adds them in split order before the product."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    x_row = x_ptr + (slot // top_k) * stride_xm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < inter
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, H)
    qw_e = qw_ptr + e * stride_qe
    qz_e = qz_ptr + e * stride_ze
    s_e = s_ptr + e * stride_se
    g_e = g_ptr + e * stride_ge
    gate, up = decode_row(
        x_row, stride_xk, qw_e, qz_e, s_e, g_e, offs_n, inter, k_lo, k_hi, k_words, n_words,
        stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
        BITS, GROUP_MODE, BLOCK_N, BLOCK_K, ASM, EVEN, STAGES, WEIGHTS_LEFT, DOT_DTYPE, inter, True,
    )  # fmt: skip
    out_ptrs = out_ptr + slot * stride_om + offs_n * stride_on
    if splits == 1:
        tl.store(out_ptrs, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        row = 2 * inter
        split_stride = tl.num_programs(0) * row
        ws_gate = ws_ptr + slot * row + offs_n
        tl.store(ws_gate + pid_k * split_stride, gate, mask=mask_n)
        tl.store(ws_gate + pid_k * split_stride + inter, up, mask=mask_n)
        if last_to_arrive(count_ptr, slot * tl.num_programs(1) + pid_n, splits):
            gate = tl.zeros((BLOCK_N,), tl.float32)
            up = tl.zeros((BLOCK_N,), tl.float32)
            for i in range(splits):
                gate += tl.load(ws_gate + i * split_stride, mask=mask_n, other=0.0, cache_modifier=".cg")
                up += tl.load(
                    ws_gate + i * split_stride + inter, mask=mask_n, other=0.0, cache_modifier=".cg"
                )
            tl.store(out_ptrs, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _moe_gemv_down_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    weight_ptr,
    ids_ptr,
    ws_ptr,
    count_ptr,
    top_k,
    inter,
    H,
    k_words,
    n_words,
    stride_xm,
    stride_xk,
    stride_qe,
    stride_qk,
    stride_qn,
    stride_ze,
    stride_zg,
    stride_zn,
    stride_se,
    stride_sg,
    stride_sn,
    stride_ge,
    stride_om,
    stride_on,
    group_size,
    k_per_split,
    splits,
    BITS: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ASM: tl.constexpr,
    EVEN: tl.constexpr,
    STAGES: tl.constexpr,
    WEIGHTS_LEFT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Decode form of the down kernel on the intermediate ``x [T*k, I]``: one routed slot per
    program (grid ``[T*k, H blocks, splits]``), the routing weight applied. A token's ``k`` slots and their splits meet in the
    float32 workspace ``[splits, T*k, H]``; the last of them to arrive adds the parts (slots, then
    splits, in order) and stores the token's output row in its dtype."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, inter)
    acc = decode_row(
        x_ptr + slot * stride_xm, stride_xk, qw_ptr + e * stride_qe, qz_ptr + e * stride_ze,
        s_ptr + e * stride_se, g_ptr + e * stride_ge, offs_n, H, k_lo, k_hi, k_words, n_words,
        stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
        BITS, GROUP_MODE, BLOCK_N, BLOCK_K, ASM, EVEN, STAGES, WEIGHTS_LEFT, DOT_DTYPE,
    )  # fmt: skip
    acc = acc * tl.load(weight_ptr + slot).to(tl.float32)
    token = slot // top_k
    out_ptrs = out_ptr + token * stride_om + offs_n * stride_on
    if top_k * splits == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        split_stride = tl.num_programs(0) * H
        tl.store(ws_ptr + pid_k * split_stride + slot * H + offs_n, acc, mask=mask_n)
        if last_to_arrive(count_ptr, token * tl.num_programs(1) + pid_n, top_k * splits):
            total = tl.zeros((BLOCK_N,), tl.float32)
            for j in range(top_k):
                ws_row = ws_ptr + (token * top_k + j) * H + offs_n
                for i in range(splits):
                    total += tl.load(ws_row + i * split_stride, mask=mask_n, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask_n)


@dataclass(frozen=True)
class MoeConfig:
    """Tile sizes of the two MoE kernels; ``split_k`` applies to the down projection,
    ``split_k_gate_up`` to the decode kernels' gate/up projection.

    ``gemv=True`` selects the decode kernels (one routed slot per program, no ``tl.dot``, no
    sorting); they take ``block_m=1``. ``weights_left=True``: the kernels take the weight tile
    as the left operand of a dot (:func:`~moequant.kernels.triton_weights_left.dot_weights_left`; the
    decode kernels on a 16-row block holding their one row) where the activations are 16-bit and a
    K tile lies in one group.
    """

    block_m: int
    block_n: int
    block_k_gate_up: int
    block_k_down: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False
    split_k_gate_up: int = 1
    weights_left: bool = False

    def __post_init__(self) -> None:
        if self.gemv:
            if self.block_m != 1:
                raise ValueError(
                    f"the gemv kernels take one slot per program: block_m must be 1, got {self.block_m}"
                )
            check_tiles(16, self.block_n, self.block_k_gate_up, self.block_k_down)
        else:
            check_tiles(self.block_m, self.block_n, self.block_k_gate_up, self.block_k_down)
        if self.split_k < 1 or self.split_k_gate_up < 1:
            raise ValueError(
                f"split_k and split_k_gate_up must be >= 1, got {self.split_k}, {self.split_k_gate_up}"
            )
        if self.split_k_gate_up > 1 and not self.gemv:
            raise ValueError("split_k_gate_up is for the decode kernels (gemv=True)")


MOE_GEMV_MAX_SLOTS_PER_EXPERT = 2.0  # up to this many routed slots per expert, the decode kernels


def pick_moe_config(
    slots: int,
    num_experts: int,
    hidden: int,
    inter: int,
    group_w13: int,
    group_w2: int,
    device: torch.device,
    bits: int = 4,
) -> MoeConfig:
    """Tiles for ``slots = T * k`` routed slots: the decode kernels while experts see two tokens
    or fewer each, since re-reading an expert per slot costs less there than filling 16-row tiles
    (2, 3 and 4-bit codes on the weights-left dot with 128 columns, 8-bit ones on the GEMV with 32
    columns for a single token, else 128; both projections split along K to about four programs
    per SM; weights-left ones pipelined by :func:`pipeline_depth`); then weights-left blocks of 16
    to 64 slots by tokens per expert (128 x 128 tiles)."""
    per_expert = slots / max(num_experts, 1)
    if per_expert <= MOE_GEMV_MAX_SLOTS_PER_EXPERT:
        bk13 = pick_block_k(group_w13, 128)
        bk2 = pick_block_k(group_w2, 128)
        paired = bits in (2, 3, 4)
        bn, warps = (32, 2) if slots <= 4 and bits == 8 else (128, 4)
        target = 4 * device_programs(device)
        split = split_for(inter, bk2, slots * triton.cdiv(hidden, bn), target)
        split13 = split_for(hidden, bk13, slots * triton.cdiv(inter, bn), target)
        stages = pipeline_depth(bits, bn, min(bk13, bk2)) if paired else 3
        return MoeConfig(
            1, bn, bk13, bk2, split, num_warps=warps, num_stages=stages, gemv=True, split_k_gate_up=split13,
            weights_left=paired,
        )
    block_m = 16 if per_expert <= 16 else (32 if per_expert <= 64 else 64)
    bk13 = pick_block_k(group_w13, 128)
    bk2 = pick_block_k(group_w2, 128)
    active_blocks = min(num_experts, slots) + triton.cdiv(slots, block_m)
    tiles = active_blocks * triton.cdiv(hidden, 128)
    split = split_for(inter, bk2, tiles, device_programs(device)) if block_m <= 32 else 1
    return MoeConfig(block_m, 128, bk13, bk2, split, weights_left=True)


def _group_mode(w: PackedExperts, block_k: int) -> int:
    """The ``GROUP_MODE`` of a launch over ``w`` with ``block_k``-deep K tiles."""
    return group_mode(w.has_sorted_groups(), w.group_size, block_k, w.in_features)


def _weights_args(w: PackedExperts) -> dict[str, torch.Tensor | int]:
    """The launch arguments of the packed experts ``w`` (see :func:`packed_args`)."""
    return packed_args(w.qweight, w.qzeros, w.scales, w.g_idx, w.group_size)


def fused_moe_triton(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: PackedExperts,
    w2: PackedExperts,
    *,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """Sparse-MoE block ``sum_j topk_weights[t, j] * w2_e(silu(w1_e x_t) * w3_e x_t)`` over packed experts.

    Args:
        x: ``[T, H]`` float16, bfloat16 or float32 on the kernels' device.
        topk_ids: int ``[T, k]``; topk_weights: ``[T, k]``.
        w13: gate and up joined along N, ``W13_e [2I, H]``; w2: ``W2_e [H, I]`` (see
            :class:`~moequant.packed.experts.PackedExperts`). Whether their ``g_idx`` is sorted is
            checked once per object (one synchronisation) unless ``sorted_groups`` is already set.
        config: tile sizes; picked from the shapes when None.

    Returns:
        ``[T, H]`` in ``x.dtype``.
    """
    check_moe_shapes(x, topk_ids, topk_weights, w13, w2)
    t, hidden = x.shape
    top_k = topk_ids.shape[1]
    inter = w2.in_features
    slots = t * top_k
    if slots == 0:
        return x.new_zeros(t, hidden)
    cfg = config or pick_moe_config(
        slots, w13.num_experts, hidden, inter, w13.group_size, w2.group_size, x.device, bits=w13.bits
    )
    dtype, ieee = dot_dtype(x.dtype, x.device)
    if cfg.gemv:
        return _fused_moe_gemv(x, topk_ids, topk_weights, w13, w2, cfg)
    sorted_ids, expert_ids, num_post_pad = moe_align(topk_ids, w13.num_experts, cfg.block_m)
    num_blocks = expert_ids.numel()

    mode13 = _group_mode(w13, cfg.block_k_gate_up)
    h = x.new_empty(slots, inter)
    args13 = {
        **rows_args(x, h), **_weights_args(w13), "sorted_ptr": sorted_ids, "expert_ptr": expert_ids,
        "npad_ptr": num_post_pad, "num_slots": slots, "top_k": top_k, "H": hidden, "inter": inter,
    }  # fmt: skip
    launch_fitting(
        _moe_gate_up_kernel, (num_blocks, triton.cdiv(inter, cfg.block_n)), args13,
        stages_for(mode13, cfg.num_stages), x.device,
        BITS=w13.bits, GROUP_MODE=mode13, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k_gate_up, DOT_DTYPE=dtype, IEEE_FP32=ieee,
        WEIGHTS_LEFT=weights_left_applies(cfg.weights_left, mode13, x.dtype),
        ASM=inline_asm(x.device),
        EVEN=hidden % cfg.block_k_gate_up == 0 and inter % cfg.block_n == 0,
        num_warps=cfg.num_warps,
    )  # fmt: skip

    mode2 = _group_mode(w2, cfg.block_k_down)
    k_per_split, split = k_split(inter, cfg.split_k, cfg.block_k_down)
    y = torch.zeros(slots, hidden, device=x.device, dtype=torch.float32)
    args2 = {
        **rows_args(h, y), **_weights_args(w2), "weight_ptr": topk_weights.reshape(-1), "sorted_ptr": sorted_ids,
        "expert_ptr": expert_ids, "npad_ptr": num_post_pad, "num_slots": slots, "inter": inter, "H": hidden,
        "k_per_split": k_per_split,
    }  # fmt: skip
    launch_fitting(
        _moe_down_kernel, (num_blocks, triton.cdiv(hidden, cfg.block_n), split), args2,
        stages_for(mode2, cfg.num_stages), x.device,
        BITS=w2.bits, GROUP_MODE=mode2, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k_down, ATOMIC_ADD=split > 1, DOT_DTYPE=dtype, IEEE_FP32=ieee,
        WEIGHTS_LEFT=weights_left_applies(cfg.weights_left, mode2, x.dtype),
        ASM=inline_asm(x.device),
        EVEN=inter % cfg.block_k_down == 0 and hidden % cfg.block_n == 0,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return y.view(t, top_k, hidden).sum(dim=1).to(x.dtype)


def _fused_moe_gemv(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: PackedExperts,
    w2: PackedExperts,
    cfg: MoeConfig,
) -> torch.Tensor:
    """:func:`fused_moe_triton` with the decode kernels: ``[T, H]`` in ``x.dtype``."""
    t, hidden = x.shape
    top_k = topk_ids.shape[1]
    inter = w2.in_features
    slots = t * top_k
    ids = topk_ids.reshape(-1)
    asm = inline_asm(x.device)
    dtype, _ = dot_dtype(x.dtype, x.device)

    mode13 = _group_mode(w13, cfg.block_k_gate_up)
    h = x.new_empty(slots, inter)
    kps13, split13 = k_split(hidden, cfg.split_k_gate_up, cfg.block_k_gate_up)
    grid13 = (slots, triton.cdiv(inter, cfg.block_n), split13)
    ws13 = torch.empty(split13, slots, 2 * inter, device=x.device, dtype=torch.float32) if split13 > 1 else h
    counts13 = split_counters(x.device, slots * grid13[1]) if split13 > 1 else ids
    args13 = {
        **rows_args(x, h), **_weights_args(w13), "ids_ptr": ids, "ws_ptr": ws13, "count_ptr": counts13,
        "top_k": top_k, "H": hidden, "inter": inter, "k_per_split": kps13, "splits": split13,
    }  # fmt: skip
    launch_fitting(
        _moe_gemv_gate_up_kernel, grid13, args13, stages_for(mode13, cfg.num_stages), x.device,
        BITS=w13.bits, GROUP_MODE=mode13, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k_gate_up,
        ASM=asm, EVEN=hidden % cfg.block_k_gate_up == 0 and inter % cfg.block_n == 0,
        WEIGHTS_LEFT=weights_left_applies(cfg.weights_left, mode13, x.dtype), DOT_DTYPE=dtype,
        num_warps=cfg.num_warps,
    )  # fmt: skip

    mode2 = _group_mode(w2, cfg.block_k_down)
    kps2, split2 = k_split(inter, cfg.split_k, cfg.block_k_down)
    grid2 = (slots, triton.cdiv(hidden, cfg.block_n), split2)
    y = x.new_empty(t, hidden)
    parts = top_k * split2 > 1
    ws2 = torch.empty(split2, slots, hidden, device=x.device, dtype=torch.float32) if parts else y
    counts2 = split_counters(x.device, t * grid2[1]) if parts else ids
    args2 = {
        **rows_args(h, y), **_weights_args(w2), "weight_ptr": topk_weights.reshape(-1), "ids_ptr": ids,
        "ws_ptr": ws2, "count_ptr": counts2, "top_k": top_k, "inter": inter, "H": hidden,
        "k_per_split": kps2, "splits": split2,
    }  # fmt: skip
    launch_fitting(
        _moe_gemv_down_kernel, grid2, args2, stages_for(mode2, cfg.num_stages), x.device,
        BITS=w2.bits, GROUP_MODE=mode2, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k_down,
        ASM=asm, EVEN=inter % cfg.block_k_down == 0 and hidden % cfg.block_n == 0,
        WEIGHTS_LEFT=weights_left_applies(cfg.weights_left, mode2, x.dtype), DOT_DTYPE=dtype,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return y
