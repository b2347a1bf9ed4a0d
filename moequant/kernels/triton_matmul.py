"""Dense Triton matmuls over GPTQ-packed weights: the kernels, their tile choice and entry points.

``y[M, N] = x[M, K] @ W^T`` with ``W [N, K]`` packed as ``qweight int32 [K*b/32, N]``,
``qzeros int32 [G, N*b/32]`` (``z - 1``), ``scales fp16 [G, N]``, dequantised in registers
(:mod:`moequant.kernels.triton_unpack`). The forms, chosen by :func:`pick_config` from the row
count, bits and activation dtype:

- up to 64 rows (from one row for 2, 3 and 4-bit codes with 16-bit activations): ``tl.dot`` with the
  weight tile as the left operand (:mod:`moequant.kernels.triton_weights_left`);
- one row otherwise (decode): the GEMV, products and sums in float32 registers without ``tl.dot``
  (:mod:`moequant.kernels.triton_gemv`);
- otherwise up to ``DEQUANT_MIN_ROWS``, and where the weights-left form does not apply (float32
  activations, a ``g_idx`` to read, groups smaller than a K tile): ``tl.dot`` on the unpacked
  ``q - z`` tile (:func:`~moequant.kernels.triton_dot.dot_dequant`);
- more rows (prefill): ``W^T`` written once in the activation dtype, then torch's matmul.

Split-K finishes in the same launch (:mod:`moequant.kernels.triton_split`).

Import this module only after ``TRITON_INTERPRET`` has its final value: Triton decides at
decoration time whether kernels are compiled or interpreted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moequant.errors import MoequantError
from moequant.kernels.triton_dot import rows_dot
from moequant.kernels.triton_gemv import gemv_row
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
from moequant.kernels.triton_split import k_split, split_counters, split_for, store_split
from moequant.kernels.triton_unpack import GROUPS_PER_TILE, dequant_tile, group_mode
from moequant.packed.shapes import check_packed
from moequant.packed.widths import effective_group_size

GEMV_MAX_ROWS = 1  # up to this many rows, the gemv kernel where the weights-left dot does not apply
# From this many activation rows on, dequant_matmul_triton writes W^T once in the activation dtype
# and multiplies with torch (one dequantising pass costs about one read of the 16-bit weight).
DEQUANT_MIN_ROWS = 128


@triton.jit
def _dequant_matmul_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    ws_ptr,
    count_ptr,
    M,
    N,
    K,
    k_words,
    n_words,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    stride_om,
    stride_on,
    group_size,
    k_per_split,
    splits,
    BITS: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    WEIGHTS_LEFT: tl.constexpr,
    STAGES: tl.constexpr,
    ASM: tl.constexpr,
    GEMV: tl.constexpr,
    EVEN: tl.constexpr,
    ONE_ROW: tl.constexpr = False,
):
    """``y = x @ W^T`` by ``[BLOCK_M, BLOCK_N]`` tiles (grid ``[M blocks * N blocks, splits]``),
    each by :func:`rows_dot`, or with ``GEMV`` (``BLOCK_M = 1``, no dot) by :func:`gemv_row`.
    ``EVEN``: every tile is whole (see :func:`gemv_row`). ``ONE_ROW``: ``M = 1`` on the
    weights-left dot (see :func:`rows_dot`)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if GEMV:
        acc = gemv_row(
            x_ptr + pid_m * stride_xm, stride_xk, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, N, k_lo, k_hi,
            k_words, n_words, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
            BITS, GROUP_MODE, BLOCK_N, BLOCK_K, ASM, EVEN, STAGES,
        )[None, :]  # fmt: skip
    else:
        if ONE_ROW:
            row_ptrs = x_ptr
        else:
            row_ptrs = x_ptr + offs_m * stride_xm
        acc = rows_dot(
            row_ptrs, mask_m, stride_xk, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, mask_n,
            k_lo, k_hi, k_words, n_words, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
            group_size, BITS, GROUP_MODE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, IEEE_FP32, WEIGHTS_LEFT,
            STAGES, ASM, 0, False, ONE_ROW, EVEN,
        )  # fmt: skip
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K:
        ws_offs = offs_m[:, None] * N + offs_n[None, :]
        store_split(acc, out_ptrs, out_mask, ws_ptr, ws_offs, M * N, count_ptr, pid, pid_k, splits)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequant_kernel(
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    N,
    K,
    k_words,
    n_words,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    stride_ok,
    stride_on,
    group_size,
    BITS: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``W^T [K, N]`` in the output's dtype, one ``[BLOCK_K, BLOCK_N]`` tile per program."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    w = dequant_tile(
        qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n, k0, k_words, n_words,
        stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, group_size,
        BITS, GROUP_MODE, out_ptr.dtype.element_ty, BLOCK_K, BLOCK_N,
    )  # fmt: skip
    tl.store(
        out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on,
        w,
        mask=mask_k[:, None] & mask_n[None, :],
    )


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes of one launch: powers of two, ``block_m, block_n >= 16``, ``block_k >= 32``.

    ``gemv=True`` selects the one-row-per-program kernel (no ``tl.dot``); it takes ``block_m=1``.
    ``weights_left=True`` selects the dot kernel with the weight tile as the left operand (16-bit
    activations and one group per K tile; other launches take the plain dot kernel).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False
    weights_left: bool = False

    def __post_init__(self) -> None:
        if self.gemv:
            if self.block_m != 1:
                raise ValueError(
                    f"the gemv kernel takes one row per program: block_m must be 1, got {self.block_m}"
                )
            check_tiles(16, self.block_n, self.block_k)
            if self.weights_left:
                raise ValueError("gemv and weights_left are two different kernels: choose one")
        else:
            check_tiles(self.block_m, self.block_n, self.block_k)
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


