"""Shared fixtures: tiny Mixtral checkpoints written by transformers with the real on-disk names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moequant.errors import MoequantError
from moequant.progress import Progress

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton decides between compiled and interpreted kernels when a kernel module is imported,
    # so the interpreter must be on before any test module imports one.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
)


def make_mixtral(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write a random tiny ``MixtralForCausalLM`` to ``path`` with ``save_pretrained``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(**{**TINY, **overrides})
    model = MixtralForCausalLM(config).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return path


class StopAfterLayers(Progress):
    """Stops a run, as a kill would, once ``layers`` layers are written (leaving it resumable)."""

    def __init__(self, layers: int) -> None:
        self.layers = layers

    def advance(self, step: int, info: dict | None = None) -> None:
        if step + 1 == self.layers:
            raise MoequantError(f"stopped after {self.layers} layers; continue with --resume")


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    """A 2-layer, 4-expert, top-2, GQA Mixtral in float32 (shared, read-only)."""
    return make_mixtral(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral")


def add_tokenizer(path: Path, vocab_size: int = 256) -> Path:
    """Train a small byte-level BPE tokenizer on the bundled text and save it beside a checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moequant.builtin_data import builtin_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([builtin_text("train")[:200_000]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_mixtral_tok(tmp_path_factory) -> Path:
    """The tiny Mixtral with a tokenizer, so GPTQ calibration can run on it (shared, read-only)."""
    path = make_mixtral(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral-tok", seed=1)
    return add_tokenizer(path)
