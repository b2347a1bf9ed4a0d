"""A config.json or tensors that do not describe the model get one line from every command that reads them."""

import shutil

import pytest
import torch

from moequant.calib import load_tokenizer
from moequant.errors import MoequantError
from tests.checkpoint.test_against_config import EMBED, NORM, edit_config, edit_tensors
from tests.cli.test_cli_errors import assert_one_line_error, run
from tests.conftest import add_tokenizer, make_mixtral

CASES = {
    "top-k above the experts": ({"num_experts_per_tok": 9}, {}, "num_experts_per_tok is 9, more than the 4 experts"),
    "top-k of 0": ({"num_experts_per_tok": 0}, {}, "field num_experts_per_tok is 0; it must be a positive integer"),
    "null size": ({"hidden_size": None}, {}, "field hidden_size is null; it must be a positive integer"),
    "fractional size": ({"intermediate_size": 2.5}, {}, "field intermediate_size is 2.5; it must be a positive"),
    "rope not a mapping": ({"rope_parameters": "x"}, {}, "field rope_parameters is 'x'; it must be a JSON object"),
    "no positions": ({"max_position_embeddings": 0}, {}, "field max_position_embeddings is 0"),
    "narrow norm": ({}, {NORM: torch.ones(64)}, f"tensor {NORM} has shape [64], but config.json implies [128]"),
    "narrow embedding": ({}, {EMBED: torch.ones(256, 64)}, f"tensor {EMBED} has shape [256, 64]"),
    "vocab_size off the rows": ({"vocab_size": 300}, {}, "dimension 0 (config.json field vocab_size)"),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return add_tokenizer(make_mixtral(tmp_path_factory.mktemp("cli-config") / "m", num_hidden_layers=1))


def broken_copy(source, path, config: dict, tensors: dict):
    shutil.copytree(source, path)
    edit_config(path, **config)
    if tensors:
        edit_tensors(path, **{name.replace(".", "__"): value for name, value in tensors.items()})
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_every_command_refuses_in_one_line(source, tmp_path, case):
    config, tensors, needle = CASES[case]
    broken = broken_copy(source, tmp_path / "broken", config, tensors)
    before = {p.name: p.read_bytes() for p in broken.iterdir()}
    commands = {
        "compress": ["compress", str(broken), "-o", str(tmp_path / "out"), "--samples", "2", "--seqlen", "16"],
        "inspect": ["inspect", str(broken)],
        "eval": ["eval", str(broken), "--seqlen", "16", "--max-windows", "1", "--device", "cpu"],
    }
    for name, args in commands.items():
        code, output = run(*args)
        assert_one_line_error(code, output, needle)
        assert len(output.strip().splitlines()) == 1, (name, output)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert {p.name: p.read_bytes() for p in broken.iterdir()} == before


def test_config_that_transformers_refuses_is_not_blamed_on_the_tokenizer(source, tmp_path):
    broken = broken_copy(source, tmp_path / "broken", {"rope_parameters": {"rope_type": "linear"}}, {})
    with pytest.raises(MoequantError, match=r"transformers refuses .*config\.json \(.*factor.*\), so it cannot load "
                                            r"the tokenizer beside it; fix config\.json"):
        load_tokenizer(broken)
    code, output = run("compress", str(broken), "-o", str(tmp_path / "out"), "--samples", "2", "--seqlen", "16")
    assert_one_line_error(code, output, "transformers refuses")
    assert "no usable tokenizer" not in output


def test_missing_tokenizer_is_still_named_as_such(source, tmp_path):
    bare = shutil.copytree(source, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(MoequantError, match="no usable tokenizer"):
        load_tokenizer(bare)
