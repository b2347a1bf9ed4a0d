"""Split-K: several programs along K for one output tile, finished in the same launch.

Each program stores its float32 part in a workspace; the last to arrive at the tile's counter
adds the parts in split order (so results do not depend on timing) and writes the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def last_to_arrive(count_ptr, tile, arrivals):
    """Whether this program is the last of ``arrivals`` to reach the counter ``count_ptr + tile``
    (zero before the launch); the last one sets it back to zero for the next launch.

    What every thread of a program stored before the call is visible to the last program after it:
    the counter moves with release and acquire semantics after a barrier across the program.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == arrivals - 1
    if last:
        tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def store_split(acc, out_ptrs, mask, ws_ptr, ws_offs, split_stride, count_ptr, tile, pid_k, splits):
    """Finish one split-K program's part ``acc`` of an output tile, in the same launch.

    The part goes to ``ws_ptr + pid_k * split_stride + ws_offs`` (float32 workspace); the program
    that arrives last at the tile's counter adds the ``splits`` parts in split order, so results
    do not depend on timing, and stores the sum in the output's dtype.
    """
    tl.store(ws_ptr + pid_k * split_stride + ws_offs, acc, mask=mask)
    if last_to_arrive(count_ptr, tile, splits):
        total = tl.zeros(acc.shape, tl.float32)
        for i in range(splits):
            total += tl.load(ws_ptr + i * split_stride + ws_offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)


def split_for(k: int, block_k: int, tiles: int, target_programs: int) -> int:
    """Split-K factor that brings ``tiles * split`` up to ``target_programs``, at most one split per K block."""
    k_blocks = triton.cdiv(k, block_k)
    want = triton.cdiv(target_programs, max(tiles, 1))
    return max(1, min(want, k_blocks, 32))


def k_split(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """``(K per split, splits)`` for a requested split: whole ``block_k`` tiles per split."""
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


_SPLIT_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}
MAX_COUNTER_STREAMS = 32  # counter buffers kept, one per (device, stream), least recently used dropped


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` int32 arrival counters, all zero, for one split-K launch on ``device``.

    Launches leave their counters at zero (see :func:`store_split`), so on CUDA one buffer per
    stream serves every launch in stream order; while a CUDA graph is being captured each launch
    gets its own (the graph keeps it), and elsewhere (the interpreter) too.
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(count, dtype=torch.int32, device=device)
    key = (
        device.index if device.index is not None else torch.cuda.current_device(),
        torch.cuda.current_stream(device).cuda_stream,
    )
    buf = _SPLIT_COUNTERS.pop(key, None)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    _SPLIT_COUNTERS[key] = buf  # most recently used last
    if len(_SPLIT_COUNTERS) > MAX_COUNTER_STREAMS:
        # Memory freed here returns to the pool of the stream it was made on: no other stream's
        # launch can be handed it while that stream's kernels may still use it.
        del _SPLIT_COUNTERS[next(iter(_SPLIT_COUNTERS))]
    return buf