def pick_config(
    m: int,
    n: int,
    k: int,
    group_size: int,
    device: torch.device,
    *,
    bits: int = 4,
    half: bool = True,
    sorted_groups: bool = True,
) -> MatmulConfig:
    """Tile sizes for ``[m, k] @ [k, n]`` at ``bits``; ``half``: 16-bit activations;
    ``sorted_groups``: no ``g_idx`` to read.

    Up to 64 rows, weights-left dot tiles (16, 32 or 64 rows x 128 x 128; 16-row tiles pipelined
    by :func:`pipeline_depth`), split-K to two programs per SM; for one row only where codes pair
    into 16-bit floats (2, 3 and 4 bits, 16-bit activations, a K tile in one group), else the GEMV
    with split-K to four programs per SM; more rows, plain 64 x 128 dot tiles. The weights-left
    forms take the fewest instructions per weight; the GEMV keeps the rows they cannot take.
    """
    tile_in_group = group_mode(sorted_groups, group_size, pick_block_k(group_size, 128), k) == GROUPS_PER_TILE
    if m <= GEMV_MAX_ROWS and not (half and bits in (2, 3, 4) and tile_in_group):
        bk = pick_block_k(group_size, 128)
        tiles = max(m, 1) * triton.cdiv(n, 128)
        split = split_for(k, bk, tiles, 2 * device_programs(device))
        return MatmulConfig(1, 128, bk, split, num_warps=4, num_stages=3, gemv=True)
    if m <= 64:
        bm = max(16, triton.next_power_of_2(m))
        bk = pick_block_k(group_size, 128)
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, 128)
        target = (2 if m <= GEMV_MAX_ROWS else 1) * device_programs(device)
        stages = pipeline_depth(bits, 128, bk) if bm == 16 else 3
        return MatmulConfig(bm, 128, bk, split_for(k, bk, tiles, target), 4, stages, weights_left=True)
    return MatmulConfig(64, 128, pick_block_k(group_size, 64), 1, 4, 3)


