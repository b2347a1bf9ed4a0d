"""load(): compressed checkpoints run from packed weights and agree with their dequantised floats."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moequant.checkpoint.reader import CheckpointReader
from moequant.compression import compress
from moequant.errors import MoequantError
from moequant.kernels import dispatch
from moequant.loading import dequantized_model, load, model_bytes, module_spec
from moequant.nn.quant_experts import LinearSpec, QuantExperts
from moequant.nn.quant_linear import QuantLinear
from moequant.recipe import parse_recipe
from tests.conftest import add_tokenizer, make_mixtral

RECIPE_STACKED = r"""
name: test-stacked
method: rtn
rules:
  - match: '.*\.self_attn\.q_proj'
    bits: 16
  - match: '.*\.self_attn\.(k|v|o)_proj'
    bits: 4
    group_size: 32
    sym: false
  - match: '.*\.block_sparse_moe\.experts\.\d+\.w[123]'
    bits: 3
    group_size: 64
"""

RECIPE_MIXED = r"""
name: test-mixed
method: rtn
group_size: 32
rules:
  - match: 'model\.layers\.1\.block_sparse_moe\.experts\.\d+\.w[123]'
    bits: 16
  - match: '.*\.experts\.0\.w[13]'
    bits: 4
  - match: '.*\.experts\.\d+\.w[123]'
    bits: 2
    sym: false
  - match: '.*\.self_attn\.(q|k|v|o)_proj'
    bits: 8
  - match: 'lm_head'
    bits: 8
    group_size: -1
"""


def _compress(tmp_path_factory, name: str, recipe: str, **overrides):
    root = tmp_path_factory.mktemp(name)
    src = make_mixtral(root / "src", seed=3, **overrides)
    return src, compress(src, root / "out", recipe=parse_recipe(recipe), method="rtn").path


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    """(original, compressed): 4-bit asymmetric k/v/o, 16-bit q, 3-bit experts in groups of 64."""
    src, out = _compress(tmp_path_factory, "stacked", RECIPE_STACKED)
    add_tokenizer(out)
    return src, out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Mixed expert bits in layer 0, 16-bit experts in layer 1, 8-bit attention and lm_head."""
    return _compress(tmp_path_factory, "mixed", RECIPE_MIXED)[1]


def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


def test_logits_equal_the_dequantised_model(stacked):
    _, out = stacked
    model = load(out, device="cpu")
    reference = dequantized_model(out, device="cpu")
    assert not any(isinstance(m, (QuantLinear, QuantExperts)) for m in reference.modules())
    x = ids()
    close(logits(model, x), logits(reference, x))


def test_original_checkpoint_loads_like_transformers(stacked):
    from transformers import MixtralForCausalLM

    src, _ = stacked
    model = load(src, device="cpu")
    assert not any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules())
    x = ids(seed=1)
    close(logits(model, x), logits(MixtralForCausalLM.from_pretrained(src), x), rel=1e-6)


def test_original_checkpoint_with_fused_experts(stacked, tmp_path):
    from transformers import MixtralForCausalLM

    src, _ = stacked
    MixtralForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "fused", save_original_format=False)
    x = ids(seed=1)
    close(logits(load(tmp_path / "fused", device="cpu"), x), logits(load(src, device="cpu"), x), rel=0)


def test_generate_matches_the_dequantised_model(stacked):
    _, out = stacked
    prompt = ids(batch=1, length=5, seed=2)
    got = load(out, device="cpu").generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    want = dequantized_model(out, device="cpu").generate(prompt, max_new_tokens=6, min_new_tokens=6,
                                                         do_sample=False)
    assert got.shape == (1, 11)
    assert torch.equal(got, want)


