"""Experts kept in host memory behind a per-layer cache on the device, loaded as the router asks for them.

Each MoE layer's :class:`~moequant.nn.quant_experts.QuantExperts` stays in (pinned) host memory;
:class:`OffloadedExperts` takes its place in the model and holds an :class:`ExpertCache` of at most
``slots`` of its experts on the device, least recently used evicted first. A forward first fetches
for the next MoE layer the experts that layer's router picks for the current hidden states
(speculative prefetch: the next layer's input is close to this one's), then computes the experts
its tokens were routed to one after another, loading each one the cache lacks once however many
tokens go to it, the next one's copy started before the current one computes.
On CUDA the copies run on their own stream and each expert's compute waits for its copy only;
on the CPU the host stands in for the device and copies are plain, so every decision (hits,
misses, eviction order, prefetches) runs and is tested without a GPU.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from moequant.nn.quant_experts import QuantExperts


@dataclass
class CacheStats:
    """What one cache did: lookups that ``hits`` or ``misses``, experts ``loaded`` and their ``bytes``, the
    ``evicted`` experts in order, and ``prefetched`` experts of which ``prefetch_used`` were then asked for."""

    hits: int = 0
    misses: int = 0
    loaded: int = 0
    bytes: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    evicted: list[int] = field(default_factory=list)

    def add(self, other: CacheStats) -> None:
        for name in ("hits", "misses", "loaded", "bytes", "prefetched", "prefetch_used"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.evicted += other.evicted

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def prefetch_accuracy(self) -> float:
        """The share of prefetched experts that the layer then used."""
        return self.prefetch_used / max(self.prefetched, 1)


class ExpertCache:
    """At most ``slots`` experts of one layer on ``device``, copied from ``host`` (a :class:`QuantExperts`)."""

    def __init__(self, host: QuantExperts, slots: int, device: torch.device) -> None:
        self.host, self.slots, self.device = host, slots, torch.device(device)
        self.entries: OrderedDict[int, tuple[object, torch.cuda.Event | None]] = OrderedDict()  # oldest first
        self.pending: set[int] = set()  # prefetched and not asked for yet
        self.resident: set[int] = set()  # on the device when the current forward began
        self.stats = CacheStats()
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def begin(self) -> None:
        """A forward starts: the experts on the device now are the ones its lookups hit."""
        self.resident = set(self.entries)

    def get(self, expert: int, keep: set[int] = frozenset()) -> object:
        """Expert ``expert`` on the device, loaded (evicting the least recently used not in ``keep``) if absent;
        a hit if it has been there since the forward began."""
        if expert in self.resident:
            self.stats.hits += 1
            if expert in self.pending:
                self.stats.prefetch_used += 1
        else:
            self.stats.misses += 1
        self.pending.discard(expert)
        if expert in self.entries:
            self.entries.move_to_end(expert)
        else:
            self._load(expert, keep)
        unit, ready = self.entries[expert]
        if ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            for t in self.host.expert_tensors(unit):  # copied on the copy stream, read on this one
                t.record_stream(compute)
        return unit

    def fetch(self, experts: list[int], keep: set[int] = frozenset(), prefetch: bool = False) -> None:
        """Start loading the absent ``experts`` (``prefetch``: a guess, counted as such)."""
        for e in experts[: self.slots]:
            if e not in self.entries:
                self._load(e, keep | set(experts))
                if prefetch:
                    self.pending.add(e)
                    self.stats.prefetched += 1

    def _load(self, expert: int, keep: set[int]) -> None:
        while len(self.entries) >= self.slots:
            victim = next((e for e in self.entries if e not in keep), next(iter(self.entries)))
            del self.entries[victim]
            self.pending.discard(victim)
            self.resident.discard(victim)
            self.stats.evicted.append(victim)
        unit = self.host.host_expert(expert)
        self.stats.loaded += 1
        self.stats.bytes += self.host.expert_bytes(expert)
        if self.stream is None:
            self.entries[expert] = (self.host.expert_to(unit, self.device), None)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copied = self.host.expert_to(unit, self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.entries[expert] = (copied, ready)


class OffloadedExperts(nn.Module):
    """A layer's experts from host memory through an :class:`ExpertCache`; the same call as :class:`QuantExperts`.

    ``next_router`` (set by :func:`chain`) is the next MoE layer's router and cache, for the prefetch.
    """

    def __init__(self, host: QuantExperts, slots: int, device: torch.device) -> None:
        super().__init__()
        self.cache = ExpertCache(host, slots, device)
        self.num_experts = host.num_experts
        self.next_router: tuple[nn.Module, ExpertCache, int] | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """``sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(x_t)``: ``[T, H]`` in the input dtype."""
        top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        needed = [e for e, n in enumerate(counts) if n]
        keep = set(needed)
        self.cache.begin()
        self._prefetch_next(hidden_states)
        out = torch.zeros_like(hidden_states)
        flat_weights = top_k_weights.reshape(-1)
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        for i, e in enumerate(needed):
            slots = order[starts[e]:starts[e + 1]]
            tokens = slots // top_k
            unit = self.cache.get(e, keep)
            self.cache.fetch(needed[i + 1:i + 2], keep)  # the next expert's copy runs while this one computes
            y = self.cache.host.run_expert(unit, hidden_states[tokens]) * flat_weights[slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
            keep.discard(e)
        return out

    def _prefetch_next(self, hidden_states: torch.Tensor) -> None:
        if self.next_router is None:
            return
        router, cache, top_k = self.next_router
        with torch.no_grad():
            logits = nn.functional.linear(hidden_states[-1:], router.weight.to(hidden_states.dtype))
        guess = torch.topk(logits.float(), top_k, dim=-1).indices.unique().tolist()
        cache.fetch(guess, set(guess), prefetch=True)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, cache slots={self.cache.slots} on {self.cache.device}"


def chain(layers: list[tuple[OffloadedExperts, nn.Module]], top_k: int) -> None:
    """Give each offloaded layer the next one's router and cache, in model order (``(experts, router)``)."""
    for (experts, _), (following, router) in itertools.pairwise(layers):
        experts.next_router = (router, following.cache, top_k)


