"""Backend choice and the errors a user sees when Triton cannot run."""

from __future__ import annotations

import pytest
import torch

from moequant.errors import MoequantError
from moequant.kernels import dispatch
from moequant.kernels.reference import dequant_matmul_ref, fused_moe_ref


def test_auto_on_cpu_is_torch_and_torch_needs_nothing(monkeypatch):
    assert dispatch.resolve_backend("auto", "cpu") == "torch"
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    assert dispatch.resolve_backend("torch", "cpu") == "torch"
    assert dispatch.resolve_backend("auto", "cpu") == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    assert dispatch.triton_available("cpu")
    assert dispatch.resolve_backend("triton", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.triton_available("cpu")
    with pytest.raises(MoequantError, match="needs CUDA or TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", "cpu")


def test_missing_triton_says_what_to_install(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    assert not dispatch.triton_available("cpu")
    with pytest.raises(MoequantError, match=r"install moequant\[triton\]"):
        dispatch.resolve_backend("triton", "cpu")


def test_unknown_backend():
    with pytest.raises(MoequantError, match="unknown kernel backend 'cuda'"):
        dispatch.resolve_backend("cuda", "cpu")


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_dequant_matmul_backends_agree(make_linear, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    lin = make_linear(64, 128, 3, 32, seed=0)
    x = torch.randn(3, 128)
    want = dequant_matmul_ref(x, **lin, bits=3)
    got = dispatch.dequant_matmul(x, **lin, bits=3, group_size=32, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    lin["g_idx"] = None  # None means k // group_size on every backend
    got = dispatch.dequant_matmul(x, **lin, bits=3, group_size=32, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fused_moe_backends_agree(make_experts, monkeypatch):
    pytest.importorskip("triton")
    w13 = make_experts(3, 128, 64, 2, 32, seed=0)
    w2 = make_experts(3, 64, 64, 2, 32, seed=1)
    x = torch.randn(4, 64)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    weights = torch.full((4, 2), 0.5)
    via_triton = dispatch.fused_moe(x, ids, weights, w13, w2, backend="triton")
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    via_torch = dispatch.fused_moe(x, ids, weights, w13, w2, backend="auto")
    torch.testing.assert_close(via_triton, via_torch, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(via_torch, fused_moe_ref(x, ids, weights, w13, w2))
