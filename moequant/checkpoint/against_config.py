"""A checkpoint's tensors against its ``config.json``: names, shapes and dtypes, from the headers alone.

Every command that reads a checkpoint (compress, load, eval, inspect) calls :func:`check_tensors`
once, before any work, so a checkpoint that does not fit its config is refused in one line that
names the tensor and the config field, instead of failing (or silently going wrong) part way.
"""

from __future__ import annotations

import re

from moequant.arch.base import Architecture, LinearInfo
from moequant.checkpoint.reader import CheckpointReader
from moequant.errors import MoequantError

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_Q = "num_attention_heads x head_dim"
_KV = "num_key_value_heads x head_dim"


def _fields(info: LinearInfo, sizes: dict[str, str | tuple[str, str]]) -> tuple[str, str]:
    """The config.json fields that set the ``[rows, columns]`` of linear ``info``."""
    if isinstance(sizes.get(info.role), tuple):
        return sizes[info.role]
    fixed = {"q": (_Q, "hidden_size"), "k": (_KV, "hidden_size"), "v": (_KV, "hidden_size"),
             "o": ("hidden_size", _Q), "gate": (sizes["experts"], "hidden_size"),
             "shared_gate": ("1", "hidden_size"), "embed": ("vocab_size", "hidden_size"),
             "lm_head": ("vocab_size", "hidden_size")}
    if info.role in fixed:
        return fixed[info.role]
    width = sizes[info.kind]
    return ("hidden_size", width) if info.role == "w2" else (width, "hidden_size")


def check_tensors(reader: CheckpointReader, adapter: Architecture, missing_modules_ok: bool = False) -> None:
    """Refuse a checkpoint whose tensors do not fit ``adapter.config``, naming the tensor and the field.

    Every linear of every layer (attention, experts, router), both norms of every layer, the
    embedding ``[vocab_size, hidden_size]``, the final norm ``[hidden_size]`` and an untied
    ``lm_head`` must be present with the shape config.json implies and a floating-point dtype
    (layers past ``num_hidden_layers`` only where the family keeps some there, as DeepSeek-V3 its
    multi-token-prediction layers, which pass through 16-bit);
    a module stored packed (``X.qweight`` in place of ``X.weight``) need only be present here, its
    packed tensors are checked where they are read. No tensor may belong to a layer at or past
    ``num_hidden_layers``. With ``missing_modules_ok`` a linear with no tensor at all passes (for
    ``inspect``, which lists each missing module).

    Raises:
        MoequantError: one line naming the first tensor that disagrees and what config.json says.
    """
    c = adapter.config
    sizes = adapter.size_fields()
    _check_layer_indices(reader, c.num_layers + adapter.extra_layers)
    for layer in range(c.num_layers):
        for info in adapter.layer_linears(layer):
            _check_linear(reader, info, missing_modules_ok, sizes)
        for name, (size, field) in adapter.layer_vectors(layer).items():
            _check_vector(reader, name, size, field)
    for info in adapter.global_linears():
        _check_linear(reader, info, missing_modules_ok, sizes)
    _check_vector(reader, adapter.final_norm_name, c.hidden_size)


def _check_layer_indices(reader: CheckpointReader, num_layers: int) -> None:
    beyond = [(int(m.group(1)), name) for name in reader.names
              if (m := _LAYER.match(name)) and int(m.group(1)) >= num_layers]
    if beyond:
        layer, name = min(beyond)
        raise MoequantError(
            f"tensor {name} belongs to layer {layer}, but config.json field num_hidden_layers is {num_layers} "
            f"(layers 0-{num_layers - 1}); set num_hidden_layers to the number of layers the checkpoint holds"
        )


def _check_linear(reader: CheckpointReader, info: LinearInfo, missing_ok: bool, sizes: dict[str, str]) -> None:
    if not reader.has(info.weight) and (reader.has(info.name + ".qweight") or missing_ok):
        return
    _require(reader, info.weight)
    _check_shape(reader, info.weight, (info.out_features, info.in_features), _fields(info, sizes))
    _check_float(reader, info.weight)


def _check_vector(reader: CheckpointReader, name: str, size: int, field: str = "hidden_size") -> None:
    _require(reader, name)
    _check_shape(reader, name, (size,), (field,))
    _check_float(reader, name)


def _require(reader: CheckpointReader, name: str) -> None:
    if not reader.has(name):
        raise MoequantError(f"tensor {name} is missing from the checkpoint at {reader.path}")


def _check_shape(reader: CheckpointReader, name: str, want: tuple[int, ...], fields: tuple[str, ...]) -> None:
    shape = reader.shape(name)
    if shape == want:
        return
    if len(shape) != len(want):
        where = f"{len(want)} dimensions ({' by '.join(fields)})"
    else:
        dim = next(i for i, (got, exp) in enumerate(zip(shape, want, strict=True)) if got != exp)
        where = f"{want[dim]} for dimension {dim} (config.json field {fields[dim]})"
    raise MoequantError(f"tensor {name} has shape {list(shape)}, but config.json implies {list(want)}: {where}; "
                        "the config does not describe these weights")


def _check_float(reader: CheckpointReader, name: str) -> None:
    dtype = reader.dtype(name)
    if not dtype.is_floating_point:
        raise MoequantError(f"tensor {name} is {str(dtype).removeprefix('torch.')}; weights must be floating-point "
                            "(bfloat16, float16 or float32)")
