"""The checkpoint's tensors are checked against config.json before any work, naming tensor and field."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moequant.arch.registry import adapter_for
from moequant.checkpoint.against_config import check_tensors
from moequant.checkpoint.reader import CheckpointReader
from moequant.compression import compress
from moequant.errors import MoequantError
from tests.conftest import make_mixtral

NORM = "model.layers.0.input_layernorm.weight"
EMBED = "model.embed_tokens.weight"
Q = "model.layers.0.self_attn.q_proj.weight"


def check(path) -> None:
    reader = CheckpointReader(path)
    check_tensors(reader, adapter_for(reader.config))


def edit_tensors(path, **changes) -> None:
    """Replace (tensor) or drop (None) tensors of the single-file checkpoint at ``path``."""
    state = load_file(path / "model.safetensors")
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del state[name]
        else:
            state[name] = value
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def edit_config(path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


@pytest.fixture
def model(tmp_path):
    return make_mixtral(tmp_path / "m", num_hidden_layers=1)


def dotted(name: str) -> str:
    return name.replace(".", "__")


def test_a_consistent_checkpoint_passes_original_and_compressed(model, tmp_path):
    check(model)
    check(compress(model, tmp_path / "q", method="rtn").path)


@pytest.mark.parametrize("name,value,needle", [
    (NORM, torch.ones(64), r"has shape \[64\], but config.json implies \[128\]: 128 for dimension 0 "
                           r"\(config.json field hidden_size\)"),
    (NORM, torch.ones(0), r"has shape \[0\], but config.json implies \[128\]"),
    (NORM, torch.ones(1, 128), r"has shape \[1, 128\], but config.json implies \[128\]: 1 dimensions"),
    (EMBED, torch.ones(256, 64), r"has shape \[256, 64\], but config.json implies \[256, 128\]: 128 for dimension 1 "
                                 r"\(config.json field hidden_size\)"),
    (Q, torch.ones(64, 128), r"dimension 0 \(config.json field num_attention_heads x head_dim\)"),
    ("model.norm.weight", torch.ones(96), r"model\.norm\.weight has shape \[96\]"),
    (NORM, torch.ones(128, dtype=torch.int32), r"is int32; weights must be floating-point"),
    (Q, torch.ones(128, 128, dtype=torch.bool), r"is bool; weights must be floating-point"),
    ("model.layers.0.block_sparse_moe.experts.1.w2.weight", None,
     r"experts\.1\.w2\.weight is missing from the checkpoint"),
    ("lm_head.weight", None, r"lm_head\.weight is missing"),
])
def test_tensor_that_does_not_fit_the_config_is_named(model, name, value, needle):
    edit_tensors(model, **{dotted(name): value})
    with pytest.raises(MoequantError, match=needle) as info:
        check(model)
    assert name in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("vocab_size", [200, 300])
def test_vocab_size_must_equal_the_embedding_rows(model, vocab_size):
    # transformers' from_pretrained refuses both directions (a size mismatch of embed_tokens and
    # lm_head) unless told to ignore mismatched sizes; a padded vocabulary pads vocab_size with the
    # rows, and only the tokenizer has fewer tokens.
    edit_config(model, vocab_size=vocab_size)
    with pytest.raises(MoequantError, match=rf"tensor {EMBED} has shape \[256, 128\], but config.json implies "
                                            rf"\[{vocab_size}, 128\]: {vocab_size} for dimension 0 \(config.json "
                                            r"field vocab_size\)"):
        check(model)


def test_layers_past_num_hidden_layers_are_refused(tmp_path):
    model = make_mixtral(tmp_path / "m", num_hidden_layers=3)
    edit_config(model, num_hidden_layers=1)
    with pytest.raises(MoequantError, match=r"tensor model\.layers\.1\.\S+ belongs to layer 1, but config.json field "
                                            r"num_hidden_layers is 1 \(layers 0-0\)"):
        check(model)


def test_tied_embeddings_need_no_lm_head(model):
    edit_tensors(model, lm_head__weight=None)
    edit_config(model, tie_word_embeddings=True)
    check(model)


def test_compress_refuses_before_writing(model, tmp_path):
    edit_tensors(model, **{dotted(NORM): torch.ones(0)})
    with pytest.raises(MoequantError, match=NORM):
        compress(model, tmp_path / "out", method="rtn")
    assert not any(tmp_path.glob("*out*"))