def test_quantised_modules_hold_packed_tensors_only(stacked):
    _, out = stacked
    model = load(out, device="cpu")
    attn, moe = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.q_proj, nn.Linear) and not isinstance(attn.q_proj, QuantLinear)
    assert isinstance(attn.k_proj, QuantLinear) and (attn.k_proj.bits, attn.k_proj.group_size) == (4, 32)
    assert isinstance(moe.experts, QuantExperts) and moe.experts.stacked
    assert (moe.experts.w13_spec, moe.experts.w2_spec) == (LinearSpec(3, 64), LinearSpec(3, 64))
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if ".experts." in name or re.search(r"\.(k|v|o)_proj\.", name):
            assert tensor.dtype in (torch.int32, torch.float16), name
            assert name.endswith(("qweight", "qzeros", "scales", "g_idx")), name
    # bytes held = packed tensors as stored + every float tensor in float32, w3's g_idx shared with w1
    reader = CheckpointReader(out)
    expected = 0
    for name in reader.names:
        if name.endswith(".w3.g_idx"):
            continue
        t = reader.get(name)
        packed = name.endswith(("qweight", "qzeros", "scales", "g_idx"))
        expected += t.numel() * (t.element_size() if packed else 4)
    rotary = sum(t.numel() * t.element_size() for t in model.model.rotary_emb.buffers())  # not in checkpoints
    assert model_bytes(model) - rotary == expected


def test_mixed_layouts_and_quantised_lm_head(mixed):
    model = load(mixed, device="cpu")
    layer0, layer1 = (model.model.layers[i].mlp.experts for i in (0, 1))
    assert isinstance(layer0, QuantExperts) and not layer0.stacked
    assert (layer0.experts[0].w1.bits, layer0.experts[0].w2.bits, layer0.experts[1].w1.bits) == (4, 2, 2)
    assert not isinstance(layer1, QuantExperts) and layer1.gate_up_proj.shape == (4, 512, 128)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    x = ids(seed=3)
    close(logits(model, x), logits(dequantized_model(mixed, device="cpu"), x))


