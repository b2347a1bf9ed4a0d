import json

import pytest
import torch
from safetensors.torch import save_file

from moequant.checkpoint.reader import CheckpointReader, resolve_source
from moequant.errors import MoequantError
from tests.conftest import make_mixtral


def test_single_file_reads_lazily(tiny_mixtral):
    reader = CheckpointReader(tiny_mixtral)
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    assert reader.has(name)
    assert reader.shape(name) == (128, 256)
    assert reader.dtype(name) == torch.float32
    t = reader.get(name, dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16 and t.shape == (128, 256)


def test_sharded_checkpoint_matches_single(tmp_path, tiny_mixtral):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(tiny_mixtral)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded, single = CheckpointReader(tmp_path / "sharded"), CheckpointReader(tiny_mixtral)
    assert len(sharded.files()) > 1
    assert sorted(sharded.names) == sorted(single.names)
    for name in single.names[:5]:
        assert torch.equal(sharded.get(name), single.get(name))


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(MoequantError, match="no such folder"):
        resolve_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoequantError, match="has no config.json"):
        CheckpointReader(tmp_path / "empty")


def test_truncated_shard_is_named(tmp_path):
    path = make_mixtral(tmp_path / "m", num_hidden_layers=1)
    shard = path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(MoequantError, match=r"model\.safetensors is truncated or corrupt"):
        CheckpointReader(path)


def test_index_naming_missing_shard(tmp_path):
    path = make_mixtral(tmp_path / "m", num_hidden_layers=1)
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoequantError, match="names shard model-00002-of-00002.safetensors, which is missing"):
        CheckpointReader(path)


def test_nan_is_named(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    save_file({"a.weight": torch.tensor([1.0, float("nan")]), "b.weight": torch.tensor([float("inf")])},
              str(path / "model.safetensors"))
    reader = CheckpointReader(path)
    with pytest.raises(MoequantError, match="a.weight .* contains NaN"):
        reader.get("a.weight", check_finite=True)
    with pytest.raises(MoequantError, match="b.weight .* contains Inf"):
        reader.get("b.weight", check_finite=True)


def test_pickle_refused_unless_allowed(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    torch.save({"x.weight": torch.ones(2)}, path / "pytorch_model.bin")
    with pytest.raises(MoequantError, match="pickled weights .*--allow-pickle"):
        CheckpointReader(path)
    assert torch.equal(CheckpointReader(path, allow_pickle=True).get("x.weight"), torch.ones(2))


def test_offline_hub_id_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoequantError, match="when offline, pass a local checkpoint folder"):
        resolve_source("mistralai/Mixtral-8x7B-v0.1-not-cached")


def _fused_copy(source, path, **save):
    """``source`` saved as transformers keeps it in memory: experts fused, router at ``mlp.gate``."""
    from transformers import MixtralForCausalLM

    MixtralForCausalLM.from_pretrained(source).save_pretrained(path, save_original_format=False, **save)
    return path


@pytest.mark.parametrize("shard", [None, "300KB"])
def test_fused_experts_read_as_per_expert_weights(tmp_path, tiny_mixtral, shard):
    fused = _fused_copy(tiny_mixtral, tmp_path / "fused", **({"max_shard_size": shard} if shard else {}))
    raw = CheckpointReader(tmp_path / "fused")
    assert "model.layers.0.mlp.experts.gate_up_proj" not in raw.names
    single = CheckpointReader(tiny_mixtral)
    assert sorted(raw.names) == sorted(single.names)
    for name in single.names:
        assert raw.shape(name) == single.shape(name) and raw.dtype(name) == single.dtype(name), name
        assert torch.equal(raw.get(name), single.get(name)), name
    assert raw.numel("model.layers.1.block_sparse_moe.experts.3.w1.weight") == 256 * 128
    assert len(raw.files()) == (1 if shard is None else len(list(fused.glob("*.safetensors"))))


def test_fused_experts_from_pickled_weights(tmp_path, tiny_mixtral):
    _fused_copy(tiny_mixtral, tmp_path / "fused")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "fused" / "model.safetensors")
    (tmp_path / "fused" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "fused" / "pytorch_model.bin")
    pickled, single = CheckpointReader(tmp_path / "fused", allow_pickle=True), CheckpointReader(tiny_mixtral)
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    assert torch.equal(pickled.get(name), single.get(name))
    assert torch.equal(pickled.get("model.layers.1.block_sparse_moe.gate.weight"),
                       single.get("model.layers.1.block_sparse_moe.gate.weight"))


def test_fused_experts_of_the_wrong_shape_are_named(tmp_path, tiny_mixtral):
    from safetensors.torch import load_file

    fused = _fused_copy(tiny_mixtral, tmp_path / "fused")
    state = load_file(fused / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj"
    state[name] = state[name].transpose(1, 2).contiguous()
    save_file(state, fused / "model.safetensors")
    with pytest.raises(MoequantError, match=r"fused experts model\.layers\.1\.mlp\.experts\.down_proj have shape "
                                            r"\[4, 256, 128\]; config\.json implies \[4, 128, 256\]"):
        CheckpointReader(fused)
