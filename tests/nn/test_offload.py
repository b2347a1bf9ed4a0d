"""Offloaded experts: the whole mechanism on the CPU, the host standing in for the device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moequant.errors import MoequantError
from moequant.loading import load
from moequant.nn.offload import ExpertCache, OffloadedExperts, total_stats
from tests.test_loading import _compress

RECIPE = "name: t\nmethod: rtn\nrules:\n  - {kind: attention, bits: 4}\n  - {kind: expert, bits: 3}\n"
UNEVEN = ("name: u\nmethod: rtn\nrules:\n  - {match: '.*experts\\.[02]\\..*', bits: 2}\n"
          "  - {kind: expert, bits: 4}\n  - {kind: attention, bits: 8}\n")


class Host:
    """A stand-in for QuantExperts: expert e is the tensor [e], copied as such."""

    num_experts = 8

    def host_expert(self, e):
        return torch.tensor([float(e)])

    def expert_bytes(self, e):
        return 4

    def expert_to(self, unit, device, non_blocking=False):
        return unit.clone()

    def run_expert(self, unit, x):
        return x * unit


@pytest.fixture(scope="module", params=["stacked", "uneven"])
def compressed(request, tmp_path_factory):
    n_experts = 8
    return _compress(tmp_path_factory, f"offload-{request.param}", RECIPE if request.param == "stacked" else UNEVEN,
                     num_local_experts=n_experts)[1]


def test_lru_hits_misses_and_eviction_order():
    cache = ExpertCache(Host(), slots=2, device="cpu")
    for e in (0, 1, 0, 2, 1):
        cache.begin()
        cache.get(e)
    s = cache.stats
    assert (s.hits, s.misses, s.loaded) == (1, 4, 4)
    assert s.evicted == [1, 0]  # 1 was least recently used when 2 came; then 0 when 1 came back
    assert list(cache.entries) == [2, 1]


def test_experts_still_needed_are_not_evicted():
    cache = ExpertCache(Host(), slots=2, device="cpu")
    cache.begin()
    cache.get(0)
    cache.get(1)
    cache.get(2, keep={0, 2})
    assert 0 in cache.entries and cache.stats.evicted == [1]


def test_prefetch_follows_the_next_router_and_is_scored():
    first, second = OffloadedExperts(Host(), 2, "cpu"), OffloadedExperts(Host(), 2, "cpu")
    router = nn.Linear(4, 8, bias=False)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[5, 0] = router.weight[6, 1] = 1.0
    first.next_router = (router, second.cache, 2)
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    first(x, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    assert sorted(second.cache.entries) == [5, 6] and second.cache.stats.prefetched == 2
    second(x, torch.tensor([[5, 3]]), torch.tensor([[0.5, 0.5]]))
    s = second.cache.stats
    assert (s.prefetch_used, s.hits, s.misses) == (1, 1, 1)
    assert s.prefetch_accuracy == 0.5


def test_many_tokens_load_each_expert_once(compressed):
    model = load(compressed, device="cpu", backend="torch", offload="experts", expert_slots=2)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
    for layer in model.model.layers:
        s = layer.mlp.experts.cache.stats
        assert s.hits + s.misses == 8  # one lookup per expert, however many tokens it takes
        assert s.loaded - s.prefetched == s.misses  # and one copy per miss
        assert len(layer.mlp.experts.cache.entries) <= 2


def test_same_logits_and_tokens_as_the_model_on_the_device(compressed):
    full = load(compressed, device="cpu", backend="torch")
    offloaded = load(compressed, device="cpu", backend="torch", offload="experts", expert_slots=3)
    assert not any(isinstance(m, type(full.model.layers[0].mlp.experts)) for m in offloaded.modules())
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(full(input_ids=ids).logits, offloaded(input_ids=ids).logits)
    assert torch.equal(full.generate(ids[:, :6], max_new_tokens=12, do_sample=False),
                       offloaded.generate(ids[:, :6], max_new_tokens=12, do_sample=False))
    stats = total_stats(offloaded)
    assert stats.hits > 0 and stats.prefetched > 0 and stats.bytes > 0


def test_cache_sized_from_a_memory_budget(compressed):
    roomy = load(compressed, device="cpu", backend="torch", offload="experts", gpu_memory="1GiB")
    assert roomy.model.layers[0].mlp.experts.cache.slots == 8
    with pytest.raises(MoequantError, match="holds the weights outside the experts but no expert"):
        load(compressed, device="cpu", backend="torch", offload="experts", gpu_memory=1000)


@pytest.mark.parametrize("kwargs, message", [
    (dict(offload="weights"), "the one thing moequant offloads is 'experts'"),
    (dict(offload="experts"), "needs gpu_memory"),
    (dict(gpu_memory="1GiB"), "pass that too"),
    (dict(offload="experts", gpu_memory="lots"), "gpu_memory 'lots' is not a size"),
    (dict(offload="experts", expert_slots=0), "expert_slots must be"),
])
def test_bad_offload_settings(compressed, kwargs, message):
    with pytest.raises(MoequantError, match=message):
        load(compressed, device="cpu", backend="torch", **kwargs)


def test_eval_reports_the_cache_and_the_same_scores(compressed):
    from moequant.evals.run import evaluate

    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    plain = evaluate(compressed, windows=ids, engine="memory", device="cpu")
    offloaded = evaluate(compressed, windows=ids, engine="memory", device="cpu", expert_slots=2)
    assert offloaded["perplexity"] == plain["perplexity"]
    assert offloaded["expert_cache"]["slots"] == 2 and 0 <= offloaded["expert_cache"]["hit_rate"] <= 1
    assert "expert_cache" not in plain
    with pytest.raises(MoequantError, match="add --engine memory"):
        evaluate(compressed, windows=ids, device="cpu", expert_slots=2)
