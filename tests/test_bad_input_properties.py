"""Property: whatever config.json or safetensors header a checkpoint has, reading it either works or
raises a MoequantError of one line; no other exception escapes."""

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from moequant.arch.registry import adapter_for
from moequant.checkpoint.against_config import check_tensors
from moequant.checkpoint.reader import CheckpointReader
from moequant.errors import MoequantError
from moequant.inspection import describe
from moequant.loading import load
from tests.conftest import make_mixtral

SETTINGS = settings(max_examples=int(os.environ.get("PROP_N", 40)), deadline=None, derandomize=not os.environ.get("PROP_N"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values of every wrong kind, and the edges of the right kind.
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, -1, 1, 2, 3, 7, 10**12, 2.5, 128.0, float("nan"), float("inf")]),
    st.text(max_size=8), st.lists(st.integers(-2, 4), max_size=3), st.dictionaries(st.text(max_size=4),
                                                                                    st.integers(), max_size=2),
    st.integers(-5, 600),
)
CONFIG_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "num_local_experts", "num_experts_per_tok", "rms_norm_eps", "vocab_size",
                 "max_position_embeddings", "sliding_window", "rope_theta", "rope_parameters", "rope_scaling",
                 "tie_word_embeddings", "model_type", "architectures", "hidden_act"]
MISSING = object()


def assert_one_line(exc: MoequantError) -> None:
    message = str(exc)
    assert message and "\n" not in message, message


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_mixtral(tmp_path_factory.mktemp("prop") / "m", num_hidden_layers=1, hidden_size=64,
                        intermediate_size=64, vocab_size=64)


@st.composite
def config_changes(draw) -> dict:
    """Some fields of config.json, each dropped (MISSING) or replaced by an odd value."""
    fields = draw(st.lists(st.sampled_from(CONFIG_FIELDS + ["rope_parameters.rope_theta",
                                                            "rope_parameters.rope_type"]),
                           min_size=1, max_size=3, unique=True))
    return {f: draw(st.one_of(st.just(MISSING), ODD_VALUES)) for f in fields}


def apply(raw: dict, changes: dict) -> dict:
    raw = json.loads(json.dumps(raw))
    for key, value in changes.items():
        outer, _, inner = key.partition(".")
        target = raw.setdefault(outer, {}) if inner and isinstance(raw.get(outer), dict) else raw
        name = inner if inner and target is not raw else outer
        if value is MISSING:
            target.pop(name, None)
        else:
            target[name] = value
    return raw


def checkpoint_with(model: Path, root: Path, config: dict) -> Path:
    path = Path(tempfile.mkdtemp(dir=root))
    os.link(model / "model.safetensors", path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


@SETTINGS
@given(changes=config_changes())
def test_any_config_is_read_or_refused_in_one_line(model, tmp_path, changes):
    raw = apply(json.loads((model / "config.json").read_text()), changes)
    path = checkpoint_with(model, tmp_path, raw)
    try:
        reader = CheckpointReader(path)
        adapter = adapter_for(reader.config)
        check_tensors(reader, adapter)
        describe(path)
        adapter.rotary(4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load(path, device="cpu", backend="torch")
    except MoequantError as exc:
        assert_one_line(exc)
    finally:
        shutil.rmtree(path)


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> bytes:
    """A small safetensors file: three tensors of different dtypes and shapes."""
    path = tmp_path_factory.mktemp("prop-shard") / "model.safetensors"
    save_file({"a.weight": torch.ones(2, 3), "b.weight": torch.zeros(4, dtype=torch.bfloat16),
               "c.bias": torch.arange(3, dtype=torch.int32)}, str(path))
    return path.read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + body


@st.composite
def same_size_shapes(draw, shape: list[int]) -> list[int]:
    """Shapes with as many elements as ``shape`` up to sign, so the entry still fits its byte range."""
    numel = 1
    for d in shape:
        numel *= d
    dims = draw(st.sampled_from([[numel], [1, numel], [numel, 1]] + [[a, numel // a] for a in (2, 3) if numel % a == 0]))
    if len(dims) == 2 and draw(st.booleans()):
        return [-dims[0], -dims[1]]  # negative dimensions whose product still fits
    return [d * draw(st.sampled_from([1, -1])) for d in dims]


@st.composite
def header_mutation(draw, data: bytes) -> bytes:
    """``data`` with one entry's dtype, shape or offsets changed, its header length changed, or cut short."""
    kind = draw(st.sampled_from(["dtype", "shape", "shape", "data_offsets", "entry", "length", "truncate", "flip"]))
    header, body = split(data)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    if kind == "dtype":
        header[name]["dtype"] = draw(st.one_of(st.sampled_from(["F32", "F16", "BF16", "I32", "BOOL", "U8", "I64",
                                                                "F64", "F8_E4M3", "XX"]), ODD_VALUES))
    elif kind == "shape":
        header[name]["shape"] = draw(st.one_of(st.lists(st.integers(-3, 8), max_size=3), ODD_VALUES,
                                               same_size_shapes(header[name]["shape"])))
    elif kind == "data_offsets":
        header[name]["data_offsets"] = draw(st.one_of(st.lists(st.integers(-4, 64), min_size=2, max_size=2),
                                                      ODD_VALUES))
    elif kind == "entry":
        header[name] = draw(ODD_VALUES)
    if kind in ("dtype", "shape", "data_offsets", "entry"):
        return join(header, body)
    if kind == "length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + data[8:]
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    at = draw(st.integers(0, len(data) - 1))
    return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]


@settings(SETTINGS, max_examples=int(os.environ.get("PROP_N", 300)))
@given(data=st.data())
def test_any_safetensors_header_is_read_or_refused_in_one_line(shard, tmp_path, data):
    mutated = data.draw(header_mutation(shard))
    path = Path(tempfile.mkdtemp(dir=tmp_path))
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(mutated)
    try:
        reader = CheckpointReader(path)
        for name in reader.names:
            reader.get(name, dtype=torch.float32, check_finite=True)
        reader.close()
    except MoequantError as exc:
        assert_one_line(exc)
    finally:
        shutil.rmtree(path)
