"""Output forms: the gptqmodel layout and the compressed-tensors format hold the same model as the default."""

import json

import pytest
import torch
from safetensors import safe_open

import moequant
from moequant.checkpoint.reader import CheckpointReader
from moequant.compression import compress
from moequant.errors import MoequantError
from moequant.packed.bitstream import dequantize_packed
from moequant.recipe import parse_recipe
from tests.conftest import make_mixtral

MIXED = """
name: mixed
method: rtn
group_size: 64
rules:
  - match: '.*\\.self_attn\\.(q|k|v)_proj'
    bits: 8
  - match: '.*\\.self_attn\\.o_proj'
    bits: 4
  - match: '.*\\.layers\\.1\\.block_sparse_moe\\.experts\\.0\\.w2'
    bits: 16
  - match: '.*\\.block_sparse_moe\\.experts\\.[01]\\.w[123]'
    bits: 4
  - match: '.*\\.block_sparse_moe\\.experts\\.\\d+\\.w[123]'
    bits: 2
"""


def _keys(folder):
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys |= set(f.keys())
    return keys


def _logits(path, ids):
    with torch.no_grad():
        return moequant.load(path, device="cpu", dtype="float32")(ids).logits


@pytest.fixture(scope="module")
def mixed_outputs(tmp_path_factory):
    """The same mixed-width model (8/4/2-bit, one expert module 16-bit) in every form, sym and asym."""
    root = tmp_path_factory.mktemp("forms")
    source = make_mixtral(root / "src")
    outs = {}
    for sym in (True, False):
        recipe = parse_recipe(MIXED.replace("method: rtn", f"method: rtn\nsym: {str(sym).lower()}"))
        for fmt, layout in (("gptq", "vllm"), ("gptq", "gptqmodel"), ("compressed-tensors", "vllm")):
            out = root / f"{fmt}-{layout}-{sym}"
            compress(source, out, recipe=recipe, output_format=fmt, layout=layout)
            outs[fmt, layout, sym] = out
    return outs


@pytest.mark.parametrize("sym", [True, False])
def test_every_form_loads_as_the_same_model(mixed_outputs, sym):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = _logits(mixed_outputs["gptq", "vllm", sym], ids)
    for (fmt, layout, s), path in mixed_outputs.items():
        if s == sym and (fmt, layout) != ("gptq", "vllm"):
            assert torch.equal(_logits(path, ids), reference), (fmt, layout)


def test_gptqmodel_layout_uses_transformers_names(mixed_outputs):
    out = mixed_outputs["gptq", "gptqmodel", True]
    keys = _keys(out)
    assert "model.layers.0.mlp.experts.3.gate_proj.qweight" in keys
    assert "model.layers.0.mlp.experts.3.down_proj.scales" in keys
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in keys
    assert "model.layers.0.mlp.gate.weight" in keys
    assert not any("block_sparse_moe" in k for k in keys)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert any("mlp" in p and "down_proj" in p for p in qcfg["dynamic"] if p.startswith("-:"))
    record = json.loads((out / "moequant.json").read_text())
    assert (record["format"], record["layout"]) == ("gptq", "gptqmodel")
    # the record keeps the canonical names that recipes match
    assert "model.layers.0.block_sparse_moe.experts.3.w1" in record["modules"]


