"""The kernels as compiled for a GPU, run in the CPU interpreter (``tests/kernels/gpu_forms.py``):
their inline-PTX forms (``ASM``) must give the same bits as the plain forms and the reference's
values, and their bfloat16 dots (float32 on the CPU otherwise) the reference's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moequant.kernels.reference import dequant_matmul_ref, fused_moe_ref
from tests.kernels import gpu_forms

BITS = (2, 3, 4, 8)


def _u32(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)


def test_lop3_follows_its_truth_table():
    a, b, c = _u32(4096, 1), _u32(4096, 2), _u32(4096, 3)
    assert np.array_equal(gpu_forms.lop3(a, b, c, 0xF0), a)
    assert np.array_equal(gpu_forms.lop3(a, b, c, 0xCC), b)
    assert np.array_equal(gpu_forms.lop3(a, b, c, 0xAA), c)
    assert np.array_equal(gpu_forms.lop3(a, b, c, 0xEA), (a & b) | c)
    assert np.array_equal(gpu_forms.lop3(a, b, c, 0x96), a ^ b ^ c)
    assert np.array_equal(gpu_forms.lop3(a, b, c, 0xE8), (a & b) | (a & c) | (b & c))


def test_prmt_selects_and_sign_replicates_bytes():
    a, b = np.uint32(0x80112233), np.uint32(0x44556677)
    assert gpu_forms.prmt(a, b, np.uint32(0x3210)) == a
    assert gpu_forms.prmt(a, b, np.uint32(0x7654)) == b
    assert gpu_forms.prmt(a, b, np.uint32(0x0123)) == 0x33221180
    assert gpu_forms.prmt(a, b, np.uint32(0x8B30)) == 0x00FF8033  # byte 3 of a is negative, byte 0 is not
    assert gpu_forms.prmt(a, b, np.uint32(0x7650)) == 0x44556633


def test_run_reads_scopes_temporaries_and_refuses_the_unknown():
    lo, hi = _u32(64, 4), _u32(64, 5)
    (out,) = gpu_forms.run(
        "{ .reg .b32 t; lop3.b32 t, $1, 7, 0x43004300, 0xEA; lop3.b32 $0, $2, 0x70000, t, 0xEA; }", [lo, hi]
    )
    assert np.array_equal(out, (lo & 7) | (hi & 0x70000) | 0x43004300)
    with pytest.raises(NotImplementedError):
        gpu_forms.run("add.u32 $0, $1, $2;", [lo, hi])
    with pytest.raises(ValueError):
        gpu_forms.run("lop3.b32 $0, $1, t, 0, 0xEA;", [lo])


def _launch_with(monkeypatch, modules, **rules) -> None:
    """Replace launch rules (``inline_asm``, ``dot_dtype``) in every kernel module."""
    for module in modules:
        for name, rule in rules.items():
            monkeypatch.setattr(module, name, rule)


def _dense(tm, x, lin, bits, group, cfg):
    """A call of the dense kernel on ``lin`` (sorted groups of ``group``) with ``cfg``."""
    return lambda: tm.dequant_matmul_triton(
        x, **lin, bits=bits, group_size=group, sorted_groups=True, config=cfg
    )


def _moe_config(tmoe, form: str):
    """The MoE kernels' forms: ``decode`` (GEMV per slot), ``decode_weights_left``, ``blocks`` and
    ``blocks_weights_left`` (16-slot sorted blocks)."""
    if form.startswith("blocks"):
        return tmoe.MoeConfig(16, 32, 32, 32, weights_left=form.endswith("weights_left"))
    return tmoe.MoeConfig(
        1, 32, 32, 32, split_k=2, gemv=True, split_k_gate_up=2, weights_left=form.endswith("weights_left")
    )


@pytest.fixture
def asm_kernels(triton_kernels, monkeypatch):
    """``(tm, tmoe, run)``: ``run(fn)`` calls ``fn`` with the plain and then the inline-PTX
    forms and returns both results."""
    tm, tmoe = triton_kernels
    gpu_forms.emulate_inline_asm(monkeypatch)

    def run(fn):
        results = []
        for on in (False, True):
            _launch_with(monkeypatch, (tm, tmoe), inline_asm=lambda device, on=on: on)
            results.append(fn())
        return results

    return tm, tmoe, run


def _same_and_right(plain: torch.Tensor, asm: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert torch.equal(asm, plain), f"inline-PTX form differs by {(asm.float() - plain.float()).abs().max()}"
    torch.testing.assert_close(asm.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("m", "dtype", "tol", "top_zero"),
    [(2, torch.float32, 1e-4, False), (1, torch.float16, 2e-3, False), (1, torch.float32, 1e-4, True)],
)
def test_gemv_inline_ptx(asm_kernels, make_linear, bits, m, dtype, tol, top_zero):
    """The one-row kernel: codes under a float's top bytes (``prmt``) or mantissa (``lop3``), the
    zero point's float beside them; ``top_zero``: every zero point ``2^bits`` (stored all ones)."""
    tm, _, run = asm_kernels
    k, n, group = 128, 64, 64
    lin = make_linear(n, k, bits, group, seed=bits)
    if top_zero:
        lin["qzeros"].fill_(-1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(bits)).to(dtype)
    cfg = tm.MatmulConfig(block_m=1, block_n=32, block_k=64, split_k=2, gemv=True)
    plain, asm = run(_dense(tm, x, lin, bits, group, cfg))
    _same_and_right(plain, asm, dequant_matmul_ref(x.float(), **lin, bits=bits), tol)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("m", "dtype", "tol"), [(1, torch.float16, 2e-3), (3, torch.bfloat16, 1.6e-2)])
