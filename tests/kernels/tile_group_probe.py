"""A kernel that applies ``tile_group`` to a vector of K tile starts (imported only with Triton)."""

from __future__ import annotations

import triton
import triton.language as tl

from moequant.kernels.triton_unpack import tile_group


@triton.jit
def tile_group_kernel(k_ptr, out_ptr, n, group_size, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k0 = tl.load(k_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + offs, tile_group(k0, group_size), mask=offs < n)
