"""The Triton dequantising matmul (CPU interpreter) against the plain-torch reference."""

from __future__ import annotations

import pytest
import torch

from moequant.errors import MoequantError
from moequant.kernels.reference import dequant_matmul_ref

BITS = (2, 3, 4, 8)


def _x(m: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("k", "n", "group"), [(128, 64, 32), (64, 128, 64)])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("sorted_groups", [True, False])
def test_matches_reference(triton_kernels, make_linear, bits, k, n, group, m, sorted_groups):
    """Default tiles; ``sorted_groups`` False reads the (here monotone) ``g_idx`` per input."""
    tm, _ = triton_kernels
    lin = make_linear(n, k, bits, group, seed=bits * 7 + m)
    x = _x(m, k, seed=m)
    got = tm.dequant_matmul_triton(x, **lin, bits=bits, group_size=group, sorted_groups=sorted_groups)
    want = dequant_matmul_ref(x, **lin, bits=bits)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "variant", ["split_k", "rows_span_groups", "shuffled_g_idx", "g_idx_read_but_sorted", "one_group"]
)
def test_tilings_and_group_lookups(triton_kernels, make_linear, bits, variant):
    tm, _ = triton_kernels
    k, n, m, group = 128, 64, 3, 32
    cfg, sorted_groups, shuffled = None, True, False
    if variant == "split_k":
        cfg = tm.MatmulConfig(block_m=16, block_n=32, block_k=32, split_k=3)
    elif variant == "rows_span_groups":
        cfg = tm.MatmulConfig(block_m=16, block_n=64, block_k=128)  # 4 groups inside one K tile
    elif variant == "shuffled_g_idx":
        sorted_groups, shuffled = False, True
    elif variant == "g_idx_read_but_sorted":
        sorted_groups = False
    else:
        group = -1
    lin = make_linear(n, k, bits, group, seed=bits, shuffled_groups=shuffled)
    x = _x(m, k, seed=bits)
    got = tm.dequant_matmul_triton(
        x, **lin, bits=bits, group_size=group, sorted_groups=sorted_groups, config=cfg
    )
    torch.testing.assert_close(got, dequant_matmul_ref(x, **lin, bits=bits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("m", "dtype", "tol"), [(1, torch.float16, 2e-3), (5, torch.float32, 1e-4)])
def test_one_group_over_inputs_the_tile_does_not_divide(triton_kernels, make_linear, bits, m, dtype, tol):
    """K = 160 in one group (group_size -1): 128-deep tiles, the last one partial, take the group's
    single scale row per tile (one row with 16-bit activations: the weights-left dot)."""
    tm, _ = triton_kernels
    from moequant.kernels import triton_launch as launch
    from moequant.kernels import triton_unpack as unpack
    k, n = 160, 64
    assert unpack.group_mode(True, k, launch.pick_block_k(k, 128), k) == unpack.GROUPS_PER_TILE
    lin = make_linear(n, k, bits, -1, seed=bits + m)
    x = _x(m, k, seed=m).to(dtype)
    got = tm.dequant_matmul_triton(x, **lin, bits=bits, group_size=-1, sorted_groups=True)
    want = dequant_matmul_ref(x.float(), **lin, bits=bits)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_activations(triton_kernels, make_linear, bits, dtype, tol):
    tm, _ = triton_kernels
    lin = make_linear(64, 128, bits, 64, seed=bits)
    x = _x(3, 128, seed=5).to(dtype)
    got = tm.dequant_matmul_triton(x, **lin, bits=bits, group_size=64, sorted_groups=True)
    assert got.dtype == dtype
    want = dequant_matmul_ref(x.float(), **lin, bits=bits)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_one_row_keeps_float32_accuracy_far_from_zero(triton_kernels, make_linear, bits):
    """The one-row kernel reads codes as ``0.5 + q / 2^(b+1)`` and takes the zero's share off
    once per row (times ``sum(x)``): activations with a large common offset and zero points at
    both ends of their range must not lose float32 accuracy to that cancellation."""
    from moequant.packed.bitstream import dequantize_kn, pack_qzeros

    tm, _ = triton_kernels
    k, n, group = 256, 64, 128
    lin = make_linear(n, k, bits, group, seed=11)
    zeros = torch.ones(k // group, n, dtype=torch.int32)
    zeros[:, ::2] = 2**bits - 1
    lin["qzeros"] = pack_qzeros(zeros, bits)
    x = 1000.0 + _x(1, k, seed=3)
    cfg = tm.MatmulConfig(1, 32, 128, split_k=2, gemv=True)
    got = tm.dequant_matmul_triton(x, **lin, bits=bits, group_size=group, sorted_groups=True, config=cfg)
    w = dequantize_kn(**lin, bits=bits).double()
    err = (got.double() - x.double() @ w).abs().max()
    assert err <= 1e-6 * (x.double().abs() @ w.abs()).max()


@pytest.mark.parametrize("gemv", [True, False])
def test_split_k_finishes_in_one_launch_and_resets_its_counters(
    triton_kernels, make_linear, monkeypatch, gemv
):
    """Split-K parts are summed by the last program of each tile in split order: the result is
    the reference, the same bits on every call, and the arrival counters are zero again after
    each launch, so one buffer serves the next launch."""
    tm, _ = triton_kernels
    shared = torch.zeros(64, dtype=torch.int32)
    monkeypatch.setattr(tm, "split_counters", lambda device, count: shared[:count] if count <= 64 else None)
    lin = make_linear(48, 256, 4, 32, seed=4)
    x = _x(2, 256, seed=4)
    cfg = tm.MatmulConfig(1, 16, 32, split_k=5, gemv=True) if gemv else tm.MatmulConfig(16, 16, 32, split_k=5)
    first = tm.dequant_matmul_triton(x, **lin, bits=4, group_size=32, sorted_groups=True, config=cfg)
    assert not shared.any()
    second = tm.dequant_matmul_triton(x, **lin, bits=4, group_size=32, sorted_groups=True, config=cfg)
    assert not shared.any()
    assert torch.equal(first, second)
    torch.testing.assert_close(first, dequant_matmul_ref(x, **lin, bits=4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize(
    ("m", "n", "block_m", "block_n", "split"),
    [(1, 96, 16, 64, 1), (1, 64, 16, 32, 3), (3, 96, 16, 64, 1), (17, 96, 32, 32, 3), (5, 64, 16, 16, 2)],
)
def test_weights_left_dot(triton_kernels, make_linear, bits, dtype, tol, m, n, block_m, block_n, split):
    """The dot kernel with the weight tile on the left: codes read as 16-bit floats ``c + q``, the
    zero taken off after the dot; partial row, column and split tiles."""
    tm, _ = triton_kernels
    k, group = 320, 64  # 5 K tiles: 3 splits of 2, 2 and 1 tiles; 2 of 3 and 2
    lin = make_linear(n, k, bits, group, seed=bits * 3 + m)
    x = _x(m, k, seed=m).to(dtype)
    cfg = tm.MatmulConfig(block_m, block_n, 64, split_k=split, weights_left=True)
    got = tm.dequant_matmul_triton(x, **lin, bits=bits, group_size=group, sorted_groups=True, config=cfg)
    assert got.dtype == dtype and got.shape == (m, n)
    want = dequant_matmul_ref(x.float(), **lin, bits=bits)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("dtype", "shuffled", "tol"),
    [(torch.float32, True, 1e-4), (torch.bfloat16, True, 1.6e-2), (torch.bfloat16, False, 1.6e-2)],
)
def test_weights_left_falls_back_where_it_does_not_apply(triton_kernels, make_linear, dtype, shuffled, tol):
    """Float32 activations, a ``g_idx`` read from memory and groups smaller than the K tile take
    the plain dot kernel, with the same result."""
    tm, _ = triton_kernels
    lin = make_linear(64, 128, 4, 32, seed=2, shuffled_groups=shuffled)
    cfg = tm.MatmulConfig(16, 32, 64, weights_left=True)  # 64-row K tiles over 32-row groups
    x = _x(3, 128, seed=2).to(dtype)
    got = tm.dequant_matmul_triton(x, **lin, bits=4, group_size=32, sorted_groups=not shuffled, config=cfg)
    want = dequant_matmul_ref(x.float(), **lin, bits=4)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_weights_left_is_the_default_up_to_64_rows(triton_kernels):
    tm, _ = triton_kernels
    from moequant.kernels import triton_launch as launch
    cpu = torch.device("cpu")
    for bits, stages in [(2, 5), (3, 4), (4, 3)]:  # one row too, for codes paired into 16-bit floats
        one = tm.pick_config(1, 4096, 4096, 128, cpu, bits=bits)
        assert one.weights_left and one.block_m == 16 and not one.gemv
        assert one.num_stages == stages  # 16 KB of codes or more in flight per program
        assert (stages - 1) * 128 * 128 * bits // 8 >= launch.IN_FLIGHT_BYTES > (stages - 2) * 128 * 128 * bits // 8
    assert tm.pick_config(64, 4096, 4096, 128, cpu, bits=2).num_stages == 3
    assert launch.pipeline_depth(2, 128, 32) == 5 and launch.pipeline_depth(8, 128, 128) == 3
    for bits, half in [(8, True), (4, False)]:
        assert tm.pick_config(1, 4096, 4096, 128, cpu, bits=bits, half=half).gemv
    assert tm.pick_config(1, 4096, 4096, 128, cpu, sorted_groups=False).gemv  # g_idx read: the GEMV
    assert [tm.pick_config(m, 4096, 4096, 128, cpu).block_m for m in (2, 16, 17, 64)] == [16, 16, 32, 64]
    assert all(tm.pick_config(m, 4096, 4096, 128, cpu, bits=8).weights_left for m in (2, 64))
    assert not tm.pick_config(65, 4096, 4096, 128, cpu).weights_left
    with pytest.raises(ValueError, match="choose one"):
        tm.MatmulConfig(1, 32, 64, gemv=True, weights_left=True)


def test_leading_dims_and_no_tokens(triton_kernels, make_linear):
    tm, _ = triton_kernels
    lin = make_linear(32, 64, 4, 32, seed=0)
    x = torch.randn(2, 3, 64)
    got = tm.dequant_matmul_triton(x, **lin, bits=4, group_size=32)
    assert got.shape == (2, 3, 32)
    torch.testing.assert_close(got, dequant_matmul_ref(x, **lin, bits=4), rtol=1e-4, atol=1e-4)
    assert tm.dequant_matmul_triton(x[:0], **lin, bits=4, group_size=32).shape == (0, 3, 32)


def test_rejects_mismatched_inputs(triton_kernels, make_linear):
    tm, _ = triton_kernels
    lin = make_linear(32, 64, 4, 32, seed=0)
    with pytest.raises(MoequantError, match="K=96"):
        tm.dequant_matmul_triton(torch.randn(1, 96), **lin, bits=4, group_size=32)
    with pytest.raises(MoequantError, match="bits"):
        tm.dequant_matmul_triton(torch.randn(1, 64), **lin, bits=5, group_size=32)
    with pytest.raises(MoequantError, match="group_size=64"):  # sorted groups: K / group_size scale rows
        tm.dequant_matmul_triton(torch.randn(1, 64), **{**lin, "g_idx": None}, bits=4, group_size=64)
    with pytest.raises(MoequantError, match="dtype"):
        tm.dequant_matmul_triton(torch.randn(1, 64, dtype=torch.float64), **lin, bits=4, group_size=32)


def test_config_rejects_tiles_the_kernels_cannot_unpack(triton_kernels):
    tm, tmoe = triton_kernels
    with pytest.raises(ValueError, match="K >= 32"):
        tm.MatmulConfig(block_m=16, block_n=64, block_k=16)
    with pytest.raises(ValueError, match="powers of two"):
        tmoe.MoeConfig(block_m=16, block_n=48, block_k_gate_up=64, block_k_down=64)


def test_split_for_fills_the_device(triton_kernels):
    tm, _ = triton_kernels
    from moequant.kernels import triton_split as split_k
    # 16 tiles of N on a device that wants 264 programs: split K until the programs suffice.
    split = split_k.split_for(4096, 128, tiles=16, target_programs=264)
    assert split * 16 >= 264 and (split - 1) * 16 < 264
    # Never more splits than K blocks, and none when the tiles alone fill the device.
    assert split_k.split_for(256, 128, tiles=1, target_programs=264) == 2
    assert split_k.split_for(4096, 128, tiles=512, target_programs=264) == 1


def test_pick_block_k_keeps_a_tile_in_one_group(triton_kernels):
    tm, _ = triton_kernels
    from moequant.kernels import triton_launch as launch
    from moequant.kernels import triton_unpack as unpack
    assert launch.pick_block_k(32, 128) == 32
    assert launch.pick_block_k(16, 128) == 128  # tiles stay whole 32-value blocks deep
    assert launch.pick_block_k(128, 64) == 64
    assert launch.pick_block_k(48, 64) == 64  # not a power of two: rows look up their group
    assert unpack.group_mode(True, 48, 64, 4096) == unpack.GROUPS_BY_DIVISION
    assert unpack.group_mode(True, 128, 64, 4096) == unpack.GROUPS_PER_TILE
    # One group over K = 2880 (45 x 64): tiles of 128 cross no group boundary.
    assert unpack.group_mode(True, 2880, 128, 2880) == unpack.GROUPS_PER_TILE
    assert unpack.group_mode(True, 2880, 128, 5760) == unpack.GROUPS_BY_DIVISION
    assert unpack.group_mode(False, 128, 64, 4096) == unpack.GROUPS_FROM_G_IDX
    # Beyond the K where tile_group's float quotient is proven exact, rows divide instead.
    assert unpack.group_mode(True, 128, 64, unpack.TILE_GROUP_MAX_K + 64) == unpack.GROUPS_BY_DIVISION


@pytest.mark.parametrize(
    ("group_size", "block_k"), [(32, 32), (64, 32), (128, 128), (384, 128), (1312, 32), (4096, 64)]
)
def test_tile_group_is_the_integer_quotient_up_to_the_largest_k(triton_kernels, group_size, block_k):
    """Every K tile start below ``TILE_GROUP_MAX_K`` (and one group over all of it) finds its group;
    at 1312, 1 / group_size rounds down, so that without its half-tile margin the quotient would
    fall short of an integer."""
    tm, _ = triton_kernels
    from moequant.kernels import triton_unpack as unpack
    from tests.kernels.tile_group_probe import tile_group_kernel

    for gs in (group_size, unpack.TILE_GROUP_MAX_K):
        k0 = torch.arange(0, unpack.TILE_GROUP_MAX_K, block_k, dtype=torch.int32)
        out = torch.empty_like(k0)
        tile_group_kernel[(k0.numel() // 1024 + 1,)](k0, out, k0.numel(), gs, BLOCK=1024)
        assert torch.equal(out, k0 // gs)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("variant", "group", "sorted_groups"),
    [("tile_in_group", 64, True), ("groups_inside_tile", 32, True), ("read_g_idx", 64, False)],
)
@pytest.mark.parametrize("split", [1, 3])
def test_gemv_kernel_matches_reference(
    triton_kernels, make_linear, bits, variant, group, sorted_groups, split
):
    tm, _ = triton_kernels
    k, n = 192, 96  # K spans a partial 64-row tile at the end of a split; N a partial 64-column block
    lin = make_linear(n, k, bits, group, seed=bits + split, shuffled_groups=not sorted_groups)
    cfg = tm.MatmulConfig(block_m=1, block_n=64, block_k=64, split_k=split, gemv=True)
    x = _x(2, k, seed=bits)
    got = tm.dequant_matmul_triton(
        x, **lin, bits=bits, group_size=group, sorted_groups=sorted_groups, config=cfg
    )
    torch.testing.assert_close(got, dequant_matmul_ref(x, **lin, bits=bits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_gemv_kernel_half_precision(triton_kernels, make_linear, dtype, tol):
    tm, _ = triton_kernels
    lin = make_linear(64, 128, 3, 64, seed=1)
    x = _x(1, 128, seed=2).to(dtype)
    cfg = tm.MatmulConfig(block_m=1, block_n=32, block_k=64, gemv=True)
    got = tm.dequant_matmul_triton(x, **lin, bits=3, group_size=64, sorted_groups=True, config=cfg)
    assert got.dtype == dtype
    want = dequant_matmul_ref(x.float(), **lin, bits=3)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_decode_takes_the_gemv_kernel(triton_kernels):
    tm, _ = triton_kernels
    cpu = torch.device("cpu")
    assert tm.pick_config(1, 4096, 4096, 128, cpu, bits=8).gemv
    assert not tm.pick_config(tm.GEMV_MAX_ROWS + 1, 4096, 4096, 128, cpu, bits=8).gemv
    with pytest.raises(ValueError, match="block_m must be 1"):
        tm.MatmulConfig(block_m=16, block_n=64, block_k=64, gemv=True)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gemv", [True, False])
@pytest.mark.parametrize("sorted_groups", [True, False])
def test_zero_point_of_two_to_the_bits(triton_kernels, make_linear, bits, gemv, sorted_groups):
    # v1 checkpoints store z - 1; all-ones stored zeros read back as z = 2^bits.
    tm, _ = triton_kernels
    lin = make_linear(32, 128, bits, 64, seed=bits)
    lin["qzeros"].fill_(-1)
    cfg = tm.MatmulConfig(block_m=1 if gemv else 16, block_n=32, block_k=64, gemv=gemv)
    x = _x(1, 128, seed=1)
    got = tm.dequant_matmul_triton(
        x, **lin, bits=bits, group_size=64, sorted_groups=sorted_groups, config=cfg
    )
    torch.testing.assert_close(got, dequant_matmul_ref(x, **lin, bits=bits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shuffled", [False, True])
def test_many_rows_dequantise_once_then_multiply(triton_kernels, make_linear, bits, shuffled):
    tm, _ = triton_kernels
    k, n, group = 128, 96, 32
    lin = make_linear(n, k, bits, group, seed=bits, shuffled_groups=shuffled)
    wt = tm.dequantize_triton(
        **lin, bits=bits, group_size=group, dtype=torch.float32, sorted_groups=not shuffled
    )
    eye = torch.eye(k)
    assert wt.shape == (k, n)
    torch.testing.assert_close(wt, dequant_matmul_ref(eye, **lin, bits=bits), rtol=1e-5, atol=1e-6)
    x = _x(tm.DEQUANT_MIN_ROWS + 3, k, seed=bits)
    got = tm.dequant_matmul_triton(x, **lin, bits=bits, group_size=group, sorted_groups=not shuffled)
    torch.testing.assert_close(got, dequant_matmul_ref(x, **lin, bits=bits), rtol=1e-4, atol=1e-4)


class _SharedMemoryLimit:
    """Stands in for a kernel on a GPU whose shared memory holds at most ``fits`` pipeline stages:
    deeper launches raise Triton's ``OutOfResources`` (before running), others run the kernel."""

    def __init__(self, kernel, fits: int):
        self.fn, self.kernel, self.fits, self.tried = kernel.fn, kernel, fits, []

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def launch(*args, STAGES, num_stages, **consts):
            self.tried.append(STAGES)
            assert STAGES == num_stages
            if STAGES > self.fits:
                raise OutOfResources(1000 * STAGES, 1000 * self.fits, "shared memory")
            return self.kernel[grid](*args, STAGES=STAGES, num_stages=num_stages, **consts)

        return launch


def test_launches_drop_stages_the_gpu_cannot_hold(triton_kernels, make_linear, monkeypatch):
    tm, tmoe = triton_kernels
    from moequant.kernels import triton_launch as launch

    lin = make_linear(64, 128, 2, 32, seed=3)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    cfg = tm.MatmulConfig(16, 64, 32, 1, 4, 5, weights_left=True)
    want = tm.dequant_matmul_triton(x, **lin, bits=2, group_size=32, sorted_groups=True, config=cfg)
    limited = _SharedMemoryLimit(tm._dequant_matmul_kernel, fits=2)
    monkeypatch.setattr(tm, "_dequant_matmul_kernel", limited)
    monkeypatch.setattr(launch, "_FITTING_STAGES", {})
    got = tm.dequant_matmul_triton(x, **lin, bits=2, group_size=32, sorted_groups=True, config=cfg)
    assert limited.tried == [5, 4, 3, 2] and torch.equal(got, want)
    tm.dequant_matmul_triton(x, **lin, bits=2, group_size=32, sorted_groups=True, config=cfg)
    assert limited.tried[4:] == [2]  # the depth that fits is remembered

    limited.fits = 0
    monkeypatch.setattr(launch, "_FITTING_STAGES", {})
    with pytest.raises(MoequantError, match=r"_dequant_matmul_kernel kernel needs more shared memory than cpu "
                                            r"has \(1000 bytes, limit 0\) even without pipelining; .*backend='torch'"):
        tm.dequant_matmul_triton(x, **lin, bits=2, group_size=32, sorted_groups=True, config=cfg)


def test_packed_args_name_a_linear_and_stacked_experts(triton_kernels, make_linear, make_experts):
    """One packed linear ``[N=64, K=128]`` at 3 bits (12 qweight rows, 6 qzeros words per group),
    and three of them stacked: the stack adds its expert strides, a shared ``g_idx`` stride 0."""
    from moequant.kernels.triton_launch import packed_args

    lin = make_linear(64, 128, 3, 32, seed=0)
    args = packed_args(**lin, group_size=32)
    assert (args["k_words"], args["n_words"], args["group_size"]) == (12, 6, 32)
    assert (args["stride_qk"], args["stride_qn"], args["stride_zg"], args["stride_sg"]) == (64, 1, 6, 64)
    assert args["g_ptr"] is lin["g_idx"] and "stride_qe" not in args
    assert packed_args(**{**lin, "g_idx": None}, group_size=32)["g_ptr"] is lin["qweight"]  # never read
    w = make_experts(3, 64, 128, 3, 32, seed=0)
    stacked = packed_args(w.qweight, w.qzeros, w.scales, w.g_idx, w.group_size)
    assert (stacked["k_words"], stacked["n_words"], stacked["stride_qk"]) == (12, 6, 64)
    assert (stacked["stride_qe"], stacked["stride_ze"], stacked["stride_se"]) == (12 * 64, 4 * 6, 4 * 64)
    assert w.g_idx.dim() == 1 and stacked["stride_ge"] == 0
