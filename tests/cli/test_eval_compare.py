"""``moequant eval`` and ``moequant compare`` end to end, and their one-line errors."""

import json

import pytest
from typer.testing import CliRunner

from moequant.compression import compress
from moequant_cli.main import app
from tests.conftest import make_mixtral
from tests.evals.test_run import add_tokenizer

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, needle: str) -> None:
    assert code == 1, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert "Traceback" not in output
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], output


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-eval")
    original = make_mixtral(root / "orig", seed=4, max_position_embeddings=64)
    add_tokenizer(original)
    compressed = compress(original, root / "q3", method="rtn").path
    made = {}
    for name, seqlen in (("a", 32), ("b", 32), ("c", 16)):
        target = root / f"{name}.json"
        code, output = run("eval", compressed, "--baseline", original, "--seqlen", seqlen, "--max-windows", 2,
                           "--device", "cpu", "--output", target)
        assert code == 0, output
        made[name] = (target, output)
    return made


def test_eval_writes_report_markdown_and_summary(reports):
    target, output = reports["a"]
    report = json.loads(target.read_text())
    assert report["seqlen"] == 32 and report["windows"] == 2 and report["dataset"] == "builtin"
    assert target.with_suffix(".md").is_file()
    assert "perplexity" in output and "router agreement" in output and "KL" in output
    assert f"{report['perplexity']:.4f}" in output


def test_compare_same_data_prints_table(reports, tmp_path):
    plot = tmp_path / "ppl.png"
    code, output = run("compare", reports["a"][0], reports["b"][0], "--plot", plot)
    assert code == 0, output
    a = json.loads(reports["a"][0].read_text())
    rows = [line.split() for line in output.splitlines() if line.strip()]
    assert [r[0] for r in rows if r and r[0] in ("a", "b")] == ["a", "b"], "same model: rows named by report"
    assert "bits/w" in output and f"{a['perplexity']:.4f}" in output
    if plot.exists():
        assert plot.read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_other_windows_unless_forced(reports):
    code, output = run("compare", reports["a"][0], reports["c"][0])
    assert_one_line_error(code, output, "different data")
    code, output = run("compare", reports["a"][0], reports["c"][0], "--force")
    assert code == 0 and "warning" in output


def test_compare_refuses_edited_windows_hash(reports, tmp_path):
    edited = json.loads(reports["b"][0].read_text())
    edited["windows_hash"] = "0" * 64
    other = tmp_path / "edited.json"
    other.write_text(json.dumps(edited))
    code, output = run("compare", reports["a"][0], other)
    assert_one_line_error(code, output, "windows_hash")


def test_eval_errors_are_one_line(tmp_path, reports):
    code, output = run("eval", tmp_path / "missing", "--device", "cpu")
    assert_one_line_error(code, output, "no such folder")
    model = make_mixtral(tmp_path / "m")
    add_tokenizer(model)
    code, output = run("eval", model, "--dataset", "nonsense", "--device", "cpu")
    assert_one_line_error(code, output, "unknown dataset")
    code, output = run("compare", tmp_path / "nope.json", reports["a"][0])
    assert_one_line_error(code, output, "no such report")


def test_compare_on_a_wrongly_typed_report_is_one_line(reports, tmp_path):
    edited = json.loads(reports["b"][0].read_text())
    edited["size_bytes"] = "12 MB"
    other = tmp_path / "typed.json"
    other.write_text(json.dumps(edited))
    code, output = run("compare", reports["a"][0], other)
    assert_one_line_error(code, output, f"{other}: field size_bytes must be a whole number")


def test_compare_plot_creates_its_folder_and_wants_png(reports, tmp_path):
    plot = tmp_path / "new" / "deeper" / "ppl.png"
    code, output = run("compare", reports["a"][0], reports["b"][0], "--plot", plot)
    assert code == 0, output
    assert plot.parent.is_dir()
    code, output = run("compare", reports["a"][0], reports["b"][0], "--plot", tmp_path / "ppl.txt")
    assert_one_line_error(code, output, "should end in .png")


def test_eval_of_a_model_with_nan_weights_reports_no_nan(reports, tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_mixtral(tmp_path / "nan", seed=4, max_position_embeddings=64)
    add_tokenizer(model)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, output = run("eval", model, "--seqlen", 16, "--max-windows", 2, "--device", "cpu", "--output",
                       tmp_path / "r.json")
    assert code == 1 and "Traceback" not in output and "perplexity nan" not in output.lower()
    assert output.strip().splitlines()[-1].startswith("error: the model's logits are not finite"), output
    assert not (tmp_path / "r.json").exists()