def test_tied_embeddings(tmp_path_factory):
    _, out = _compress(tmp_path_factory, "tied", RECIPE_STACKED, tie_word_embeddings=True, num_hidden_layers=1)
    model = load(out, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = ids(seed=4)
    close(logits(model, x), logits(dequantized_model(out, device="cpu"), x))


def test_bfloat16_keeps_fp16_scales(stacked):
    _, out = stacked
    model = load(out, device="cpu", dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.experts.w13_scales.dtype == torch.float16
    x = ids(seed=5)
    got = logits(model, x)
    assert got.dtype == torch.bfloat16
    want = logits(load(out, device="cpu"), x)
    torch.testing.assert_close(got.float(), want, rtol=0.1, atol=0.05 * float(want.abs().max()))


def _rewrite(folder, name: str, replace=None) -> None:
    """Drop tensor ``name`` from its shard and the index, or replace it with ``replace``."""
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = folder / index["weight_map"][name]
    tensors = load_file(str(shard))
    if replace is None:
        del tensors[name]
        del index["weight_map"][name]
        index_file.write_text(json.dumps(index))
    else:
        tensors[name] = replace
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_missing_tensor_is_named(stacked, tmp_path):
    broken = shutil.copytree(stacked[1], tmp_path / "broken")
    name = "model.layers.1.block_sparse_moe.experts.2.w2.qzeros"
    _rewrite(broken, name)
    with pytest.raises(MoequantError, match=re.escape(name)):
        load(broken, device="cpu")


def test_misshaped_tensor_is_named(stacked, tmp_path):
    broken = shutil.copytree(stacked[1], tmp_path / "broken")
    name = "model.layers.0.self_attn.k_proj.scales"
    _rewrite(broken, name, torch.ones(5, 64, dtype=torch.float16))
    with pytest.raises(MoequantError, match=re.escape(name) + r" has shape \[5, 64\].*\[4, 64\]"):
        load(broken, device="cpu")


def test_unsupported_quantisation_is_refused(stacked, tmp_path):
    other = shutil.copytree(stacked[1], tmp_path / "awq")
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "awq"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoequantError, match="GPTQ checkpoints only"):
        load(other, device="cpu")


def test_module_spec_follows_dynamic_rules():
    qcfg = {"bits": 3, "group_size": 128, "dynamic": {
        r"-:^model\.layers\.0\.self_attn\.q_proj$": {},
        r"+:^model\.layers\.\d+\.self_attn\..*$": {"bits": 4, "group_size": 32},
        r"^model\.layers\.1\..*experts\.0\..*$": {"bits": 8},
    }}
    assert module_spec(qcfg, "model.layers.0.self_attn.q_proj") is None
    assert module_spec(qcfg, "model.layers.1.self_attn.q_proj") == LinearSpec(4, 32)
    assert module_spec(qcfg, "model.layers.1.block_sparse_moe.experts.0.w1") == LinearSpec(8, 128)
    assert module_spec(qcfg, "model.layers.1.block_sparse_moe.experts.1.w1") == LinearSpec(3, 128)
    assert module_spec(None, "model.layers.1.self_attn.q_proj") is None
    listed = {**qcfg, "modules_in_block_to_quantize": [["self_attn.q_proj"], ["block_sparse_moe.experts.1.w1"]]}
    assert module_spec(listed, "model.layers.1.self_attn.q_proj") == LinearSpec(4, 32)
    assert module_spec(listed, "model.layers.1.self_attn.k_proj") is None
    assert module_spec(listed, "model.layers.1.block_sparse_moe.experts.0.w1") is None
    assert module_spec(listed, "model.layers.1.block_sparse_moe.experts.1.w1") == LinearSpec(3, 128)


def test_modules_in_block_to_quantize_keeps_the_others_16_bit(stacked, tmp_path):
    """The optimum / AutoGPTQ way of leaving modules unquantised: q_proj is absent from the list
    instead of excluded by a ``-:`` dynamic rule; the model loads the same."""
    other = shutil.copytree(stacked[1], tmp_path / "listed")
    config = json.loads((other / "config.json").read_text())
    qcfg = config["quantization_config"]
    qcfg["dynamic"] = {k: v for k, v in qcfg["dynamic"].items() if not k.startswith("-:")}
    experts = [f"block_sparse_moe.experts.{e}.w{r}" for r in (1, 3, 2) for e in range(4)]
    qcfg["modules_in_block_to_quantize"] = [["self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"], experts]
    (other / "config.json").write_text(json.dumps(config))
    model = load(other, device="cpu")
    attn = model.model.layers[1].self_attn
    assert not isinstance(attn.q_proj, QuantLinear) and isinstance(attn.k_proj, QuantLinear)
    x = ids(seed=6)
    close(logits(model, x), logits(load(stacked[1], device="cpu"), x), rel=0)

    qcfg["modules_in_block_to_quantize"] = "self_attn.k_proj"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoequantError, match="modules_in_block_to_quantize must be a list"):
        load(other, device="cpu")


def test_quantize_config_file_stands_in_for_the_config_entry(stacked, tmp_path):
    """AutoGPTQ-era checkpoints keep their settings in quantize_config.json only; compress writes
    it too, and a folder of packed weights with neither is refused with what to add."""
    written = json.loads((stacked[1] / "quantize_config.json").read_text())
    config = json.loads((stacked[1] / "config.json").read_text())
    assert written == config["quantization_config"]

    other = shutil.copytree(stacked[1], tmp_path / "file-only")
    del config["quantization_config"]
    (other / "config.json").write_text(json.dumps(config))
    x = ids(seed=7)
    close(logits(load(other, device="cpu"), x), logits(load(stacked[1], device="cpu"), x), rel=0)

    (other / "quantize_config.json").unlink()
    with pytest.raises(MoequantError, match=r"holds packed weights \(.*\.qweight\) but no quantisation config"):
        load(other, device="cpu")
    (other / "quantize_config.json").write_text("[1, 2")
    with pytest.raises(MoequantError, match="quantize_config.json is not valid JSON"):
        load(other, device="cpu")