def test_compressed_tensors_tensors_and_config(mixed_outputs):
    out = mixed_outputs["compressed-tensors", "vllm", False]
    keys = _keys(out)
    name = "model.layers.0.block_sparse_moe.experts.3.w2"
    assert {f"{name}.{k}" for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")} <= keys
    assert not any(k.endswith((".qweight", ".qzeros", ".g_idx")) for k in keys)
    assert not (out / "quantize_config.json").exists()
    with safe_open(out / _shard_of(out, name + ".weight_packed"), "pt") as f:
        assert list(f.get_tensor(name + ".weight_packed").shape) == [128, 256 * 2 // 32]
        assert f.get_tensor(name + ".weight_shape").tolist() == [128, 256]
        assert list(f.get_tensor(name + ".weight_zero_point").shape) == [128 * 2 // 32, 4]
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["format"]) == ("compressed-tensors", "pack-quantized")
    widths = sorted(g["weights"]["num_bits"] for g in qcfg["config_groups"].values())
    assert widths == [2, 4, 8]
    assert all(g["weights"]["symmetric"] is False for g in qcfg["config_groups"].values())
    assert any("gate" in p for p in qcfg["ignore"]) and "re:^lm_head$" in qcfg["ignore"]


def _shard_of(out, name):
    return json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_package_decompresses_the_same_weights(mixed_outputs, sym):
    """compressed-tensors' own config parsing, target matching and decompression against moequant's weights."""
    pytest.importorskip("compressed_tensors")
    from tests.compressed_tensors_reader import decompressed_weights

    theirs = decompressed_weights(mixed_outputs["compressed-tensors", "vllm", sym])
    reader = CheckpointReader(mixed_outputs["gptq", "vllm", sym])
    arch = moequant.arch.registry.adapter_for(reader.config)
    checked = 0
    for module, weight in theirs.items():
        canonical = arch.canonical_name(module)
        packed = [reader.get(f"{canonical}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")]
        bits = packed[0].shape[0] * 32 // weight.shape[1]
        # compressed-tensors computes s * (q - z) in the scales' dtype: the exact product, rounded once
        assert weight.dtype == torch.float16
        assert torch.equal(dequantize_packed(*packed, bits).half(), weight), module
        checked += 1
    quantised = [n for n in reader.names if n.endswith(".qweight")]
    assert checked == len(quantised) == 2 * (4 + 4 * 3) - 1


def test_compressed_tensors_refuses_3_bit_before_writing(tmp_path, tiny_mixtral):
    with pytest.raises(MoequantError, match="3-bit codes, which --format compressed-tensors does not write"):
        compress(tiny_mixtral, tmp_path / "out", recipe="a4e3", method="rtn",
                 output_format="compressed-tensors")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, message", [
    ({"output_format": "awq"}, "unknown format 'awq'; use one of: gptq, compressed-tensors"),
    ({"layout": "sglang"}, "unknown layout 'sglang' for mixtral; use one of: vllm, gptqmodel"),
    ({"output_format": "compressed-tensors", "layout": "gptqmodel"},
     "--layout gptqmodel is for --format gptq .* take the vllm layout"),
])
def test_unknown_format_or_layout(tmp_path, tiny_mixtral, kwargs, message):
    with pytest.raises(MoequantError, match=message):
        compress(tiny_mixtral, tmp_path / "out", recipe="a4e4", method="rtn", **kwargs)


def test_resume_refuses_another_form(tmp_path, tiny_mixtral):
    from tests.conftest import StopAfterLayers

    out = tmp_path / "out"
    with pytest.raises(MoequantError, match="stopped after 1"):
        compress(tiny_mixtral, out, recipe="a4e4", method="rtn", progress=StopAfterLayers(1))
    with pytest.raises(MoequantError, match="used other settings"):
        compress(tiny_mixtral, out, recipe="a4e4", method="rtn", resume=True,
                 output_format="compressed-tensors")
    result = compress(tiny_mixtral, out, recipe="a4e4", method="rtn", resume=True)
    assert result.record["format"] == "gptq"


def test_inspect_names_the_form_and_its_readers(mixed_outputs):
    from moequant.inspection import describe

    seen = {}
    for (fmt, layout, sym), path in mixed_outputs.items():
        if sym:
            info = describe(path)
            seen[fmt, layout] = (info["format"], info["layout"], info["readers"], info["loadable"])
    assert seen["gptq", "gptqmodel"][:3] == ("gptq", "gptqmodel", ["GPTQModel 7", "moequant"])
    assert seen["gptq", "vllm"][:2] == ("gptq", "vllm") and "vLLM (4- and 8-bit modules)" in seen["gptq", "vllm"][2]
    assert seen["compressed-tensors", "vllm"][:2] == ("compressed-tensors", "vllm")
    assert all(v[3] for v in seen.values())


