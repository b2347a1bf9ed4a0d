import json

import pytest
import torch
from transformers import MixtralForCausalLM

from moequant.arch.base import Chunking, LayerObserver
from moequant.arch.mixtral import MixtralAdapter, parse_mixtral_config
from moequant.arch.registry import adapter_for
from moequant.checkpoint.reader import CheckpointReader
from moequant.errors import MoequantError
from tests.conftest import make_mixtral


class Settling(LayerObserver):
    """Takes the path compression takes (o_proj's inputs kept, every expert read), changing no weight,
    and counts what it was shown."""

    settles_weights = True

    def __init__(self) -> None:
        self.shared: list[list[str]] = []
        self.experts_seen: list[int] = []

    def shared_input(self, names, weights, inputs):
        assert all(x.shape[-1] == weights[0].shape[1] for x in inputs)
        self.shared.append(names)
        return weights

    def experts(self, experts):
        self.experts_seen += list(experts)


def explicit_logits(path, ids: torch.Tensor, observer: LayerObserver | None = None) -> torch.Tensor:
    reader = CheckpointReader(path)
    adapter = adapter_for(reader.config)
    get = lambda name: reader.get(name, dtype=torch.float32)  # noqa: E731
    x = get(adapter.embed_name)[ids]
    cos, sin = adapter.rotary(ids.shape[1])
    for layer in range(adapter.config.num_layers):
        adapter.layer_forward(x, layer, get, cos, sin, Chunking(windows=1, route_rows=7, expert_rows=5),
                              expert_batch=3, observer=observer)
    x = adapter.norm(x, get(adapter.final_norm_name))
    return x @ get(adapter.lm_head_name).T


def hf_logits(path, ids):
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 8}, {"num_key_value_heads": 4, "num_experts_per_tok": 1}])
def test_explicit_forward_matches_transformers(tmp_path, overrides):
    path = make_mixtral(tmp_path / "m", seed=3, **overrides)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = explicit_logits(path, ids)
    ref = hf_logits(path, ids)
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-5


def test_forward_compression_takes_matches_transformers(tmp_path):
    path = make_mixtral(tmp_path / "m", seed=4, num_hidden_layers=2)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    observer = Settling()
    ours = explicit_logits(path, ids, observer)
    ref = hf_logits(path, ids)
    assert (ours - ref).norm() / ref.norm() < 1e-5
    assert torch.equal(ours, explicit_logits(path, ids))
    attn = [[f"model.layers.{i}.self_attn.{r}_proj" for r in roles] for i in range(2) for roles in ("qkv", "o")]
    assert observer.shared == attn
    assert observer.experts_seen == list(range(4)) * 2


def test_both_config_styles_parse_the_same(tiny_mixtral):
    raw = json.loads((tiny_mixtral / "config.json").read_text())
    assert "rope_parameters" in raw
    old_style = {k: v for k, v in raw.items() if k != "rope_parameters"}
    old_style["rope_theta"] = raw["rope_parameters"]["rope_theta"]
    assert parse_mixtral_config(old_style) == parse_mixtral_config(raw)
    old_style["rope_theta"] = 12345.0
    assert parse_mixtral_config(old_style).rope_theta == 12345.0


def test_layer_linears_cover_checkpoint(tiny_mixtral):
    reader = CheckpointReader(tiny_mixtral)
    adapter = MixtralAdapter(reader.config)
    for info in adapter.layer_linears(1):
        assert reader.shape(info.weight) == (info.out_features, info.in_features)
    assert sum(i.kind == "expert" for i in adapter.layer_linears(0)) == 3 * 4


def test_dense_model_refused():
    with pytest.raises(MoequantError, match="dense"):
        adapter_for({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8})
