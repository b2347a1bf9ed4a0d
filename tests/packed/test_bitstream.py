"""The GPTQ v1 packed layout: bit order, 3-bit words, z - 1 zeros, shapes, dequantisation."""

from __future__ import annotations

import pytest
import torch

from moequant.errors import MoequantError
from moequant.packed.bitstream import (
    dequantize_packed,
    pack_qweight,
    pack_qzeros,
    pack_rows,
    unpack_qweight,
    unpack_qzeros,
    unpack_rows,
)
from moequant.packed.shapes import check_packable
from moequant.packed.widths import BITS
from moequant.quant.pack import pack_result
from moequant.quant.rtn import rtn


def signed(word: int) -> int:
    """An unsigned 32-bit word as the int32 a checkpoint stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


def column(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)[:, None]


def rule_words(x: list[int], bits: int) -> list[int]:
    """Unsigned words for one block of values, written out from the format rules word by word."""
    if bits != 3:
        per = 32 // bits
        return [sum(x[w * per + j] << (bits * j) for j in range(per)) for w in range(len(x) // per)]
    words = []
    for base in range(0, len(x), 32):
        b = x[base : base + 32]
        w0 = sum(b[j] << (3 * j) for j in range(10)) | ((b[10] & 0b11) << 30)
        w1 = ((b[10] >> 2) & 1) | sum(b[11 + j] << (3 * j + 1) for j in range(10)) | ((b[21] & 1) << 31)
        w2 = ((b[21] >> 1) & 0b11) | sum(b[22 + j] << (3 * j + 2) for j in range(10))
        words += [w0, w1, w2]
    return words


def rule_read(words: list[int], bits: int, count: int) -> list[int]:
    """Values read back per element the way GPTQ readers address a packed column."""
    mask = (1 << bits) - 1
    out = []
    for i in range(count):
        if bits != 3:
            per = 32 // bits
            out.append((words[i // per] >> (bits * (i % per))) & mask)
            continue
        w, m = 3 * (i // 32), i % 32
        if m < 10:
            out.append((words[w] >> (3 * m)) & 7)
        elif m == 10:
            out.append((words[w] >> 30) | ((words[w + 1] << 2) & 0b100))
        elif m < 21:
            out.append((words[w + 1] >> (3 * m - 32)) & 7)
        elif m == 21:
            out.append((words[w + 1] >> 31) | ((words[w + 2] << 1) & 0b110))
        else:
            out.append((words[w + 2] >> (3 * m - 64)) & 7)
    return out


# ---- exact bit layout on hand-built words ------------------------------------------------


def test_four_bit_values_fill_one_word_least_significant_first():
    assert pack_rows(column(list(range(8))), 4).item() == 0x76543210


def test_two_and_eight_bit_words_and_top_bit_gives_negative_int32():
    assert pack_rows(column([0, 1, 2, 3] * 4), 2).item() == signed(0xE4E4E4E4)
    assert pack_rows(column([1, 2, 3, 0xFF]), 8).item() == signed(0xFF030201)
    assert pack_rows(column([0x10, 0x32, 0x54, 0x76]), 8).item() == 0x76543210


@pytest.mark.parametrize("bits", BITS)
def test_all_ones_is_minus_one(bits):
    rows = 32 if bits == 3 else 32 // bits
    packed = pack_rows(torch.full((rows, 3), 2**bits - 1, dtype=torch.int32), bits)
    assert packed.dtype == torch.int32
    assert (packed == -1).all()


def test_three_bit_straddling_values_hand_worked():
    # x10 = 0b101: low bits 0b01 -> word 0 bits 30-31, bit 2 -> word 1 bit 0.
    # x21 = 0b011: bit 0 -> word 1 bit 31, bits 1-2 (0b01) -> word 2 bits 0-1.
    x = [0] * 32
    x[10], x[21] = 0b101, 0b011
    words = pack_rows(column(x), 3)[:, 0].tolist()
    assert words == [0x40000000, signed(0x80000001), 0x00000001]


def test_three_bit_field_positions_hand_worked():
    x = [0] * 32
    x[0], x[9], x[11], x[20], x[22], x[31] = 1, 7, 1, 7, 1, 7
    words = pack_rows(column(x), 3)[:, 0].tolist()
    # x0 at bit 0, x9 at bits 27-29; x11 at bit 1, x20 at bits 28-30; x22 at bit 2, x31 at bits 29-31.
    assert words == [0x38000001, 0x70000002, signed(0xE0000004)]


def test_three_bit_dense_block_matches_rules():
    x = [(5 * i + 3) % 8 for i in range(32)]
    x[10], x[21] = 0b101, 0b110
    words = pack_rows(column(x), 3)[:, 0].tolist()
    assert words == [signed(0x43C67543), 0x7543C675, signed(0xC67543C7)]
    assert words == [signed(w) for w in rule_words(x, 3)]


@pytest.mark.parametrize("bits", BITS)
def test_packing_matches_format_rules_and_reader_addressing(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 5), generator=g, dtype=torch.int32)
    values[0, 0], values[1, 0] = 0, 2**bits - 1
    packed = pack_rows(values, bits)
    assert packed.shape == (64 * bits // 32, 5)
    for c in range(values.shape[1]):
        x = values[:, c].tolist()
        assert packed[:, c].tolist() == [signed(w) for w in rule_words(x, bits)]
        unsigned = [w & 0xFFFFFFFF for w in packed[:, c].tolist()]
        assert rule_read(unsigned, bits, 64) == x


# ---- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_rows_round_trip_with_extremes(bits):
    g = torch.Generator().manual_seed(100 + bits)
    values = torch.randint(0, 2**bits, (2, 96, 40), generator=g, dtype=torch.int32)
    values[0, :, 0] = 0
    values[1, :, 1] = 2**bits - 1
    values[:, ::7, 2] = 2**bits - 1
    packed = pack_rows(values, bits)
    assert packed.shape == (2, 96 * bits // 32, 40) and packed.dtype == torch.int32
    back = unpack_rows(packed, bits)
    assert back.dtype == torch.int32
    assert torch.equal(back, values)


@pytest.mark.parametrize("bits", BITS)
def test_qweight_packs_along_k_and_round_trips(bits):
    n, k = 32, 64
    g = torch.Generator().manual_seed(200 + bits)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32)
    qweight = pack_qweight(codes, bits)
    assert qweight.shape == (k * bits // 32, n) and qweight.dtype == torch.int32
    assert qweight.is_contiguous()
    # column n of qweight holds row n of the codes, K in order
    assert qweight[:, 5].tolist() == [signed(w) for w in rule_words(codes[5].tolist(), bits)]
    assert torch.equal(unpack_qweight(qweight, bits), codes.T)


def test_qweight_orientation_four_bit():
    n, k = 32, 32
    codes = (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % 16
    qweight = pack_qweight(codes.to(torch.int32), 4)
    expected = sum(((3 + 8 + j) % 16) << (4 * j) for j in range(8))  # n = 3, k = 8..15
    assert qweight[1, 3].item() == signed(expected)


def test_qweight_accepts_a_batch_of_experts():
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 8, (3, 32, 64), generator=g, dtype=torch.int32)
    qweight = pack_qweight(codes, 3)
    assert qweight.shape == (3, 6, 32)
    for e in range(3):
        assert torch.equal(qweight[e], pack_qweight(codes[e], 3))
    assert torch.equal(unpack_qweight(qweight, 3), codes.transpose(1, 2))


# ---- zero points --------------------------------------------------------------------------


def test_symmetric_qzeros_words():
    n = 64
    assert (pack_qzeros(torch.full((2, n), 8, dtype=torch.int32), 4) == 0x77777777).all()
    assert (pack_qzeros(torch.full((2, n), 2, dtype=torch.int32), 2) == 0x55555555).all()
    assert (pack_qzeros(torch.full((2, n), 128, dtype=torch.int32), 8) == 0x7F7F7F7F).all()
    q3 = pack_qzeros(torch.full((1, 32), 4, dtype=torch.int32), 3)
    assert q3[0].tolist() == [signed(w) for w in rule_words([3] * 32, 3)]


@pytest.mark.parametrize("bits", BITS)
def test_qzeros_pack_along_n_store_z_minus_one_and_round_trip(bits):
    groups, n = 3, 64
    g = torch.Generator().manual_seed(300 + bits)
    zeros = torch.randint(1, 2**bits, (groups, n), generator=g, dtype=torch.int32)
    zeros[0, 0], zeros[1, 1] = 1, 2**bits - 1
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (groups, n * bits // 32) and qzeros.dtype == torch.int32
    assert qzeros.is_contiguous()
    assert qzeros[2].tolist() == [signed(w) for w in rule_words((zeros[2] - 1).tolist(), bits)]
    back = unpack_qzeros(qzeros, bits)
    assert back.dtype == torch.int32
    assert torch.equal(back, zeros)


def test_qzeros_orientation_four_bit():
    zeros = (torch.arange(32)[None, :] % 15 + 1).repeat(2, 1).to(torch.int32)
    qzeros = pack_qzeros(zeros, 4)
    expected = sum(((8 + j) % 15) << (4 * j) for j in range(8))  # stored z - 1 for n = 8..15
    assert qzeros[1, 1].item() == expected


@pytest.mark.parametrize("bad", [0, -1, 16])
def test_zero_points_outside_v1_range_raise(bad):
    zeros = torch.full((1, 32), 5, dtype=torch.int32)
    zeros[0, 7] = bad
    with pytest.raises(MoequantError, match=r"\[1, 15\]"):
        pack_qzeros(zeros, 4)


def test_values_outside_the_code_range_raise():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_rows(column([0, 1, 2, 4] * 4), 2)
    with pytest.raises(TypeError):
        pack_rows(torch.zeros(8, 1), 4)


def test_unsupported_bits_and_ragged_rows_raise():
    with pytest.raises(MoequantError, match="bits=5"):
        pack_rows(torch.zeros(32, 1, dtype=torch.int32), 5)
    with pytest.raises(MoequantError, match="multiple of 32"):
        pack_rows(torch.zeros(16, 1, dtype=torch.int32), 3)
    with pytest.raises(MoequantError, match="multiple of 8"):
        pack_rows(torch.zeros(12, 1, dtype=torch.int32), 4)


# ---- whole layers ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_pack_result_shapes_and_dtypes(bits):
    n, k, gs = 64, 128, 32
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits))
    packed = pack_result(rtn(w, bits, gs, sym=False), bits)
    assert set(packed) == {"qweight", "qzeros", "scales", "g_idx"}
    shapes = {
        "qweight": (k * bits // 32, n),
        "qzeros": (k // gs, n * bits // 32),
        "scales": (k // gs, n),
        "g_idx": (k,),
    }
    dtypes = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}
    for name, t in packed.items():
        assert tuple(t.shape) == shapes[name], name
        assert t.dtype == dtypes[name], name
        assert t.is_contiguous(), name
    assert torch.equal(packed["g_idx"], torch.arange(k, dtype=torch.int32) // gs)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_dequantize_packed_matches_quant_result(bits, sym, group_size):
    g = torch.Generator().manual_seed(bits * 10 + group_size + int(sym))
    w = torch.randn(64, 128, generator=g)
    w[:, :8] += 0.75  # some groups entirely positive: asymmetric zeros at their lower bound
    result = rtn(w, bits, group_size, sym=sym)
    packed = pack_result(result, bits)
    deq = dequantize_packed(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    assert deq.shape == (64, 128) and deq.dtype == torch.float32
    assert torch.equal(deq, result.dequantize())
    if sym:
        expected = [signed(w) for w in rule_words([2 ** (bits - 1) - 1] * 32, bits)]
        assert packed["qzeros"][0, : len(expected)].tolist() == expected


def test_dequantize_packed_follows_a_permuted_g_idx():
    n, k, gs, bits = 32, 64, 16, 4
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scales = (torch.rand(k // gs, n, generator=g) + 0.5).to(torch.float16)
    zeros = torch.randint(1, 16, (k // gs, n), generator=g, dtype=torch.int32)
    g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=g)].to(torch.int32)
    deq = dequantize_packed(pack_qweight(codes, bits), pack_qzeros(zeros, bits), scales, g_idx, bits)
    expected = torch.empty(n, k)
    for col in range(k):
        grp = int(g_idx[col])
        expected[:, col] = scales[grp].float() * (codes[:, col].float() - zeros[grp].float())
    assert torch.equal(deq, expected)


def test_pack_result_batch_indexes_to_single_layers():
    w = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(3))
    result = rtn(w, 3, 32, sym=False)
    packed = pack_result(result, 3)
    assert packed["qweight"].shape == (2, 6, 32)
    assert packed["qzeros"].shape == (2, 2, 3)
    assert packed["scales"].shape == (2, 2, 32)
    assert packed["g_idx"].shape == (2, 64)
    deq = dequantize_packed(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 3)
    assert torch.equal(deq, result.dequantize())
    deq1 = dequantize_packed(*(packed[name][1] for name in ("qweight", "qzeros", "scales", "g_idx")), 3)
    assert torch.equal(deq1, result.dequantize()[1])


def test_pack_result_rejects_unpackable_shapes():
    result = rtn(torch.randn(48, 64), 4, 32, sym=True)
    with pytest.raises(MoequantError, match="N=48"):
        pack_result(result, 4)


# ---- check_packable ---------------------------------------------------------------------------


def test_check_packable_accepts_mixtral_shapes():
    for n, k in [(14336, 4096), (4096, 14336), (1024, 4096)]:
        for bits in BITS:
            for gs in (32, 64, 128, -1):
                check_packable(n, k, bits, gs)
    check_packable(128, 192, 4, 128)  # two groups, the last of 64 columns


@pytest.mark.parametrize(
    ("n", "k", "bits", "group_size", "pattern"),
    [
        (100, 128, 4, 32, r"N=100 .*multiple of 32"),
        (128, 80, 4, -1, r"K=80 .*multiple of 32"),
        (128, 80, 3, -1, r"K=80 .*multiple of 32"),
        (128, 128, 4, 0, r"group_size=0 must be positive"),
        (128, 128, 4, -2, r"group_size=-2 must be positive"),
        (128, 128, 5, 32, r"bits=5"),
    ],
)
def test_check_packable_errors_name_the_numbers(n, k, bits, group_size, pattern):
    with pytest.raises(MoequantError, match=pattern) as info:
        check_packable(n, k, bits, group_size)
    assert "\n" not in str(info.value)
