import json

import pytest
from safetensors.torch import load_file, save_file

from moequant.arch.registry import adapter_for
from moequant.budget import PLAN_FILE, Budget, parse_size, parse_widths, plan_model
from moequant.checkpoint.reader import CheckpointReader
from moequant.compression import CalibSettings, compress
from moequant.compression.plan import plan as recipe_specs
from moequant.errors import MoequantError
from moequant.recipe import load_recipe, parse_recipe
from tests.conftest import StopAfterLayers, add_tokenizer, make_family, make_mixtral

CALIB = CalibSettings(samples=8, seqlen=64, seed=0)
EXPERTS = ("expert",)


def stored_widths(out):
    modules = json.loads((out / "moequant.json").read_text())["modules"]
    return {n: m["bits"] for n, m in modules.items() if m["bits"] != 16}


def average_bits(arch, widths, kinds):
    infos = {i.name: i for layer in range(arch.config.num_layers) for i in arch.layer_linears(layer)}
    chosen = {n: b for n, b in widths.items() if n in infos and infos[n].kind in kinds}
    return sum(infos[n].numel * b for n, b in chosen.items()) / sum(infos[n].numel for n in chosen)


@pytest.fixture(scope="module")
def loud_expert(tmp_path_factory):
    """A tiny Mixtral whose expert 1 of layer 0 writes 30x louder into the residual stream."""
    path = make_mixtral(tmp_path_factory.mktemp("ckpt") / "loud", seed=3)
    add_tokenizer(path)
    file = path / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.block_sparse_moe.experts.1.w2.weight"] *= 30
    save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def unread_expert(tmp_path_factory):
    """A tiny Mixtral whose final norm reads only the first half of the hidden state, and whose expert 1 of the
    last layer writes 30x louder, into the second half only."""
    path = make_mixtral(tmp_path_factory.mktemp("ckpt") / "unread", seed=3)
    add_tokenizer(path)
    file = path / "model.safetensors"
    tensors = load_file(file)
    half = tensors["model.norm.weight"].shape[0] // 2
    tensors["model.norm.weight"][half:] = 0
    down = "model.layers.1.block_sparse_moe.experts.1.w2.weight"
    tensors[down] *= 30
    tensors[down][:half] = 0
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def test_errors_the_output_cannot_read_cost_nothing(unread_expert):
    plan = plan_model(unread_expert, Budget(bits=2.25, kinds=EXPERTS), calib=CALIB)
    arch = adapter_for(CheckpointReader(unread_expert).config)
    chosen = {n: s.bits for n, s in recipe_specs(arch, plan.recipe).items() if s is not None}
    assert chosen["model.layers.1.block_sparse_moe.experts.1.w2"] == 2, "its error never reaches the logits"
    line = next(x for x in plan.text.splitlines() if "layers.1.block_sparse_moe.experts.1.w2 " in x)
    assert all(float(part.split(": ")[1]) == 0 for part in line.split("  ") if part[:2] in ("2:", "3:", "4:"))


def test_bits_budget_met_and_replayed_by_compress(tmp_path, loud_expert):
    plan = plan_model(loud_expert, Budget(bits=2.25, kinds=EXPERTS), calib=CALIB)
    arch = adapter_for(CheckpointReader(loud_expert).config)
    chosen = {n: s.bits for n, s in recipe_specs(arch, plan.recipe).items() if s is not None}
    assert abs(average_bits(arch, chosen, EXPERTS) - 2.25) <= 0.01
    assert chosen["model.layers.0.block_sparse_moe.experts.1.w2"] == 4, "the loudest expert gets the most bits"
    assert all(b == 4 for n, b in chosen.items() if "self_attn" in n), "attention keeps the base recipe's bits"
    assert plan.summary["lower_bound"] <= plan.summary["cost"]

    file = tmp_path / "plan.yaml"
    file.write_text(plan.text)
    assert load_recipe(file) == plan.recipe
    out = compress(loud_expert, tmp_path / "out", recipe=file, calib=CALIB).path
    assert stored_widths(out) == chosen


def test_plans_are_deterministic_and_follow_measurement(tiny_mixtral_tok):
    first = plan_model(tiny_mixtral_tok, Budget(bits=2.5, kinds=EXPERTS), calib=CALIB)
    again = plan_model(tiny_mixtral_tok, Budget(bits=2.5, kinds=EXPERTS), calib=CALIB)
    assert first.text == again.text
    lines = [line for line in first.text.splitlines() if line.startswith("#   model.")]
    assert len(lines) == 2 * 4 * 3
    for line in lines:  # every module's measured cost falls with width
        costs = [float(part.split(": ")[1]) for part in line.split("  ") if part[:2] in ("2:", "3:", "4:")]
        assert costs == sorted(costs, reverse=True) and costs[-1] > 0