def test_families_named_alike_in_both_layouts_suit_both_readers(tmp_path):
    from moequant.arch.registry import adapter_for
    from moequant.checkpoint.output_form import OutputForm, readers_of
    from tests.conftest import make_family

    arch = adapter_for(json.loads((make_family(tmp_path / "q", "qwen3_moe") / "config.json").read_text()))
    readers, not_read = readers_of(arch, OutputForm("gptq", "vllm"), {})
    assert "GPTQModel 7" in readers and "vLLM (4- and 8-bit modules)" in readers
    assert not any("GPTQModel" in r for r in not_read)
    dense = {"model.layers.1.mlp.gate_proj": (4, 128, True)}
    assert any("dense MLP" in r for r in readers_of(arch, OutputForm("gptq", "vllm"), dense)[1])


def test_experts_of_one_layer_at_two_widths_are_not_for_transformers(tmp_path):
    from moequant.arch.registry import adapter_for
    from moequant.checkpoint.output_form import OutputForm, readers_of
    from tests.conftest import make_mixtral

    arch = adapter_for(json.loads((make_mixtral(tmp_path / "m") / "config.json").read_text()))
    experts = [i.name for i in arch.layer_linears(0) if i.kind == "expert"]
    even = {n: (4, 128, True) for n in experts}
    uneven = {**even, experts[0]: (2, 128, True)}
    form = OutputForm("compressed-tensors", "vllm")
    assert any(r.startswith("transformers") for r in readers_of(arch, form, even)[0])
    readers, not_read = readers_of(arch, form, uneven)
    assert not any(r.startswith("transformers") for r in readers)
    assert any("differ in bits" in r for r in not_read)


def test_reads_compressed_tensors_as_llm_compressor_writes_it(mixed_outputs, tmp_path):
    """Linear targets, an ignore list, transformers' expert names, bfloat16 scales and act-order g_idx."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = mixed_outputs["compressed-tensors", "vllm", True]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = _logits(source, ids)
    out = tmp_path / "llmc"
    shutil.copytree(source, out)
    arch = moequant.arch.registry.adapter_for(json.loads((out / "config.json").read_text()))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors = {}
        for name, t in load_file(file).items():
            new = arch.disk_name(name, "gptqmodel")
            if name.endswith(".weight_scale"):
                t = t.to(torch.bfloat16).to(torch.float16).to(torch.bfloat16)
            tensors[new] = t
            if name.endswith(".weight_packed"):
                k = int(load_file(file)[name[: -len("packed")] + "shape"][1])
                tensors[new[: -len("packed")] + "g_idx"] = torch.arange(k, dtype=torch.int32) // 64
                weight_map[new[: -len("packed")] + "g_idx"] = file.name
            weight_map[new] = file.name
        save_file(tensors, str(file), metadata={"format": "pt"})
    index["weight_map"] = weight_map
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((out / "config.json").read_text())
    qcfg = config["quantization_config"]
    renames = {"block_sparse_moe\\.": "mlp\\.", "\\.w1": "\\.gate_proj", "\\.w3": "\\.up_proj",
               "\\.w2": "\\.down_proj"}
    for g in qcfg["config_groups"].values():
        for old, new in renames.items():
            g["targets"] = [t.replace(old, new) for t in g["targets"]]
        g["weights"]["actorder"] = "group"
    qcfg["ignore"] = ["lm_head", "re:.*mlp.gate$", "re:.*\\.layers\\.1\\.mlp\\.experts\\.0\\.down_proj$"]
    (out / "config.json").write_text(json.dumps(config))
    scales_rounded = _logits(out, ids)
    assert (scales_rounded - reference).abs().max() < 1e-2
    assert torch.equal(scales_rounded.argmax(-1), reference.argmax(-1))
