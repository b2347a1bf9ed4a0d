"""Kernel test setup: Triton runs in its CPU interpreter; packed layers come from quant.pack.

``TRITON_INTERPRET`` must be set before any kernel module is imported, because Triton picks
compiled or interpreted kernels when a function is decorated.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from moequant.packed.bitstream import pack_qweight, pack_qzeros  # noqa: E402
from moequant.packed.experts import PackedExperts  # noqa: E402


def random_packed(
    n: int, k: int, bits: int, group_size: int, seed: int, shuffled_groups: bool = False
) -> dict[str, torch.Tensor]:
    """A packed ``[n, k]`` linear with random codes, asymmetric zeros in ``[1, 2^b - 1]`` and scales
    sized so that ``x @ W^T`` of a unit-variance ``x`` is O(1)."""
    gen = torch.Generator().manual_seed(seed)
    g = k if group_size == -1 else group_size
    groups = k // g
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (n, k), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, maxq + 1, (groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) + 0.5) * (2.0 / (maxq * k**0.5))
    g_idx = torch.arange(k, dtype=torch.int32) // g
    if shuffled_groups:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return {
        "qweight": pack_qweight(codes, bits),
        "qzeros": pack_qzeros(zeros, bits),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx,
    }


def random_experts(
    e: int, n: int, k: int, bits: int, group_size: int, seed: int, shuffled_groups: bool = False
) -> PackedExperts:
    """``e`` random packed experts of shape ``[n, k]`` stacked (see :func:`random_packed`)."""
    parts = [random_packed(n, k, bits, group_size, seed * 1000 + i, shuffled_groups) for i in range(e)]
    return PackedExperts.stack(parts, bits, group_size)


@pytest.fixture
def triton_kernels():
    """Skip unless Triton is importable; returns the kernel modules."""
    pytest.importorskip("triton")
    from moequant.kernels import triton_matmul, triton_moe

    return triton_matmul, triton_moe


@pytest.fixture
def make_linear():
    """Factory fixture for :func:`random_packed`."""
    return random_packed


@pytest.fixture
def make_experts():
    """Factory fixture for :func:`random_experts`."""
    return random_experts
