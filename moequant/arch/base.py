"""What an architecture adapter provides: names, shapes and the maths of one decoder layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class LinearInfo:
    """One linear weight of the checkpoint.

    ``name`` is the module's on-disk name (the tensor is ``name + ".weight"``); ``kind`` is one
    of ``attention``, ``expert``, ``router``, ``lm_head``, ``embedding``; ``role`` is the short
    name inside its block (``q``, ``k``, ``v``, ``o``, ``w1``, ``w2``, ``w3``, ``gate``, ...).
    """

    name: str
    kind: str
    role: str
    out_features: int
    in_features: int
    layer: int | None = None
    expert: int | None = None

    @property
    def weight(self) -> str:
        return self.name + ".weight"

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class TensorView:
    """A tensor read as a contiguous part of another: ``shape`` from element ``offset`` of ``source``."""

    source: str
    offset: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class MoEConfig:
    """The numbers of a sparse-MoE decoder, normalised from either config style."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    rope_theta: float
    rope_type: str
    tie_word_embeddings: bool
    norm_topk_prob: bool = True


class Adapter(Protocol):
    """An MoE family: how its checkpoint is named and how one decoder layer computes."""

    config: MoEConfig
    raw_config: dict

    def layer_prefix(self, layer: int) -> str: ...

    def layer_linears(self, layer: int) -> list[LinearInfo]: ...

    def global_linears(self) -> list[LinearInfo]: ...

    def rotary(self, seqlen: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]: ...
