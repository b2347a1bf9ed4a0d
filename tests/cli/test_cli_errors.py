"""Bad input gets one line, exit status 1 and no traceback."""

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from moequant_cli.main import app
from tests.conftest import make_mixtral

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, needle: str) -> None:
    assert code == 1, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert "Traceback" not in output
    assert lines[-1].startswith("error:") and needle in " ".join(lines), output


def test_missing_folder(tmp_path):
    code, output = run("compress", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, output, "no such folder")


def test_folder_without_config(tmp_path):
    code, output = run("compress", str(tmp_path), "-o", str(tmp_path.parent / "out-x"))
    assert_one_line_error(code, output, "has no config.json")


def test_bad_recipe_and_device(tmp_path, tiny_mixtral):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nrules:\n  - match: '.*'\n    bits: 5\n")
    code, output = run("compress", str(tiny_mixtral), "-o", str(tmp_path / "o"), "--recipe", str(bad))
    assert_one_line_error(code, output, "bits")
    code, output = run("compress", str(tiny_mixtral), "-o", str(tmp_path / "o"), "--recipe", "nope")
    assert_one_line_error(code, output, "unknown recipe")
    if not __import__("torch").cuda.is_available():
        code, output = run("compress", str(tiny_mixtral), "-o", str(tmp_path / "o"), "--device", "cuda",
                           "--method", "rtn")
        assert_one_line_error(code, output, "no CUDA device")


def test_existing_output_and_output_in_source(tmp_path, tiny_mixtral):
    (tmp_path / "o").mkdir()
    code, output = run("compress", str(tiny_mixtral), "-o", str(tmp_path / "o"), "--method", "rtn")
    assert_one_line_error(code, output, "--overwrite")
    code, output = run("compress", str(tiny_mixtral), "-o", str(tiny_mixtral / "o"), "--method", "rtn")
    assert_one_line_error(code, output, "inside the source")


def test_inspect_and_recipes(tmp_path, tiny_mixtral):
    code, output = run("compress", str(tiny_mixtral), "-o", str(tmp_path / "o"), "--method", "rtn")
    assert code == 0, output
    assert "bits per weight" in output
    assert "other engines: 3-bit experts (layers 0-1) run on moequant's kernels only" in " ".join(output.split())
    code, output = run("inspect", str(tmp_path / "o"), "--json")
    assert code == 0
    import json

    info = json.loads(output)
    assert info["compressed"] and info["groups"]["expert"]["bits"] == {"3": 24}
    assert info["groups"]["attention"]["bits"] == {"4": 8}
    assert [n.split(" (")[0] for n in info["engine_limits"]] == ["3-bit experts"]
    code, output = run("inspect", str(tiny_mixtral), "--json")
    assert not json.loads(output)["compressed"]
    code, output = run("recipes")
    assert code == 0 and "a4e3" in output and "a8e4" in output


def test_real_process_exit_status_and_debug_variable(tmp_path):
    src = make_mixtral(tmp_path / "m", num_hidden_layers=1)
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    cmd = [sys.executable, "-m", "moequant_cli.main", "compress", str(src), "-o", str(tmp_path / "o")]
    env = {k: v for k, v in os.environ.items() if k != "MOEQUANT_DEBUG"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "model.safetensors is truncated or corrupt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "MOEQUANT_DEBUG": "1"}, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, tmp_path, tiny_mixtral):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("moequant_cli.compress.run_compress", interrupted)
    code, output = run("compress", str(tiny_mixtral), "-o", str(tmp_path / "o"))
    assert code == 130, output
    assert output.strip() == "interrupted (an interrupted compress continues with --resume)"


@pytest.mark.parametrize("args", [["compress", "--help"], ["inspect", "--help"]])
def test_help(args):
    code, output = run(*args)
    assert code == 0 and "Usage" in output


NUMERIC = [
    (["compress", "{model}", "-o", "{out}", "--expert-batch", "-2"], "--expert-batch must be at least 0"),
    (["compress", "{model}", "-o", "{out}", "--samples", "0"], "--samples must be at least 1"),
    (["compress", "{model}", "-o", "{out}", "--seqlen", "0"], "--seqlen must be at least 1"),
    (["compress", "{model}", "-o", "{out}", "--seed", "-1"], "--seed must be from 0 to"),
    (["eval", "{model}", "--batch", "-3"], "--batch must be at least 0"),
    (["eval", "{model}", "--max-windows", "0"], "--max-windows must be at least 1"),
    (["eval", "{model}", "--seqlen", "1"], "--seqlen must be at least 2"),
    (["generate", "{model}", "-p", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "{model}", "-p", "x", "--temperature", "nan"], "--temperature must be a finite number"),
    (["generate", "{model}", "-p", "x", "--seed", "-5"], "--seed must be from 0 to"),
]


@pytest.mark.parametrize("args, message", NUMERIC, ids=[f"{a[0]} {a[-2]} {a[-1]}" for a, _ in NUMERIC])
def test_numeric_options_are_checked_before_any_work(tmp_path, tiny_mixtral_tok, args, message):
    out = tmp_path / "out"
    code, output = run(*(a.format(model=tiny_mixtral_tok, out=out) for a in args))
    assert_one_line_error(code, output, message)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, calib, message", [
    ({"expert_batch": -2}, {}, "--expert-batch must be at least 0"),
    ({"expert_batch": 1.5}, {}, "--expert-batch must be a whole number"),
    ({}, {"samples": -1}, "--samples must be at least 1"),
    ({}, {"seed": True}, "--seed must be a whole number"),
])
def test_library_compress_checks_numbers_like_the_command(tmp_path, tiny_mixtral_tok, kwargs, calib, message):
    from moequant.compression import CalibSettings, compress
    from moequant.errors import MoequantError

    with pytest.raises(MoequantError, match=message) as info:
        compress(tiny_mixtral_tok, tmp_path / "o", calib=CalibSettings(**calib), **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_huge_samples_refused_with_the_maximum_before_any_layer(tmp_path, tiny_mixtral_tok):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    code, output = run("compress", str(tiny_mixtral_tok), "-o", str(tmp_path / "o"), "--calib", str(text),
                       "--samples", "100000000", "--seqlen", "64")
    assert_one_line_error(code, output, "distinct windows of 64 tokens")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, needle", [
    (("--format", "awq"), "unknown format 'awq'"),
    (("--layout", "sglang"), "unknown layout 'sglang'"),
    (("--format", "compressed-tensors", "--recipe", "a4e3"), "3-bit codes"),
])
def test_bad_output_form(tmp_path, tiny_mixtral, args, needle):
    code, output = run("compress", str(tiny_mixtral), "-o", str(tmp_path / "out"), "--method", "rtn", *args)
    assert_one_line_error(code, output, needle)
    assert not (tmp_path / "out").exists()


def test_output_form_on_the_command_line(tmp_path, tiny_mixtral):
    out = tmp_path / "out"
    code, output = run("compress", str(tiny_mixtral), "-o", str(out), "--method", "rtn", "--recipe", "a4e4",
                       "--format", "compressed-tensors")
    assert code == 0, output
    code, output = run("inspect", str(out))
    assert code == 0 and "stored as compressed-tensors, vllm layout" in " ".join(output.split()), output
