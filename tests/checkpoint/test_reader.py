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


@pytest.mark.parametrize("error, reason", [(RuntimeError(), "RuntimeError"),
                                           (RuntimeError("\n  unpickling stopped\nmore"), "unpickling stopped")])
def test_unreadable_pickle_names_its_first_non_empty_reason(tmp_path, monkeypatch, error, reason):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    torch.save({"x.weight": torch.ones(2)}, path / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(MoequantError) as info:
        CheckpointReader(path, allow_pickle=True)
    assert str(info.value) == f"cannot read pytorch_model.bin: {reason}"


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


def write_raw_safetensors(path, header: dict, data: bytes) -> None:
    """A safetensors file from a header written by hand, so its entries can be anything."""
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def bare_folder(path):
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("offsets,needle", [
    ([[0, 8], [4, 12]], "the bytes of b overlaps a"),
    ([[0, 8], [0, 8]], "the bytes of b overlaps a"),
    ([[4, 12], [12, 20]], "the bytes of a leaves a gap after the header"),
    ([[0, 8], [12, 20]], "the bytes of b leaves a gap after a"),
])
def test_entries_must_tile_the_data(tmp_path, offsets, needle):
    path = bare_folder(tmp_path / "m")
    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": off} for name, off in zip("ab", offsets, strict=True)}
    write_raw_safetensors(path / "model.safetensors", header, bytes(max(o[1] for o in offsets)))
    with pytest.raises(MoequantError, match=f"shard model.safetensors is corrupt: {needle}"):
        CheckpointReader(path)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]},
    {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": [True, 8]},
    {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
    {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": {"0": 8}},
    [0, 8],
])
def test_malformed_entries_are_named(tmp_path, entry):
    path = bare_folder(tmp_path / "m")
    write_raw_safetensors(path / "model.safetensors", {"a": entry}, bytes(8))
    with pytest.raises(MoequantError, match="shard model.safetensors has a malformed entry for a"):
        CheckpointReader(path)


def test_same_tensor_in_two_unindexed_shards_is_refused(tmp_path):
    path = bare_folder(tmp_path / "m")
    save_file({"a.weight": torch.ones(2), "b.weight": torch.ones(2)}, str(path / "part-1.safetensors"))
    save_file({"b.weight": torch.zeros(2)}, str(path / "part-2.safetensors"))
    with pytest.raises(MoequantError, match=r"tensor b\.weight is in both part-1\.safetensors and part-2\.safetensors, "
                                            r"and no model\.safetensors\.index\.json says which"):
        CheckpointReader(path)


@pytest.mark.parametrize("content,needle", [
    (b"\xff\xfe{\x00}", "is not UTF-8 text"),
    (b"[" * 100_000, "nests too deeply"),
    (b'{"a": ', "is not valid JSON"),
])
def test_unreadable_config_is_one_line(tmp_path, content, needle):
    path = bare_folder(tmp_path / "m")
    (path / "config.json").write_bytes(content)
    save_file({"a.weight": torch.ones(2)}, str(path / "model.safetensors"))
    with pytest.raises(MoequantError, match=needle):
        CheckpointReader(path)


@pytest.mark.parametrize("weight_map", [["a.weight"], {"a.weight": 3}])
def test_malformed_index_is_one_line(tmp_path, weight_map):
    path = bare_folder(tmp_path / "m")
    save_file({"a.weight": torch.ones(2)}, str(path / "model-1.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MoequantError, match="is not a valid safetensors index"):
        CheckpointReader(path)
