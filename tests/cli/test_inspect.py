"""``moequant inspect`` checks what it reports against the tensors, and refuses malformed records."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moequant.compression import compress
from moequant.errors import MoequantError
from moequant.inspection import describe
from moequant_cli.main import app

runner = CliRunner()
EXPERT = "model.layers.1.block_sparse_moe.experts.2.w2"


def run(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_mixtral):
    """The tiny Mixtral with the default recipe by RTN: 4-bit attention, 3-bit experts (the config's default)."""
    return compress(tiny_mixtral, tmp_path_factory.mktemp("inspect") / "q", method="rtn").path


def _copy(compressed, tmp_path):
    return shutil.copytree(compressed, tmp_path / "copy")


def _edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _drop_module(folder, module: str) -> None:
    """Remove every tensor of ``module`` from its shard and from the index."""
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = folder / index["weight_map"][module + ".qweight"]
    tensors = {k: v for k, v in load_file(str(shard)).items() if not k.startswith(module + ".")}
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(module + ".")}
    index_file.write_text(json.dumps(index))


def test_a_healthy_checkpoint_has_no_problems(compressed):
    code, output = run("inspect", compressed)
    assert code == 0, output
    assert "problem" not in output
    info = describe(compressed)
    assert info["problems"] == [] and info["loadable"]


def test_bits_in_the_config_other_than_the_tensors_hold(compressed, tmp_path):
    folder = _copy(compressed, tmp_path)
    _edit_json(folder / "config.json", lambda c: c["quantization_config"].update(bits=4))
    info = describe(folder)
    assert not info["loadable"]
    assert f"{EXPERT}.qweight has 24 rows, 3-bit codes for 256 inputs; quantization_config says 4-bit" \
        in info["problems"]
    assert len(info["problems"]) == 24  # every expert module takes the default bits
    code, output = run("inspect", folder)
    assert code == 1 and "Traceback" not in output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error:") and "does not load as it is" in last and "23 more problems above" in last
    assert output.count("problem:") == 20  # the first in the error line, 19 listed, then a count of the rest


def test_a_quantised_module_with_its_tensors_removed(compressed, tmp_path):
    folder = _copy(compressed, tmp_path)
    _drop_module(folder, EXPERT)
    info = describe(folder)
    assert info["problems"] == [f"{EXPERT} has no tensors (quantization_config says 3-bit)"]
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 1 and result.stderr.startswith("error:")
    assert json.loads(result.stdout)["loadable"] is False


def test_group_size_in_the_config_other_than_the_scales(compressed, tmp_path):
    folder = _copy(compressed, tmp_path)
    _edit_json(folder / "config.json", lambda c: c["quantization_config"].update(group_size=32))
    problems = describe(folder)["problems"]
    assert f"{EXPERT}.scales has 2 groups, quantization_config's group_size 32 gives 8 for 256 inputs" in problems


def test_nan_scales_are_a_problem(compressed, tmp_path):
    folder = _copy(compressed, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][EXPERT + ".scales"]
    tensors = load_file(str(shard))
    tensors[EXPERT + ".scales"][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    problems = describe(folder)["problems"]
    assert len(problems) == 1 and f"tensor {EXPERT}.scales" in problems[0] and "NaN" in problems[0]


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('{"recipe": "a4e3"}', "recipe must be a JSON object, got str"),
    ('{"recipe": {"name": 3}}', "recipe.name must be a string, got int"),
    ('{"starved_experts": 5}', "starved_experts must be a list, got int"),
    ('{"moequant_version": []}', "moequant_version must be a string, got list"),
])
def test_a_malformed_record_is_one_line(compressed, tmp_path, content, message):
    folder = _copy(compressed, tmp_path)
    (folder / "moequant.json").write_text(content)
    with pytest.raises(MoequantError, match=message):
        describe(folder)
    code, output = run("inspect", folder)
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and "moequant.json" in lines[0], output


def test_inspect_on_an_expert_less_checkpoint_exits_non_zero(compressed, tmp_path):
    folder = _copy(compressed, tmp_path)
    for layer in range(2):
        for expert in range(4):
            for role in ("w1", "w2", "w3"):
                _drop_module(folder, f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{role}")
    code, output = run("inspect", folder)
    assert code == 1 and "has no tensors" in output