def total_stats(model: nn.Module) -> CacheStats | None:
    """The caches' statistics of every offloaded layer of ``model`` added up (None: nothing offloaded)."""
    caches = [m.cache.stats for m in model.modules() if isinstance(m, OffloadedExperts)]
    if not caches:
        return None
    total = CacheStats()
    for s in caches:
        total.add(s)
    return total


def offload_experts(model: nn.Module, device: torch.device, slots: int, top_k: int) -> list[OffloadedExperts]:
    """Move ``model`` (built on the host) to ``device`` but its :class:`QuantExperts`, which stay on the host
    (pinned where ``device`` is CUDA) behind caches of ``slots`` experts per layer."""
    layers = []
    for layer in model.model.layers:
        host = getattr(layer.mlp, "experts", None)
        if isinstance(host, QuantExperts):
            if device.type == "cuda":
                host._apply(lambda t: t.pin_memory())
            layer.mlp.experts = OffloadedExperts(host, min(slots, host.num_experts), device)
            layers.append((layer.mlp.experts, layer.mlp.gate))
    chain(layers, top_k)
    model.to(device)
    return [experts for experts, _ in layers]


def slots_for(model: nn.Module, budget: int) -> int:
    """How many experts per layer fit ``budget`` bytes of device memory beside the model's other weights (a
    model still holding its :class:`QuantExperts`)."""
    moe = [m for m in model.modules() if isinstance(m, QuantExperts)]
    inside = {id(t) for m in moe for t in [*m.parameters(), *m.buffers()]}
    rest = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in inside)
    widest = max((m.expert_bytes(e) for m in moe for e in range(m.num_experts)), default=1)
    return max(0, (budget - rest) // max(len(moe) * widest, 1))


def reset_stats(model: nn.Module) -> None:
    """Start every offloaded layer's statistics afresh (after a warm-up, say)."""
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            m.cache.stats = CacheStats()
