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


FAMILY_TINY = {
    "qwen3_moe": dict(vocab_size=256, hidden_size=128, intermediate_size=160, moe_intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      num_experts=6, num_experts_per_tok=2, max_position_embeddings=256, mlp_only_layers=[1],
                      norm_topk_prob=True),
    "qwen2_moe": dict(vocab_size=256, hidden_size=128, intermediate_size=160, moe_intermediate_size=64,
                      shared_expert_intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, max_position_embeddings=256,
                      decoder_sparse_step=2),
    "deepseek_v3": dict(vocab_size=256, hidden_size=128, intermediate_size=160, moe_intermediate_size=64,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                        n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                        n_shared_experts=1, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                        qk_rope_head_dim=32, v_head_dim=32, routed_scaling_factor=2.5, max_position_embeddings=256),
    "glm4_moe": dict(vocab_size=256, hidden_size=128, intermediate_size=160, moe_intermediate_size=64,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                     n_shared_experts=1, routed_scaling_factor=1.5, max_position_embeddings=256, use_qk_norm=True),
    "olmoe": dict(vocab_size=256, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                  clip_qkv=0.5),
}


def make_family(path: Path, family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write a random tiny model of ``family`` (a transformers ``model_type``) with ``save_pretrained``."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = CONFIG_MAPPING[family](**{**FAMILY_TINY[family], **overrides})
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # random norms, so that a norm read from the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


class StopAfterLayers(Progress):
    """Stops a run, as a kill would, once ``layers`` layers are written (leaving it resumable); a plan's
    measuring pass before them runs through."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.notes: list[str] = []
        self.writing = True

    def begin(self, total: int, title: str) -> None:
        self.writing = title.startswith("compressing")

    def note(self, text: str) -> None:
        self.notes.append(text)

    def advance(self, step: int, info: dict | None = None) -> None:
        if self.writing and step + 1 == self.layers:
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
