"""Launch rules shared by the dense and MoE kernels: tile checks, programs per device, pipeline
depth, dot dtype, inline PTX, the launch arguments of packed weights, and launches that fall back
to fewer pipeline stages where shared memory is short.
"""

from __future__ import annotations

import functools

import torch
import triton.language as tl

from moequant.errors import MoequantError
from moequant.kernels.triton_unpack import GROUPS_PER_TILE


def check_tiles(block_m: int, block_n: int, *block_ks: int) -> None:
    """Raise ValueError unless the tile sizes suit ``tl.dot`` and whole-word unpacking."""
    sizes = (block_m, block_n, *block_ks)
    if any(v & (v - 1) for v in sizes) or min(block_m, block_n) < 16 or min(block_ks) < 32:
        raise ValueError(f"tile sizes {sizes} must be powers of two, M and N >= 16, K >= 32")


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_programs(device: torch.device) -> int:
    """How many concurrently running programs make the device busy (2 per SM on CUDA, 1 elsewhere)."""
    if device.type != "cuda":
        return 1
    return 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def pick_block_k(group_size: int, default: int) -> int:
    """``default``, shrunk to the group size when groups are smaller (keeps a tile in one group).

    Tiles stay at least 32 rows deep: the kernels unpack whole 32-value blocks.
    """
    if group_size < default and group_size >= 32 and group_size & (group_size - 1) == 0:
        return group_size
    return default


IN_FLIGHT_BYTES = 16 * 1024


def pipeline_depth(bits: int, block_n: int, block_k: int, most: int = 5) -> int:
    """Software-pipeline stages (3 to ``most``) that keep about ``IN_FLIGHT_BYTES`` of packed codes
    loading ahead of each program (``stages - 1`` tiles of ``block_k x block_n`` codes): decode reads
    at full bandwidth only with enough bytes in flight per SM.
    """
    tile = block_n * block_k * bits // 8
    return min(most, max(3, 1 + -(-IN_FLIGHT_BYTES // tile)))


def dot_dtype(x_dtype: torch.dtype, device: torch.device) -> tuple[tl.dtype, bool]:
    """Triton dtype for ``tl.dot`` operands and whether fp32 needs exact ("ieee") products.

    The interpreter computes bf16 dots wrongly, so on CPU bf16 is widened to fp32.
    """
    if x_dtype == torch.float16:
        return tl.float16, False
    if x_dtype == torch.bfloat16 and device.type == "cuda":
        return tl.bfloat16, False
    if x_dtype in (torch.bfloat16, torch.float32):
        return tl.float32, True
    raise MoequantError(f"activations of dtype {x_dtype} are not supported: use float16, bfloat16 or float32")


def weights_left_applies(requested: bool, mode: int, x_dtype: torch.dtype) -> bool:
    """Whether a launch asked for the weights-left dot can take it: 16-bit activations and a K
    tile in one group (``mode`` ``GROUPS_PER_TILE``)."""
    return requested and mode == GROUPS_PER_TILE and x_dtype in (torch.float16, torch.bfloat16)


def inline_asm(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` take their inline-PTX forms (``ASM``): only compiled
    for CUDA; Triton's CPU interpreter runs the plain forms of the same arithmetic."""
    return device.type == "cuda"


def stages_for(mode: int, num_stages: int) -> int:
    """Pipeline depth: per-row scale and zero lookups stage whole tiles, so they get at most 2."""
    return num_stages if mode == GROUPS_PER_TILE else min(num_stages, 2)


def packed_args(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, group_size: int
) -> dict[str, torch.Tensor | int]:
    """A packed weight's launch arguments: pointers ``qw_ptr, qz_ptr, s_ptr, g_ptr``, word counts
    ``k_words, n_words``, strides ``stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn``
    and ``group_size``.

    ``qweight`` int32 ``[K*b/32, N]``, ``qzeros`` int32 ``[G, N*b/32]``, ``scales`` ``[G, N]``,
    ``g_idx`` int32 ``[K]`` or None (then ``g_ptr`` is a pointer the kernel does not read); or
    stacked experts, each with a leading ``[E]`` (``g_idx`` ``[E, K]`` or one ``[K]`` for all), which
    adds the expert strides ``stride_qe, stride_ze, stride_se, stride_ge``.
    """
    g = g_idx if g_idx is not None else qweight
    args = {
        "qw_ptr": qweight,
        "qz_ptr": qzeros,
        "s_ptr": scales,
        "g_ptr": g,
        "k_words": qweight.shape[-2],
        "n_words": qzeros.shape[-1],
        "stride_qk": qweight.stride(-2),
        "stride_qn": qweight.stride(-1),
        "stride_zg": qzeros.stride(-2),
        "stride_zn": qzeros.stride(-1),
        "stride_sg": scales.stride(-2),
        "stride_sn": scales.stride(-1),
        "group_size": group_size,
    }
    if qweight.dim() == 3:
        args["stride_qe"] = qweight.stride(0)
        args["stride_ze"] = qzeros.stride(0)
        args["stride_se"] = scales.stride(0)
        args["stride_ge"] = g.stride(0) if g.dim() == 2 else 0
    return args


def rows_args(x: torch.Tensor, out: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """A launch's activations ``x [M, K]`` and output ``out [M', N]`` as arguments: pointers
    ``x_ptr, out_ptr`` and strides ``stride_xm, stride_xk, stride_om, stride_on``."""
    return {
        "x_ptr": x,
        "out_ptr": out,
        "stride_xm": x.stride(0),
        "stride_xk": x.stride(1),
        "stride_om": out.stride(0),
        "stride_on": out.stride(1),
    }


_FITTING_STAGES: dict[tuple, int] = {}


def launch_fitting(kernel, grid: tuple, args: dict, stages: int, device: torch.device, **consts) -> None:
    """``kernel[grid](**args, STAGES=s, num_stages=s, **consts)`` with ``s = stages``, or with fewer
    stages where the GPU lacks the shared memory for that many (Triton's ``OutOfResources``, raised
    before anything runs); the depth that fits is remembered per kernel, device and constants.
    """
    from triton.runtime.errors import OutOfResources

    name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))

    def key() -> tuple:
        return name, device.type, device.index, stages, tuple(sorted((k, str(v)) for k, v in consts.items()))

    depth = _FITTING_STAGES.get(key(), stages) if _FITTING_STAGES else stages  # no key to build until a miss
    while True:
        try:
            kernel[grid](**args, STAGES=depth, num_stages=depth, **consts)
            break
        except OutOfResources as exc:
            if depth <= 1:
                raise MoequantError(
                    f"the {name} kernel needs more shared memory than {device} has ({exc.required} bytes, limit "
                    f"{exc.limit}) even without pipelining; load the model with backend='torch'"
                ) from exc
            depth -= 1
    if depth != stages:
        _FITTING_STAGES[key()] = depth
