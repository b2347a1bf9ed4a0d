"""Offloaded experts on a CUDA GPU: pinned host experts, copies on their own stream (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from moequant.kernels import dispatch
from moequant.loading import load
from moequant.nn.offload import total_stats
from tests.nn.test_offload import RECIPE, UNEVEN
from tests.test_loading import _compress

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(dispatch.interpreting(), reason="TRITON_INTERPRET is set: run tests/gpu on its own"),
]


@pytest.mark.parametrize("recipe", [RECIPE, UNEVEN])
def test_offloaded_experts_give_the_logits_of_the_loaded_model(tmp_path_factory, recipe):
    out = _compress(tmp_path_factory, "gpu-offload", recipe, num_local_experts=8)[1]
    full = load(out, device="cuda", dtype=torch.float16)
    offloaded = load(out, device="cuda", dtype=torch.float16, offload="experts", expert_slots=2)
    host = offloaded.model.layers[0].mlp.experts.cache.host
    assert all(t.is_pinned() for t in host.buffers())
    ids = torch.randint(0, 256, (1, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids).logits, full(input_ids=ids).logits, rtol=0, atol=0)
    assert torch.equal(offloaded.generate(ids[:, :8], max_new_tokens=16, do_sample=False),
                       full.generate(ids[:, :8], max_new_tokens=16, do_sample=False))
    assert total_stats(offloaded).prefetched > 0
