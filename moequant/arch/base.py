"""What every MoE family provides (:class:`Architecture`), and the values its layer forward works with."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

QUANTISABLE_KINDS = ("attention", "expert", "dense_mlp", "shared_expert")
"""The kinds of linear a recipe may quantise (with ``lm_head``); routers and embeddings stay 16-bit."""


@dataclass(frozen=True)
class LinearInfo:
    """One linear weight of the checkpoint.

    ``name`` is the module's on-disk name (the tensor is ``name + ".weight"``); ``kind`` is one
    of ``attention``, ``expert``, ``dense_mlp``, ``shared_expert``, ``router``, ``lm_head``,
    ``embedding``; ``role`` is the short name inside its block (``q``, ``k``, ``v``, ``o``; ``w1``
    gate, ``w3`` up, ``w2`` down of an MLP; ``gate`` and ``shared_gate`` of a router).
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
    """The numbers of a sparse-MoE decoder, normalised from either config style.

    ``intermediate_size`` is the routed experts' width. Optional parts: ``qk_norm`` (``head``: an
    RMSNorm over each head of q and k; ``proj``: over the whole q and k projections), q/k/v and o
    biases, ``clip_qkv``, ``dense_layers`` (layers with one dense MLP of ``dense_intermediate_size``
    instead of experts), a shared expert of ``shared_expert_size`` (with a sigmoid gate where
    ``shared_expert_gate``); ``rotary_dim``: the leading part of each head that rotary embeddings
    turn (0: all of it).
    """

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
    qk_norm: str | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    dense_layers: frozenset[int] = frozenset()
    dense_intermediate_size: int = 0
    shared_expert_size: int = 0
    shared_expert_gate: bool = False
    rotary_dim: int = 0


@dataclass(frozen=True)
class Chunking:
    """How a layer forward cuts its work to bound memory.

    ``windows``: windows per attention chunk; ``route_rows`` and ``expert_rows``: tokens per chunk
    when routing and when applying one expert (``None``: all at once).
    """

    windows: int
    route_rows: int | None = None
    expert_rows: int | None = None


class LayerObserver:
    """Watches one decoder layer's forward and may settle each linear's weights before it is applied.

    The forward calls :meth:`stage` as it enters attention, routing and the experts;
    :meth:`shared_input` once for each set of linears that read the same input (q/k/v, then o); and
    :meth:`experts` once per batch of experts, after :meth:`routed`. This base class changes
    nothing and never looks at inputs; an observer that replaces weights (calibration) sets
    ``settles_weights`` so that the forward keeps o_proj's inputs until o is settled and reads
    every expert, including those no token was routed to.
    """

    settles_weights = False

    def stage(self, name: str) -> None:
        """The forward enters ``attention``, ``routing`` or ``experts``."""

    def shared_input(self, names: list[str], weights: list[torch.Tensor],
                     inputs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """The weights to apply for linears ``names`` (``[N_i, K]`` each), which all read ``inputs``
        (chunks ``[..., K]``, produced only if iterated)."""
        return weights

    def routed(self, h: torch.Tensor, probs: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor) -> None:
        """The layer's routing: normed tokens ``h [T, H]``, router probabilities ``probs [T, E]``, the chosen
        ``top_ids [T, k]`` and their weights ``top_w [T, k]``."""

    def experts(self, experts: dict[int, ExpertWeights]) -> None:
        """Experts about to be applied, by index; may replace their weights in place."""


@dataclass
class ExpertWeights:
    """One gated-MLP expert: ``w1``/``w3`` ``[I, H]`` (gate, up) and ``w2`` ``[H, I]`` (down)."""

    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor


WeightGetter = Callable[[str], torch.Tensor]
"""``get(tensor_name)``: a float tensor of the model, in the dtype and on the device of the caller's choice."""


class Architecture(Protocol):
    """An MoE family: how its checkpoint is named, its config normalised, and one decoder layer computed.

    Compression, loading, evaluation and inspection are written against this interface.
    """

    family: str
    model_type: str
    """transformers' ``model_type`` of the family, whose classes load and check it."""
    architectures: tuple[str, ...]
    config: MoEConfig
    raw_config: Mapping
    extra_layers: int
    """Layers stored past ``num_hidden_layers`` that the model does not run (DeepSeek-V3's
    multi-token-prediction layers); they pass through 16-bit."""

    def layer_prefix(self, layer: int) -> str: ...

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` has routed experts (else one dense MLP)."""

    def layer_vectors(self, layer: int) -> dict[str, tuple[int, str]]:
        """Every 1-D tensor of the layer (norms, biases): its size and the config field behind it."""

    def size_fields(self) -> dict[str, str]:
        """The config.json field behind the number of experts and each MLP kind's width, for messages."""

    def sliding_window(self, layer: int) -> int | None:
        """The attention window of layer ``layer`` in tokens, or ``None``."""

    def attention_name(self, layer: int, role: str) -> str: ...

    def expert_name(self, layer: int, expert: int, role: str) -> str: ...

    def router_name(self, layer: int) -> str: ...

    def norm_names(self, layer: int) -> tuple[str, str]: ...

    def layer_linears(self, layer: int) -> list[LinearInfo]: ...

    def global_linears(self) -> list[LinearInfo]: ...

    layouts: tuple[str, ...]
    """The namings a checkpoint can be written in (``vllm``: the family's published names, the default;
    ``gptqmodel``: transformers' module names, as GPTQModel reads them)."""

    def canonical_views(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, TensorView]: ...

    def disk_name(self, name: str, layout: str) -> str: ...

    def canonical_name(self, name: str) -> str: ...

    @property
    def embed_name(self) -> str: ...

    @property
    def final_norm_name(self) -> str: ...

    @property
    def lm_head_name(self) -> str: ...

    def rotary(self, seqlen: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]: ...

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float | None = None) -> torch.Tensor: ...

    def read_layer(self, get: WeightGetter, layer: int):
        """Layer ``layer``'s weights but its routed experts, as :meth:`attention_block` takes them."""

    def attention_block(self, chunks: tuple[torch.Tensor, ...], layer: int, w, cos: torch.Tensor, sin: torch.Tensor,
                        obs: LayerObserver) -> None:
        """Add the attention's output to each chunk ``[b, T, H]`` of the residual, in place, with the weights of
        :meth:`read_layer`; ``obs`` is shown each linear's input first."""

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """An expert's (or dense MLP's) activation from the outputs of its gate and up projections."""

    def expert_mlp(self, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        """One expert (or dense MLP) applied to ``x [t, H]``: ``w2 gated(w1 x, w3 x)``; returns ``[t, H]``."""

    def layer_forward(self, x: torch.Tensor, layer: int, get: WeightGetter, cos: torch.Tensor, sin: torch.Tensor,
                      chunking: Chunking, expert_batch: int = 1,
                      observer: LayerObserver | None = None) -> torch.Tensor: ...