def _as_gptq_v2(folder, zero_at=None):
    """Rewrite a v1 checkpoint as format gptq_v2 (qzeros hold the zero points themselves); with
    ``zero_at``, that module's first zero point becomes 0, which v2 can hold and v1 cannot."""
    from moequant.packed.bitstream import pack_rows, unpack_qzeros

    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in [n for n in tensors if n.endswith(".qzeros")]:
            bits = tensors[name].shape[-1] * 32 // tensors[name[: -len("qzeros")] + "scales"].shape[-1]
            zeros = unpack_qzeros(tensors[name], bits)
            if name == zero_at:
                zeros[0, 0] = 0
            tensors[name] = pack_rows(zeros.t(), bits).t().contiguous()
        save_file(tensors, shard)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (folder / "config.json").write_text(json.dumps(config))


def test_gptq_v2_checkpoints_load_as_v1(stacked, mixed, tmp_path):
    """GPTQModel's v2 layout stores zero points without v1's offset of one: the same model."""
    x = ids(seed=8)
    for name, folder in (("stacked", stacked[1]), ("mixed", mixed)):
        v2 = shutil.copytree(folder, tmp_path / name)
        _as_gptq_v2(v2)
        close(logits(load(v2, device="cpu"), x), logits(load(folder, device="cpu"), x), rel=0)
    broken = shutil.copytree(stacked[1], tmp_path / "zero")
    name = "model.layers.1.self_attn.k_proj.qzeros"
    _as_gptq_v2(broken, zero_at=name)
    with pytest.raises(MoequantError, match=re.escape(name) + r" holds zero points of 0 \(format gptq_v2\)"):
        load(broken, device="cpu")


def test_engine_limits_from_the_recipe_and_from_the_tensors_agree(mixed):
    """compress records the limits from its specs; inspect reads them back from the tensors."""
    from moequant.inspection import describe

    recorded = json.loads((mixed / "moequant.json").read_text())["engine_limits"]
    assert [n.split(" ")[0] for n in recorded] == ["2-bit", "the", "asymmetric"]
    assert all("layer 0" in n for n in recorded)
    assert describe(mixed)["engine_limits"] == recorded


