"""QuantLinear: packed buffers only, and the same products as the dequantised weight."""

from __future__ import annotations

import pytest
import torch

from moequant.errors import MoequantError
from moequant.kernels import dispatch
from moequant.nn.quant_linear import QuantLinear, grouped_dequant_matmul, shared_zero
from moequant.packed.bitstream import dequantize_packed, unpack_cols, unpack_qweight, unpack_qzeros
from moequant.quant.pack import pack_result
from moequant.quant.rtn import rtn
from tests.gptq_reader import unpack_rows as independent_unpack

BITS = (2, 3, 4, 8)


def packed_linear(n: int, k: int, bits: int, group_size: int, sym: bool, seed: int,
                  shuffle_groups: bool = False) -> dict[str, torch.Tensor]:
    """A random ``[n, k]`` weight quantised with RTN and packed as a checkpoint stores it."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    packed = pack_result(rtn(weight, bits, group_size, sym), bits)
    if shuffle_groups:  # an act-order style g_idx: groups no longer follow column order
        packed["g_idx"] = packed["g_idx"][torch.randperm(k, generator=gen)].contiguous()
    return packed


def reference(x: torch.Tensor, packed: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    w = dequantize_packed(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    return x @ w.T


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


@pytest.mark.parametrize("bits", BITS)
def test_unpack_matches_the_independent_reader(bits):
    p = packed_linear(96, 128, bits, 32, sym=False, seed=bits)
    codes = torch.from_numpy(independent_unpack(p["qweight"].t().numpy(), bits, 128)).t()  # [K, N]
    zeros = torch.from_numpy(independent_unpack(p["qzeros"].numpy(), bits, 96)) + 1  # [G, N]
    assert torch.equal(unpack_qweight(p["qweight"], bits).long(), codes)
    assert torch.equal(unpack_qzeros(p["qzeros"], bits).long(), zeros)
    assert torch.equal(unpack_cols(p["qzeros"], bits).long() + 1, zeros)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows", [1, 3, 70])  # per-group sums (few rows) and dequantise-then-multiply
@pytest.mark.parametrize("sym", [True, False])
def test_forward_equals_dequantised_matmul(bits, rows, sym):
    p = packed_linear(96, 256, bits, 64, sym=sym, seed=10 * bits + rows)
    layer = QuantLinear.from_packed(p, bits, 64, backend="torch")
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    close(layer(x), reference(x, p, bits))


@pytest.mark.parametrize("bits", [3, 4])
def test_one_group_act_order_and_leading_dims(bits):
    whole = packed_linear(64, 128, bits, -1, sym=False, seed=1)
    x = torch.randn(2, 5, 128)
    close(QuantLinear.from_packed(whole, bits, -1, backend="torch")(x), reference(x, whole, bits))
    shuffled = packed_linear(64, 128, bits, 32, sym=True, seed=2, shuffle_groups=True)
    layer = QuantLinear.from_packed(shuffled, bits, 32, backend="torch")
    assert layer.layout()[0] is False
    close(layer(x), reference(x, shuffled, bits))


@pytest.mark.parametrize("rows", [1, 200])
def test_chunked_dequantisation_is_exact(rows):
    p = packed_linear(64, 256, 3, 32, sym=False, seed=5)
    x = torch.randn(rows, 256)
    whole = grouped_dequant_matmul(x, p["qweight"], p["qzeros"], p["scales"], 3, 32)
    chunked = grouped_dequant_matmul(x, p["qweight"], p["qzeros"], p["scales"], 3, 32, chunk_elements=3 * 32 * 64)
    close(chunked, whole)
    close(whole, reference(x, p, 3))


@pytest.mark.parametrize("bits", BITS)
def test_shared_zero_of_symmetric_grids(bits):
    assert shared_zero(packed_linear(64, 128, bits, 32, sym=True, seed=0)["qzeros"], bits) == 2 ** (bits - 1)
    assert shared_zero(packed_linear(64, 128, bits, 32, sym=False, seed=0)["qzeros"], bits) is None


def test_holds_only_packed_tensors_and_keeps_fp16_scales():
    p = packed_linear(64, 128, 4, 32, sym=True, seed=0)
    layer = QuantLinear.from_packed(p, 4, 32, backend="torch")
    assert list(layer.parameters()) == []
    held = dict(layer.named_buffers())
    assert set(held) == {"qweight", "qzeros", "scales", "g_idx"}
    assert sum(t.numel() * t.element_size() for t in held.values()) == sum(
        t.numel() * t.element_size() for t in p.values())
    x = torch.randn(3, 128)
    before = layer(x)
    layer.to(torch.bfloat16)  # a model-wide cast must not round the scales
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, p["scales"])
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), before, rtol=2e-2, atol=2e-2)


def test_bias_and_wrong_width():
    p = packed_linear(64, 128, 8, 128, sym=True, seed=0)
    bias = torch.randn(64)
    layer = QuantLinear.from_packed(p, 8, 128, bias=bias, backend="torch")
    x = torch.randn(2, 128)
    close(layer(x), reference(x, p, 8) + bias)
    with pytest.raises(MoequantError, match="expects 128"):
        layer(torch.randn(2, 96))


def test_refuses_unpackable_shapes_and_unknown_backends():
    with pytest.raises(MoequantError, match="multiple of 32"):
        QuantLinear(100, 64, 4, 32)
    with pytest.raises(MoequantError, match="bits=5"):
        QuantLinear(128, 64, 5, 32)
    with pytest.raises(MoequantError, match="unknown kernel backend"):
        QuantLinear(128, 64, 4, 32, backend="cuda")


@pytest.mark.parametrize("bits", [3, 4])
def test_triton_backend_in_the_interpreter(bits):
    pytest.importorskip("triton")
    if not dispatch.triton_available("cpu"):
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 set before they are imported")
    p = packed_linear(64, 128, bits, 32, sym=False, seed=3)
    x = torch.randn(3, 128)
    got = QuantLinear.from_packed(p, bits, 32, backend="triton")(x)
    torch.testing.assert_close(got, reference(x, p, bits), rtol=1e-4, atol=1e-4)