def test_weights_left_inline_ptx(asm_kernels, make_linear, bits, m, dtype, tol):
    """The weights-left dot, one row and a few rows: code pairs as 16-bit floats (``lop3``)."""
    tm, _, run = asm_kernels
    k, n, group = 128, 64, 64
    lin = make_linear(n, k, bits, group, seed=10 + bits)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    cfg = tm.MatmulConfig(block_m=16, block_n=32, block_k=64, weights_left=True)
    plain, asm = run(_dense(tm, x, lin, bits, group, cfg))
    _same_and_right(plain, asm, dequant_matmul_ref(x.float(), **lin, bits=bits), tol)


def _moe_case(make_experts, bits):
    hidden, inter = 64, 64
    w13 = make_experts(3, 2 * inter, hidden, bits, 32, seed=bits)
    w2 = make_experts(3, hidden, inter, bits, 32, seed=20 + bits)
    gen = torch.Generator().manual_seed(bits)
    ids = torch.tensor([[0, 2], [1, 0]])
    weights = torch.softmax(torch.randn(ids.shape, generator=gen), dim=-1)
    x = torch.randn(2, hidden, generator=gen)
    return x, ids, weights, w13, w2


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("form", ["decode", "decode_weights_left", "blocks_weights_left"])
def test_fused_moe_inline_ptx(asm_kernels, make_experts, bits, form):
    _, tmoe, run = asm_kernels
    x, ids, weights, w13, w2 = _moe_case(make_experts, bits)
    cfg = _moe_config(tmoe, form)
    if form == "decode":
        tol = 1e-4
    else:
        x, tol = x.to(torch.float16), 3e-3
    plain, asm = run(lambda: tmoe.fused_moe_triton(x, ids, weights, w13, w2, config=cfg))
    _same_and_right(plain, asm, fused_moe_ref(x.float(), ids, weights, w13, w2), tol)


@pytest.fixture
def gpu_kernels(triton_kernels, monkeypatch):
    """``(tm, tmoe)`` launching as on a GPU: inline PTX, and bfloat16 activations dotted as bfloat16
    (the code pairs read as ``128 + q``)."""
    import triton.language as tl

    tm, tmoe = triton_kernels
    gpu_forms.emulate_inline_asm(monkeypatch)
    gpu_forms.widen_bf16_dots(monkeypatch)
    plain_dot_dtype = tm.dot_dtype

    def dot_dtype(x_dtype, device):
        return (tl.bfloat16, False) if x_dtype == torch.bfloat16 else plain_dot_dtype(x_dtype, device)

    _launch_with(monkeypatch, (tm, tmoe), inline_asm=lambda device: True, dot_dtype=dot_dtype)
    return tm, tmoe


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("m", "weights_left"), [(1, True), (3, True), (17, False)])
def test_bfloat16_dots(gpu_kernels, make_linear, bits, m, weights_left):
    tm, _ = gpu_kernels
    k, n, group = 128, 64, 64
    lin = make_linear(n, k, bits, group, seed=30 + bits)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    cfg = tm.MatmulConfig(block_m=16, block_n=32, block_k=64, split_k=2, weights_left=weights_left)
    got = _dense(tm, x, lin, bits, group, cfg)()
    assert got.dtype == torch.bfloat16
    want = dequant_matmul_ref(x.float(), **lin, bits=bits)
    torch.testing.assert_close(got.float(), want, rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("form", ["decode_weights_left", "blocks_weights_left", "blocks"])
def test_fused_moe_bfloat16_dots(gpu_kernels, make_experts, bits, form):
    _, tmoe = gpu_kernels
    x, ids, weights, w13, w2 = _moe_case(make_experts, bits)
    cfg = _moe_config(tmoe, form)
    got = tmoe.fused_moe_triton(x.to(torch.bfloat16), ids, weights, w13, w2, config=cfg)
    assert got.dtype == torch.bfloat16
    want = fused_moe_ref(x.to(torch.bfloat16).float(), ids, weights, w13, w2)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