def test_quantize_config_file_beside_plain_weights_is_ignored(tmp_path):
    src = make_mixtral(tmp_path / "plain")
    (src / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    assert "quantization_config" not in CheckpointReader(src).config


def test_dtype_on_gpus_without_bfloat16(monkeypatch):
    """A bfloat16 checkpoint computes in float16 on a GPU below compute capability 8.0."""
    from moequant.loading import resolve_dtype

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_dtype(None, {"dtype": "bfloat16"}, cuda) == torch.float16
    assert resolve_dtype("auto", {"torch_dtype": "float32"}, cuda) == torch.float32
    assert resolve_dtype(torch.float16, {}, cuda) == torch.float16
    with pytest.raises(MoequantError, match=r"cuda:0 has no bfloat16 arithmetic .*; use float16"):
        resolve_dtype("bfloat16", {}, cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_dtype(None, {"dtype": "bfloat16"}, cuda) == torch.bfloat16
    assert resolve_dtype(None, {"dtype": "bfloat16"}, torch.device("cpu")) == torch.float32
    with pytest.raises(MoequantError, match="not a floating-point type"):
        resolve_dtype(torch.int8, {}, cuda)


def test_triton_backend_needs_a_way_to_run(stacked, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MoequantError, match="TRITON_INTERPRET=1"):
        load(stacked[1], device="cpu", backend="triton")
    with pytest.raises(MoequantError, match="unknown kernel backend"):
        load(stacked[1], device="cpu", backend="fast")


def test_triton_backend_in_the_interpreter(tmp_path_factory):
    pytest.importorskip("triton")
    if not dispatch.triton_available("cpu"):
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 set before they are imported")
    _, out = _compress(tmp_path_factory, "triton", RECIPE_STACKED, num_hidden_layers=1)
    x = ids(batch=1, length=4, seed=6)
    got = logits(load(out, device="cpu", backend="triton"), x)
    torch.testing.assert_close(got, logits(load(out, device="cpu", backend="torch"), x), rtol=1e-4, atol=1e-4)


def test_generate_command(stacked):
    from typer.testing import CliRunner

    from moequant_cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(stacked[1]), "--prompt", "The for statement",
                                 "--max-new-tokens", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("The for statement")
    assert re.search(r"5 new tokens in [\d.]+ s .*: [\d.]+ tokens/s", result.output.replace("\n", " "))
    missing = runner.invoke(app, ["generate", str(stacked[0]), "--prompt", "x", "--device", "cpu"])
    assert missing.exit_code == 1
    assert "no usable tokenizer" in missing.output and "Traceback" not in missing.output


@pytest.mark.parametrize("qcfg, message", [
    (["gptq"], "quantization_config must be a JSON object of GPTQ settings, got list"),
    ("gptq", "quantization_config must be a JSON object of GPTQ settings, got str"),
    (4, "quantization_config must be a JSON object of GPTQ settings, got int"),
    ({"bits": "4"}, "quantization_config.bits must be one of 2, 3, 4, 8, got '4'"),
    ({"bits": 4.5}, "quantization_config.bits must be one of 2, 3, 4, 8, got 4.5"),
    ({"bits": True}, "quantization_config.bits must be one of"),
    ({"group_size": "128"}, "quantization_config.group_size must be -1"),
    ({"sym": "yes"}, "quantization_config.sym must be true or false"),
    ({"dynamic": ["-:.*"]}, "quantization_config.dynamic must be an object mapping module patterns"),
    ({"dynamic": "-:.*"}, "quantization_config.dynamic must be an object mapping module patterns"),
    ({"dynamic": {"+:.*": 5}}, r"quantization_config.dynamic\['\+:\.\*'\] must be an object of overrides"),
    ({"dynamic": {"+:.*": {"bits": "x"}}}, r"dynamic\['\+:\.\*'\]\.bits must be one of"),
    ({"dynamic": {"+:a{99999999999}": {}}}, "is not a valid regular expression"),
    ({"modules_in_block_to_quantize": [[1]]}, "modules_in_block_to_quantize must be a list of lists"),
])
def test_wrongly_typed_quantization_config_is_one_line_everywhere(stacked, tmp_path, qcfg, message):
    from moequant.evals.streamed import evaluate_windows
    from moequant.inspection import describe

    folder = shutil.copytree(stacked[1], tmp_path / "typed")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = qcfg if not isinstance(qcfg, dict) else {**config["quantization_config"], **qcfg}
    (folder / "config.json").write_text(json.dumps(config))
    for use in (lambda: load(folder, device="cpu"), lambda: describe(folder),
                lambda: evaluate_windows(folder, ids(1, 8))):
        with pytest.raises(MoequantError, match=message) as info:
            use()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("value, bad", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_scales_are_refused_by_name(stacked, tmp_path, value, bad):
    broken = shutil.copytree(stacked[1], tmp_path / "nan")
    name = "model.layers.1.block_sparse_moe.experts.2.w2.scales"
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    scales = load_file(str(broken / index["weight_map"][name]))[name].clone()
    scales[1, 3] = value
    _rewrite(broken, name, scales)
    with pytest.raises(MoequantError, match=re.escape(f"tensor {name} in ") + f".* contains {bad} values"):
        load(broken, device="cpu")
    with pytest.raises(MoequantError, match=re.escape(name)):
        dequantized_model(broken, device="cpu")


def test_values_beyond_float16_are_refused_when_loading_in_float16(tmp_path):
    src = make_mixtral(tmp_path / "big", num_hidden_layers=1)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.norm.weight"][0] = 1e6
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    load(src, device="cpu")
    with pytest.raises(MoequantError, match=r"model.norm.weight holds values beyond the range of torch.float16"):
        load(src, device="cpu", dtype="float16")
