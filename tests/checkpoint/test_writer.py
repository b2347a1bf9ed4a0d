import pytest
import torch

from moequant.checkpoint.reader import CheckpointReader
from moequant.checkpoint.writer import CheckpointWriter, check_output, partial_dir_for
from moequant.errors import MoequantError


def test_output_appears_only_when_finished(tmp_path):
    out = tmp_path / "out"
    writer = CheckpointWriter(out, ["layer-00000", "globals"])
    writer.write_shard("layer-00000", {"a": torch.ones(3)})
    writer.write_shard("globals", {"b": torch.zeros(2)})
    writer.write_json("config.json", {"model_type": "x"})
    assert not out.exists() and partial_dir_for(out).is_dir()
    writer.finish(overwrite=False)
    assert not partial_dir_for(out).exists()
    reader = CheckpointReader(out)
    assert sorted(reader.names) == ["a", "b"]
    assert [p.name for p in reader.files()] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_overwrite_replaces_existing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    writer = CheckpointWriter(out, ["only"])
    writer.write_shard("only", {"a": torch.ones(1)})
    writer.write_json("config.json", {})
    with pytest.raises(MoequantError, match="--overwrite"):
        writer.finish(overwrite=False)
    writer = CheckpointWriter(out, ["only"])
    writer.write_shard("only", {"a": torch.ones(1)})
    writer.write_json("config.json", {})
    writer.finish(overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_check_output_refusals(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(MoequantError, match="inside the source"):
        check_output(src / "out", src, overwrite=False)
    with pytest.raises(MoequantError, match="inside the source"):
        check_output(src, src, overwrite=True)
    (tmp_path / "exists").mkdir()
    with pytest.raises(MoequantError, match="already exists; pass --overwrite"):
        check_output(tmp_path / "exists", src, overwrite=False)
    with pytest.raises(MoequantError, match="nothing to resume"):
        check_output(tmp_path / "new", src, overwrite=False, resume=True)
    check_output(tmp_path / "new", src, overwrite=False)