def dequant_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    *,
    sorted_groups: bool = False,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """``x @ W^T`` for a packed ``W [N, K]``, dequantising in the kernel.

    Args:
        x: ``[..., K]`` float16, bfloat16 or float32 activations on the kernel's device.
        qweight: int32 ``[K*b/32, N]``; qzeros: int32 ``[G, N*b/32]``; scales: ``[G, N]``.
        g_idx: int32 ``[K]``, or None for ``k // group_size``. A given ``g_idx`` is read by the
            kernel unless ``sorted_groups`` says it equals ``k // group_size`` (the fast path).
        bits: 2, 3, 4 or 8.
        group_size: the group size (-1 for one group over K).
        config: tile sizes; picked from the shape when None.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    k = x.shape[-1]
    n, _ = check_packed(qweight, qzeros, scales, None, bits, k)
    group_size = effective_group_size(group_size, k)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    sorted_groups = sorted_groups or g_idx is None
    if g_idx is not None and g_idx.shape != (k,):
        raise MoequantError(f"g_idx has shape {tuple(g_idx.shape)}, expected [{k}]")
    if sorted_groups and scales.shape[0] != triton.cdiv(k, group_size):
        raise MoequantError(
            f"{scales.shape[0]} groups of scales do not match K={k} with group_size={group_size}: "
            "pass the layer's group size"
        )
    dtype, ieee = dot_dtype(x.dtype, x.device)
    if m == 0:
        return x.new_zeros(*x.shape[:-1], n)
    if config is None and m >= DEQUANT_MIN_ROWS:
        wt = dequantize_triton(
            qweight, qzeros, scales, g_idx, bits, group_size, x.dtype, sorted_groups=sorted_groups
        )
        return (x2 @ wt).reshape(*x.shape[:-1], n)
    half = x.dtype in (torch.float16, torch.bfloat16)
    cfg = config or pick_config(
        m, n, k, group_size, x.device, bits=bits, half=half, sorted_groups=sorted_groups
    )
    mode = group_mode(sorted_groups, group_size, cfg.block_k, k)
    k_per_split, split = k_split(k, cfg.split_k, cfg.block_k)
    out = x.new_empty(m, n)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    # Split-K parts meet in a float32 workspace; the unused pointers are never read without it.
    ws = torch.empty(split, m, n, device=x.device, dtype=torch.float32) if split > 1 else out
    counts = split_counters(x.device, grid[0]) if split > 1 else qweight
    left = weights_left_applies(cfg.weights_left, mode, x.dtype)
    args = {
        **rows_args(x2, out),
        **packed_args(qweight, qzeros, scales, g_idx, group_size),
        "ws_ptr": ws, "count_ptr": counts, "M": m, "N": n, "K": k, "k_per_split": k_per_split, "splits": split,
    }  # fmt: skip
    launch_fitting(
        _dequant_matmul_kernel, grid, args, stages_for(mode, cfg.num_stages), x.device,
        BITS=bits, GROUP_MODE=mode, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=split > 1, DOT_DTYPE=dtype, IEEE_FP32=ieee,
        WEIGHTS_LEFT=left, ASM=inline_asm(x.device),
        GEMV=cfg.gemv, EVEN=k % cfg.block_k == 0 and n % cfg.block_n == 0, ONE_ROW=left and m == 1,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def dequantize_triton(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    *,
    sorted_groups: bool = False,
) -> torch.Tensor:
    """``W^T [K, N]`` in ``dtype`` from a packed ``W [N, K]`` (arguments as for
    :func:`dequant_matmul_triton`), in one pass over the packed tensors."""
    k = qweight.shape[0] * 32 // bits
    n, _ = check_packed(qweight, qzeros, scales, None, bits, k)
    group_size = effective_group_size(group_size, k)
    sorted_groups = sorted_groups or g_idx is None
    block_n, block_k = 64, pick_block_k(group_size, 64)
    mode = group_mode(sorted_groups, group_size, block_k, k)
    out = torch.empty(k, n, device=qweight.device, dtype=dtype)
    _dequant_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        **packed_args(qweight, qzeros, scales, g_idx, group_size),
        out_ptr=out, N=n, K=k, stride_ok=out.stride(0), stride_on=out.stride(1),
        BITS=bits, GROUP_MODE=mode, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out