def test_compress_with_size_budget_stays_under_it(tmp_path, tiny_mixtral_tok):
    reference = compress(tiny_mixtral_tok, tmp_path / "a4e3", recipe="a4e3", calib=CALIB).path
    size = sum(f.stat().st_size for f in reference.iterdir())
    result = compress(tiny_mixtral_tok, tmp_path / "out", recipe="a4e3", calib=CALIB, budget=Budget(size=size))
    out = result.path
    total = sum(f.stat().st_size for f in out.iterdir())
    assert total <= size
    assert total >= 0.9 * size, "the budget is used, not left idle"
    record = json.loads((out / "moequant.json").read_text())
    assert record["plan"]["budget"] == {"size": size} and record["plan"]["bytes_at_most"] <= size
    assert parse_recipe((out / PLAN_FILE).read_text()) == load_recipe(out / "recipe.yaml")
    assert len(set(stored_widths(out).values())) > 1


def test_resume_replays_the_plan(tmp_path, tiny_mixtral_tok):
    budget = Budget(bits=3.0, kinds=EXPERTS)
    whole = compress(tiny_mixtral_tok, tmp_path / "whole", calib=CALIB, budget=budget).path
    stop = StopAfterLayers(1)
    with pytest.raises(MoequantError, match="stopped"):
        compress(tiny_mixtral_tok, tmp_path / "part", calib=CALIB, budget=budget, progress=stop)
    resumed = StopAfterLayers(99)
    out = compress(tiny_mixtral_tok, tmp_path / "part", calib=CALIB, budget=budget, resume=True,
                   progress=resumed).path
    assert any("replaying the plan" in n for n in resumed.notes)
    assert (out / PLAN_FILE).read_text() == (whole / PLAN_FILE).read_text()
    for shard in sorted(whole.glob("*.safetensors")):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_every_kind_planned_on_other_families(tmp_path, family):
    src = add_tokenizer(make_family(tmp_path / family, family))
    plan = plan_model(src, Budget(bits=3.0), calib=CALIB)
    arch = adapter_for(CheckpointReader(src).config)
    specs = recipe_specs(arch, plan.recipe)
    kinds = {i.kind for layer in range(arch.config.num_layers) for i in arch.layer_linears(layer)
             if specs[i.name] is not None}
    assert kinds == {"attention", "expert", "shared_expert", "dense_mlp"}
    chosen = {n: s.bits for n, s in specs.items() if s is not None}
    assert abs(average_bits(arch, chosen, kinds) - 3.0) <= 0.01
    out = compress(src, tmp_path / "out", recipe=plan.recipe, calib=CALIB).path
    assert stored_widths(out) == chosen


@pytest.mark.parametrize("budget, message", [
    (Budget(bits=1.5), "out of reach: .* average 2 to 4 bits"),
    (Budget(bits=4.5, choices=(2, 4)), "out of reach"),
    (Budget(size=10_000), r"--size 10,000 is out of reach: this output takes [\d,]+ to [\d,]+ bytes"),
])
def test_unreachable_budgets_are_refused_with_the_range(tiny_mixtral_tok, budget, message):
    with pytest.raises(MoequantError, match=message):
        plan_model(tiny_mixtral_tok, budget, calib=CALIB)


def test_compressed_tensors_refuses_three_bit_choices(tiny_mixtral_tok):
    with pytest.raises(MoequantError, match="drop 3 from --choices"):
        plan_model(tiny_mixtral_tok, Budget(bits=3.0), calib=CALIB, output_format="compressed-tensors")


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "give one budget"),
    (dict(bits=3.0, size=10), "give one budget"),
    (dict(bits=float("nan")), "--bits must be a positive number"),
    (dict(bits=3.0, choices=(2, 5)), "--choices must list"),
    (dict(bits=3.0, choices=(4,)), "--choices must list"),
    (dict(bits=3.0, kinds=("router",)), "--kinds takes"),
])
def test_bad_budgets(kwargs, message):
    with pytest.raises(MoequantError, match=message):
        Budget(**kwargs)


def test_sizes_and_widths_parse():
    assert parse_size("1234") == 1234
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("2 MiB") == 2 * 2**20
    for bad in ("12 parsecs", "-1GB", "GB"):
        with pytest.raises(MoequantError, match="is not a size"):
            parse_size(bad)
    assert parse_widths("4,2, 3") == (4, 2, 3)
    with pytest.raises(MoequantError, match="separated by commas"):
        parse_widths("2;3")


def test_a_plan_for_another_model_is_refused(tmp_path, tiny_mixtral_tok):
    recipe = parse_recipe("name: p\nrules:\n  - modules: [model.layers.9.self_attn.q_proj]\n    bits: 4\n")
    with pytest.raises(MoequantError, match="lists 1 module.* this model does not have.*planned for another model"):
        compress(tiny_mixtral_tok, tmp_path / "o", recipe=recipe, method="rtn")


def test_starved_and_unrouted_experts_are_measured(tmp_path):
    src = add_tokenizer(make_mixtral(tmp_path / "m", seed=5, num_local_experts=8))
    plan = plan_model(src, Budget(bits=2.5, kinds=EXPERTS), calib=CalibSettings(samples=1, seqlen=16))
    costs = [line for line in plan.text.splitlines() if line.startswith("#   model.")]
    assert len(costs) == 2 * 8 * 3
    assert all(" 2: 0.000e+00" not in line for line in costs), "every expert costs something at 2 bits"

