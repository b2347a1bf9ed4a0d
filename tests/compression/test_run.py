import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import moequant
from moequant.checkpoint.reader import CheckpointReader
from moequant.checkpoint.weights import tensor_getter
from moequant.compression import CalibSettings, compress
from moequant.errors import MoequantError
from moequant.packed.bitstream import unpack_qzeros
from moequant.quant.rtn import rtn
from moequant.recipe import parse_recipe
from tests.conftest import StopAfterLayers, add_tokenizer, make_mixtral

SMALL = CalibSettings(samples=4, seqlen=64, seed=0)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_rtn_layout_and_values(tmp_path, tiny_mixtral):
    before = digest(tiny_mixtral)
    result = compress(tiny_mixtral, tmp_path / "out", recipe="a4e3", method="rtn")
    assert digest(tiny_mixtral) == before, "the source checkpoint must never be written"
    out = result.path
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["checkpoint_format"], q["bits"], q["sym"]) == ("gptq", "gptq", 3, True)
    assert any(v.get("bits") == 4 for v in q["dynamic"].values())
    assert (out / "recipe.yaml").is_file() and (out / "moequant.json").is_file()
    reader, source = CheckpointReader(out), CheckpointReader(tiny_mixtral)
    name = "model.layers.1.block_sparse_moe.experts.2.w2"
    assert reader.shape(name + ".qweight") == (256 * 3 // 32, 128)
    assert reader.shape(name + ".qzeros") == (2, 128 * 3 // 32)
    assert reader.dtype(name + ".scales") == torch.float16
    assert not reader.has(name + ".weight")
    for kept in ("model.layers.0.block_sparse_moe.gate.weight", "model.embed_tokens.weight", "lm_head.weight",
                 "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        assert torch.equal(reader.get(kept), source.get(kept))
    expected = rtn(source.get(name + ".weight"), 3, 128, True).dequantize()
    assert torch.equal(tensor_getter(reader)(name + ".weight"), expected)
    record = result.record
    assert record["modules"][name]["bits"] == 3 and record["modules"][name]["method"] == "rtn"
    gate = record["modules"]["model.layers.0.block_sparse_moe.gate"]
    assert (gate["kind"], gate["bits"], gate["method"]) == ("router", 16, "keep")
    totals = record["totals"]
    assert totals["compression_ratio"] > 4 and 3 < totals["bits_per_weight_quantised"] < 4


def test_gptq_beats_rtn_and_records_every_expert(tmp_path, tiny_mixtral_tok):
    gptq = compress(tiny_mixtral_tok, tmp_path / "g", recipe="a4e2", calib=SMALL).record
    rtn_rec = compress(tiny_mixtral_tok, tmp_path / "r", recipe="a4e2", method="rtn", calib=SMALL).record
    assert gptq["calibration"]["tokens"] == SMALL.samples * SMALL.seqlen
    for layer in gptq["layers"]:
        assert sum(layer["routing_histogram"]) == SMALL.samples * SMALL.seqlen * 2
    experts = {n: m for n, m in gptq["modules"].items() if ".experts." in n}
    assert len(experts) == 2 * 4 * 3
    assert all(m["method"] == "gptq" and m["error_kind"] == "output" and "calibration" in m for m in experts.values())
    assert all(m["tokens"] >= 0 for m in experts.values())
    attn = [n for n in gptq["modules"] if "self_attn" in n]
    assert all(gptq["modules"][n]["error"] < rtn_rec["modules"][n]["error"] for n in attn[:4])
    mean = lambda rec, names: sum(rec["modules"][n]["error"] for n in names) / len(names)  # noqa: E731
    assert mean(gptq, list(experts)) < mean(rtn_rec, list(experts))
    timing = gptq["timing"]
    for layer_s, phases in zip(timing["layers_s"], timing["layer_phases_s"], strict=True):
        assert set(phases) == {"read", "hessians", "forward", "solve", "pack"}
        assert 0 < sum(phases.values()) <= layer_s + 0.0005 * len(phases)  # each rounded to the millisecond


def test_tiny_calibration_leaves_no_expert_behind(tmp_path, tiny_mixtral_tok):
    calib = CalibSettings(samples=1, seqlen=32, seed=3)
    rec = compress(tiny_mixtral_tok, tmp_path / "o", recipe="a4e3", calib=calib).record
    starved = rec["starved_experts"]
    assert starved, "32 tokens over 4 experts cannot reach min_tokens=64"
    assert all(s["policy"] == "augmented" for s in starved)
    get = tensor_getter(CheckpointReader(tmp_path / "o"))
    for name, module in rec["modules"].items():
        if ".experts." not in name:
            continue
        assert module["calibration"] in ("routed", "augmented")
        w = get(name + ".weight")
        assert (w.abs().sum(dim=1) > 0).all(), f"{name} has an all-zero row"


def test_routed_policy_records_plain_rounding_for_empty_experts(tmp_path, tiny_mixtral_tok):
    recipe = parse_recipe(
        "name: routed\nexpert_calibration: routed\nmin_tokens: 100000\nrules:\n"
        "  - match: '.*experts\\.\\d+\\.w[123]'\n    bits: 4\n"
    )
    rec = compress(tiny_mixtral_tok, tmp_path / "o", recipe=recipe, calib=CalibSettings(samples=1, seqlen=4)).record
    for layer in rec["layers"]:
        for e, count in enumerate(layer["routing_histogram"]):
            module = rec["modules"][f"model.layers.{layer['layer']}.block_sparse_moe.experts.{e}.w1"]
            if count == 0:
                assert module["method"] == "rtn" and "no tokens" in module["calibration"]
            else:
                assert module["method"] == "gptq"


def test_resume_is_byte_identical(tmp_path):
    src = add_tokenizer(make_mixtral(tmp_path / "src", seed=5, num_hidden_layers=3))
    full = compress(src, tmp_path / "full", calib=SMALL)
    with pytest.raises(MoequantError, match="continue with --resume"):
        compress(src, tmp_path / "part", calib=SMALL, progress=StopAfterLayers(1))
    assert not (tmp_path / "part").exists()
    with pytest.raises(MoequantError, match="pass --resume"):
        compress(src, tmp_path / "part", calib=SMALL)
    resumed = compress(src, tmp_path / "part", calib=SMALL, resume=True)
    a, b = digest(full.path), digest(resumed.path)
    assert a.pop("moequant.json") and b.pop("moequant.json")
    assert a == b
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert strip(json.loads((full.path / "moequant.json").read_text())) == \
        strip(json.loads((resumed.path / "moequant.json").read_text()))


def test_resume_refuses_other_settings(tmp_path, tiny_mixtral_tok):
    with pytest.raises(MoequantError):
        compress(tiny_mixtral_tok, tmp_path / "o", calib=SMALL, progress=StopAfterLayers(1))
    with pytest.raises(MoequantError, match="other settings"):
        compress(tiny_mixtral_tok, tmp_path / "o", calib=CalibSettings(samples=2, seqlen=64), resume=True)


def test_sharded_source_and_old_config_style(tmp_path, tiny_mixtral):
    from transformers import MixtralForCausalLM

    MixtralForCausalLM.from_pretrained(tiny_mixtral).save_pretrained(tmp_path / "src", max_shard_size="300KB")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    a = compress(tmp_path / "src", tmp_path / "a", method="rtn")
    b = compress(tiny_mixtral, tmp_path / "b", method="rtn")
    ra, rb = CheckpointReader(a.path), CheckpointReader(b.path)
    assert sorted(ra.names) == sorted(rb.names)
    assert all(torch.equal(ra.get(n), rb.get(n)) for n in ra.names)


def test_asymmetric_zero_points_never_underflow(tmp_path, tiny_mixtral_tok):
    recipe = parse_recipe("name: asym\nsym: false\nrules:\n  - match: '.*(proj|w[123])'\n    bits: 2\n    group_size: 32\n")
    out = compress(tiny_mixtral_tok, tmp_path / "o", recipe=recipe, calib=SMALL).path
    reader = CheckpointReader(out)
    for name in reader.names:
        if name.endswith(".qzeros"):
            zeros = unpack_qzeros(reader.get(name), 2)
            assert zeros.min() >= 1 and zeros.max() <= 3


def test_refusals(tmp_path, tiny_mixtral):
    with pytest.raises(MoequantError, match="inside the source"):
        compress(tiny_mixtral, tiny_mixtral / "out", method="rtn")
    (tmp_path / "exists").mkdir()
    with pytest.raises(MoequantError, match="already exists"):
        compress(tiny_mixtral, tmp_path / "exists", method="rtn")
    if not torch.cuda.is_available():
        with pytest.raises(MoequantError, match="no CUDA device"):
            compress(tiny_mixtral, tmp_path / "x", method="rtn", device="cuda")
    with pytest.raises(MoequantError, match="unknown method"):
        compress(tiny_mixtral, tmp_path / "x", method="awq")


def test_missing_expert_and_nan_are_named(tmp_path, tiny_mixtral):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_mixtral, src)
    tensors = load_file(str(src / "model.safetensors"))
    missing = tensors.pop("model.layers.1.block_sparse_moe.experts.3.w3.weight")
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(MoequantError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.3\.w3\.weight is missing"):
        compress(src, tmp_path / "o", method="rtn")
    missing[0, 0] = float("nan")
    tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"] = missing
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(MoequantError, match=r"experts\.3\.w3\.weight .* contains NaN"):
        compress(src, tmp_path / "o2", method="rtn")
    assert not (tmp_path / "o2").exists()


def test_dense_model_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    with pytest.raises(MoequantError, match="dense model without experts"):
        compress(tmp_path / "llama", tmp_path / "o", method="rtn")


def test_compressed_checkpoint_is_not_compressed_again(tmp_path, tiny_mixtral):
    out = compress(tiny_mixtral, tmp_path / "o", method="rtn").path
    with pytest.raises(MoequantError, match="already quantised"):
        compress(out, tmp_path / "o2", method="rtn")


@pytest.mark.parametrize("settings", ["expert_calibration: all", "hessian_weighting: router"])
def test_other_calibration_settings_change_the_result(tmp_path, tiny_mixtral_tok, settings):
    rules = "rules:\n  - match: '.*experts\\.\\d+\\.w[123]'\n    bits: 3\n"
    calib = CalibSettings(samples=1, seqlen=32, seed=3)
    base = compress(tiny_mixtral_tok, tmp_path / "a", recipe=parse_recipe(f"name: a\n{rules}"), calib=calib)
    other = compress(tiny_mixtral_tok, tmp_path / "b", recipe=parse_recipe(f"name: b\n{settings}\n{rules}"),
                     calib=calib)
    key, value = settings.split(": ")
    assert other.record["settings"][key] == value
    if key == "expert_calibration":
        assert {s["policy"] for s in other.record["starved_experts"]} == {"all"}
    ra, rb = CheckpointReader(base.path), CheckpointReader(other.path)
    assert not all(torch.equal(ra.get(n), rb.get(n)) for n in ra.names if n.endswith(".qweight"))


def test_gptq_without_tokenizer_or_with_short_text_is_clear(tmp_path, tiny_mixtral, tiny_mixtral_tok):
    with pytest.raises(MoequantError, match="no usable tokenizer .*--method rtn"):
        compress(tiny_mixtral, tmp_path / "o", calib=SMALL)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(MoequantError, match="fewer than one window of 64"):
        compress(tiny_mixtral_tok, tmp_path / "o", calib=CalibSettings(source=str(short), samples=2, seqlen=64))
    with pytest.raises(MoequantError, match="unknown dataset"):
        compress(tiny_mixtral_tok, tmp_path / "o", calib=CalibSettings(source="nope", samples=2, seqlen=64))


def test_failure_before_any_layer_leaves_nothing(tmp_path, tiny_mixtral):
    with pytest.raises(MoequantError):
        compress(tiny_mixtral, tmp_path / "o", calib=SMALL)  # no tokenizer
    assert not (tmp_path / ".o.moequant-partial").exists() and not (tmp_path / "o").exists()


KILLABLE = """
import sys, time
from pathlib import Path
from moequant.compression import CalibSettings, compress
from moequant.progress import Progress

class PauseMidLayer(Progress):
    def stage(self, step, name):
        if step == 1 and name == "experts":
            Path(sys.argv[3]).write_text("in layer 1")
            time.sleep(120)

compress(sys.argv[1], sys.argv[2], calib=CalibSettings(samples=4, seqlen=64, seed=0), progress=PauseMidLayer())
"""


def test_killed_mid_layer_resumes_byte_identical(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    src = add_tokenizer(make_mixtral(tmp_path / "src", seed=6, num_hidden_layers=3))
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(src), str(tmp_path / "out"), str(marker)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the run did not reach layer 1"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = tmp_path / ".out.moequant-partial"
    assert not (tmp_path / "out").exists() and not (partial / "config.json").exists()
    assert json.loads((tmp_path / ".out.moequant-resume" / "state.json").read_text())["completed_layers"] == 1
    resumed = compress(src, tmp_path / "out", calib=SMALL, resume=True)
    full = compress(src, tmp_path / "full", calib=SMALL)
    a, b = digest(full.path), digest(resumed.path)
    a.pop("moequant.json"), b.pop("moequant.json")
    assert a == b


def test_expert_batches_give_the_same_checkpoint(tmp_path, tiny_mixtral_tok):
    whole = compress(tiny_mixtral_tok, tmp_path / "all", recipe="a4e2", calib=SMALL)
    batched = compress(tiny_mixtral_tok, tmp_path / "three", recipe="a4e2", calib=SMALL, expert_batch=3)
    a, b = digest(whole.path), digest(batched.path)
    a.pop("moequant.json"), b.pop("moequant.json")
    assert a == b


def test_fused_experts_compress_as_per_expert_ones(tmp_path, tiny_mixtral_tok):
    """A checkpoint written with experts fused (transformers' ``save_original_format=False``) gives
    the same output, byte for byte, under the per-expert names GPTQ readers expect."""
    from transformers import MixtralForCausalLM

    fused = tmp_path / "fused"
    MixtralForCausalLM.from_pretrained(tiny_mixtral_tok).save_pretrained(fused, save_original_format=False)
    for f in tiny_mixtral_tok.glob("tokenizer*"):
        shutil.copy(f, fused)
    want = compress(tiny_mixtral_tok, tmp_path / "a", recipe="a4e3", calib=SMALL).path
    got = compress(fused, tmp_path / "b", recipe="a4e3", calib=SMALL).path
    shards = [p.name for p in want.glob("*.safetensors")]
    assert shards and {n: digest(got)[n] for n in shards} == {n: digest(want)[n] for n in shards}


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    src = make_mixtral(tmp_path / "m", num_hidden_layers=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(moequant.__file__).parent / "assets" / "tiny-mixtral" / f, src)
    with pytest.raises(MoequantError, match=r"token ids up to \d+, past the 256 rows of model\.embed_tokens"):
        compress(src, tmp_path / "out", recipe="a4e3", calib=SMALL)
    assert not (tmp_path / "out").exists()


def test_narrow_models_compress_with_the_default_recipe(tmp_path):
    """Hidden 64 and intermediate 96 with groups of 128: each such module is one group, written
    as group_size -1 for readers; a config that says 128 for them (as other tools write it) loads
    them as one group too, bit for bit the same."""
    from moequant.loading import load

    src = make_mixtral(tmp_path / "m", hidden_size=64, intermediate_size=96, num_hidden_layers=1)
    out = compress(src, tmp_path / "out", recipe="a4e3", method="rtn").path
    reader = CheckpointReader(out)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.block_sparse_moe.experts.1.w2"):
        assert reader.shape(name + ".scales")[0] == 1 and not reader.get(name + ".g_idx").any()
    config = json.loads((out / "config.json").read_text())
    assert {v.get("group_size") for v in config["quantization_config"]["dynamic"].values()} <= {-1, None}
    x = torch.randint(0, 256, (1, 9))
    want = load(out, device="cpu")(input_ids=x).logits

    config["quantization_config"]["group_size"] = 128
    config["quantization_config"]["dynamic"] = {
        k: {**v, "group_size": 128} if v else v for k, v in config["quantization_config"]["dynamic"].items()
    }
    (out / "config.json").write_text(json.dumps(config))
    assert torch.equal(load(out, device="cpu")(input_ids=x).logits, want)


def test_groups_that_do_not_divide_the_input(tmp_path):
    """Intermediate 192 in groups of 128: w2 gets a last group of 64 columns, as GPTQ readers
    expect (ceil(K / g) rows of scales, g_idx = k // g); torch and Triton run it like its floats."""
    from moequant.inspection import describe
    from moequant.kernels import dispatch
    from moequant.loading import dequantized_model, load

    src = add_tokenizer(make_mixtral(tmp_path / "m", intermediate_size=192, num_hidden_layers=1))
    result = compress(src, tmp_path / "out", recipe="a4e3", calib=SMALL)
    reader = CheckpointReader(result.path)
    name = "model.layers.0.block_sparse_moe.experts.2.w2"
    assert reader.shape(name + ".scales") == (2, 128)
    assert torch.equal(reader.get(name + ".g_idx"), (torch.arange(192) // 128).to(torch.int32))
    assert result.record["modules"][name]["group_size"] == 128
    assert result.record["engine_limits"][-1].startswith("group sizes that do not divide a module's inputs (layer 0")
    assert describe(result.path)["engine_limits"] == result.record["engine_limits"]
    x = torch.randint(0, 256, (2, 7))
    want = dequantized_model(result.path, device="cpu")(input_ids=x).logits
    backends = ["torch"] + (["triton"] if dispatch.triton_available("cpu") else [])
    for backend in backends:
        got = load(result.path, device="cpu", backend=backend)(input_ids=x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_modules_the_layout_cannot_hold_are_refused_with_the_fix(tmp_path):
    """Intermediate 200 (not a multiple of 32): the expert rule is refused by name, before anything
    is written, with the way out; following it (a 16-bit rule first) compresses and loads."""
    from moequant.loading import dequantized_model, load

    src = make_mixtral(tmp_path / "m", intermediate_size=200, num_hidden_layers=1)
    with pytest.raises(MoequantError, match=r"rule 4 \(kind .expert.\): .*experts\.0\.w1 cannot be packed: out_features N=200 .*"
                                            r"rule 'bits: 16' placed before this one"):
        compress(src, tmp_path / "out", recipe="a4e3", method="rtn")
    assert not (tmp_path / "out").exists()
    recipe = tmp_path / "keep-experts.yaml"
    recipe.write_text("name: keep-experts\nmethod: rtn\ngroup_size: 64\nrules:\n"
                      "  - match: '.*\\.block_sparse_moe\\.experts\\.\\d+\\.w[123]'\n    bits: 16\n"
                      "  - match: '.*\\.self_attn\\.(q|k|v|o)_proj'\n    bits: 4\n")
    result = compress(src, tmp_path / "out", recipe=str(recipe))
    modules = result.record["modules"]
    assert modules["model.layers.0.block_sparse_moe.experts.3.w2"]["bits"] == 16
    assert modules["model.layers.0.self_attn.q_proj"]["bits"] == 4
    x = torch.randint(0, 256, (1, 9))
    want = dequantized_model(result.path, device="cpu")(input_ids=x).logits
    torch.testing.assert_close(load(result.path, device="cpu", backend="torch")(input_ids=x).logits, want,
                               rtol=1e-5, atol=1e-5)
