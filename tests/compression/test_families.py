"""Qwen3-MoE, Qwen2-MoE and OLMoE through compress, load, eval and resume, as Mixtral goes."""

import hashlib
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import moequant
from moequant.compression import CalibSettings, compress
from moequant.errors import MoequantError
from moequant.evals.report import load_report, write_report
from moequant.evals.run import evaluate
from moequant.inspection import describe
from moequant.recipe import parse_recipe
from tests.conftest import StopAfterLayers, make_family
from tests.gptq_reader import write_float_checkpoint

CALIB = CalibSettings(source="random", samples=8, seqlen=32, seed=0)
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: make_family(root / family, family, seed=1) for family in FAMILIES}


FAMILIES = ("qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "glm4_moe")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_compressed_family_loads_as_the_independent_reader_reads_it(tmp_path, sources, family, method):
    result = compress(sources[family], tmp_path / "out", recipe="a4e3", method=method, calib=CALIB)
    reference = AutoModelForCausalLM.from_pretrained(write_float_checkpoint(result.path, tmp_path / "float"),
                                                     dtype=torch.float32).eval()
    model = moequant.load(result.path, device="cpu", dtype="float32")
    assert relative(logits(model), logits(reference)) < 1e-5
    original = AutoModelForCausalLM.from_pretrained(sources[family], dtype=torch.float32).eval()
    assert relative(logits(model), logits(original)) < 0.5
    bits = {kind: g["bits"] for kind, g in result.record["groups"].items()}
    assert set(bits["attention"]) == {"4"} and set(bits["expert"]) == {"3"}
    assert set(bits["router"]) == {"16"}
    if family != "olmoe":  # dense MLP layers (and Qwen2-MoE's shared expert) get the attention's 4 bits
        assert set(bits["dense_mlp"]) == {"4"}
    if family in ("qwen2_moe", "deepseek_v3", "glm4_moe"):
        assert set(bits["shared_expert"]) == {"4"}
    info = describe(result.path)  # modules narrower than a group are one group (group_size -1)
    assert info["problems"] == [] and info["loadable"] and info["layout"] == "vllm"
    layer_records = result.record["layers"]
    dense = [r["layer"] for r in layer_records if r.get("dense")]
    expected_dense = {"qwen3_moe": [1], "qwen2_moe": [0, 2], "olmoe": [], "deepseek_v3": [0], "glm4_moe": [0]}[family]
    assert dense == (expected_dense if method == "gptq" else [])


@pytest.mark.parametrize("family, dense", [("qwen2_moe", [0, 2]), ("deepseek_v3", [0]), ("glm4_moe", [0])])
def test_family_checkpoint_evaluates_alike_in_both_engines(tmp_path, sources, family, dense):
    out = compress(sources[family], tmp_path / "out", recipe="a4e4", calib=CALIB).path
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    streamed = evaluate(out, baseline=sources[family], windows=windows, device="cpu")
    memory = evaluate(out, baseline=sources[family], windows=windows, device="cpu", engine="memory")
    per_layer = streamed["router_agreement_per_layer"]
    assert [i for i, r in enumerate(per_layer) if r is None] == dense
    paths = write_report(streamed, tmp_path / "report.json")
    assert load_report(paths["json"])["router_agreement_per_layer"] == per_layer
    assert "| 0 | - |" in paths["md"].read_text()
    assert streamed["router_agreement_per_layer"] == memory["router_agreement_per_layer"]
    assert streamed["perplexity"] == pytest.approx(memory["perplexity"], rel=1e-5)
    assert streamed["kl_divergence"]["mean"] == pytest.approx(memory["kl_divergence"]["mean"], rel=1e-3, abs=1e-7)


def test_family_resume_gives_the_same_bytes(tmp_path, sources):
    whole = compress(sources["qwen3_moe"], tmp_path / "whole", recipe="a4e3", calib=CALIB).path
    out = tmp_path / "resumed"
    with pytest.raises(MoequantError, match="stopped after 2"):
        compress(sources["qwen3_moe"], out, recipe="a4e3", calib=CALIB, progress=StopAfterLayers(2))
    compress(sources["qwen3_moe"], out, recipe="a4e3", calib=CALIB, resume=True)
    for file in whole.glob("*.safetensors"):
        assert hashlib.sha256(file.read_bytes()).digest() == hashlib.sha256((out / file.name).read_bytes()).digest()


def test_family_in_compressed_tensors_names_its_modules(tmp_path, sources):
    pytest.importorskip("compressed_tensors")
    from tests.compressed_tensors_reader import decompressed_weights

    with pytest.raises(MoequantError, match="mlp.down_proj has 160 inputs, which groups of 128 do not divide"):
        compress(sources["qwen3_moe"], tmp_path / "out", recipe="a4e4", method="rtn",
                 output_format="compressed-tensors")
    recipe = parse_recipe("name: g32\nmethod: rtn\ngroup_size: 32\nrules:\n  - kind: attention\n    bits: 8\n"
                          "  - kind: dense_mlp\n    bits: 8\n  - kind: expert\n    bits: 4\n")
    out = compress(sources["qwen3_moe"], tmp_path / "out", recipe=recipe, output_format="compressed-tensors").path
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = [t for g in qcfg["config_groups"].values() for t in g["targets"]]
    # vLLM looks a fused experts module up as <prefix>.experts.0.gate_proj
    assert any(t.startswith("re:") and re.match(t[3:], "model.layers.0.mlp.experts.0.gate_proj") for t in targets)
    weights = decompressed_weights(out)
    assert "model.layers.1.mlp.gate_proj" in weights and "model.layers.0.mlp.experts.5.down_proj" in weights
    ct = moequant.load(out, device="cpu", dtype="float32")
    gptq = moequant.load(compress(sources["qwen3_moe"], tmp_path / "g", recipe=recipe).path, device="cpu",
                         dtype="float32")
    assert torch.equal(logits(ct), logits(gptq))


def test_family_runs_on_the_triton_kernels(tmp_path, sources):
    pytest.importorskip("triton")
    out = compress(sources["olmoe"], tmp_path / "out", recipe="a4e2", method="rtn").path
    ids = IDS[:1, :6]
    torch_path = logits(moequant.load(out, device="cpu", dtype="float32", backend="torch"), ids)
    triton_path = logits(moequant.load(out, device="cpu", dtype="float32", backend="triton"), ids)
    assert relative(triton_path, torch_path) < 1e-4


def test_deepseek_multi_token_prediction_layers_pass_through(tmp_path, sources):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "with-mtp"
    shutil.copytree(sources["deepseek_v3"], src)
    config = json.loads((src / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (src / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    mtp = {"model.layers.3.enorm.weight": torch.ones(128), "model.layers.3.eh_proj.weight": torch.randn(128, 256)}
    save_file({**tensors, **mtp}, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = compress(src, tmp_path / "out", recipe="a4e4", method="rtn").path
    written = load_file(out / "model-00004-of-00004.safetensors")
    assert all(torch.equal(written[k], v) for k, v in mtp.items())
    config["num_nextn_predict_layers"] = 0
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoequantError, match="belongs to layer 3, but config.json field num_hidden_layers is 3"):
        compress(src, tmp_path / "out2", recipe="a4e4", method="rtn")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_family_generates_from_the_command_line(tmp_path, sources, family):
    """Compress (by GPTQ on the bundled text), then generate with the copied tokenizer, from the CLI."""
    import shutil

    from typer.testing import CliRunner

    from moequant_cli.main import app
    from tests.conftest import add_tokenizer

    src = tmp_path / "src"
    shutil.copytree(sources[family], src)
    add_tokenizer(src)
    out = tmp_path / "out"
    runner = CliRunner()
    done = runner.invoke(app, ["compress", str(src), "-o", str(out), "--samples", "4", "--seqlen", "32"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["generate", str(out), "--prompt", "The module", "--max-new-tokens", "5"])
    assert done.exit_code == 0, done.output
    assert "The module" in done.output


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fused_family_experts_compress_as_per_expert_ones(tmp_path, sources, family):
    """Experts saved fused (``save_original_format=False``) give the same output bytes as per-expert files."""
    fused = tmp_path / "fused"
    AutoModelForCausalLM.from_pretrained(sources[family]).save_pretrained(fused, save_original_format=False)
    from safetensors import safe_open

    keys = [k for f in fused.glob("*.safetensors") for k in safe_open(f, "pt").keys()]
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys) and not any(".experts.0." in k for k in keys)
    want = compress(sources[family], tmp_path / "a", recipe="a4e3", calib=CALIB).path
    got = compress(fused, tmp_path / "b", recipe="a4e3", calib=CALIB).path
    for file in want.glob("*.safetensors"):
        assert hashlib.sha256(file.read_bytes()).digest() == hashlib.sha256((got / file.name).read_bytes()).digest()
