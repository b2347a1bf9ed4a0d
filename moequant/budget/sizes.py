"""What a compressed checkpoint's folder will weigh, before it is written: to the byte for the tensors'
data, bounded from above for the safetensors headers and the metadata files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from moequant.arch.base import Architecture, LinearInfo
from moequant.checkpoint.output_form import OutputForm, module_bytes
from moequant.checkpoint.reader import CheckpointReader
from moequant.compression.record import COPY_FILES
from moequant.quant.types import QuantSpec

_HEADER_ENTRY = 100  # '"name":{"dtype":..,"shape":[..],"data_offsets":[a,b]},' beyond the name and dims
_HEADER_FIXED = 64  # length prefix, metadata, padding
_INDEX_ENTRY = 64  # '"name": "model-00001-of-00002.safetensors",' beyond the name
_MODULE_RECORD = 640  # a linear's entry in moequant.json and in the quantization_config of two files
_LAYER_RECORD = 512  # a layer's entry in moequant.json, beyond its routing histogram
_FIXED_METADATA = 16 << 10  # the record's settings, totals and timings, the recipe's settings


def linears(arch: Architecture) -> list[LinearInfo]:
    """Every linear of the model in order: each layer's, then embeddings and lm_head."""
    return [i for layer in range(arch.config.num_layers) for i in arch.layer_linears(layer)] + arch.global_linears()


def fixed_bytes(reader: CheckpointReader, arch: Architecture, specs: Mapping[str, QuantSpec | None],
                form: OutputForm, planned: set[str], source: Path) -> int:
    """Bytes of the output folder but the packed tensors of the ``planned`` modules.

    Exact for the tensors' data (16-bit tensors as the source stores them, the other quantised
    modules packed at ``specs``); an upper bound for safetensors headers, the index, the record,
    config and recipe files; the size of the files copied from ``source``.
    """
    infos = {i.name: i for i in linears(arch)}
    quantised = {n + ".weight" for n, s in specs.items() if s is not None}
    data = sum(reader.numel(n) * reader.dtype(n).itemsize for n in reader.names if n not in quantised)
    data += sum(module_bytes(form, infos[n].out_features, infos[n].in_features, s)
                for n, s in specs.items() if s is not None and n not in planned)
    entries = [n for n in reader.names if n not in quantised]
    entries += [f"{n}.{key}" for n, s in specs.items() if s is not None for key in _stored_keys(form, s)]
    headers = sum(len(arch.disk_name(n, form.layout)) + _HEADER_ENTRY + _INDEX_ENTRY for n in entries)
    headers += sum(sum(len(str(d)) + 1 for d in reader.shape(n)) for n in reader.names if n not in quantised)
    headers += 4 * 12 * len([s for s in specs.values() if s is not None])  # the packed tensors' dims
    shards = arch.config.num_layers + 1
    metadata = (_FIXED_METADATA + shards * _HEADER_FIXED + len(infos) * _MODULE_RECORD
                + sum(len(n) * 4 for n in infos) + arch.config.num_layers * (_LAYER_RECORD + 12 * arch.config.num_experts))
    copied = sum((source / name).stat().st_size for name in COPY_FILES if (source / name).is_file())
    copied += 2 * (source / "config.json").stat().st_size  # the source config, re-indented in config.json
    return data + headers + metadata + copied


def plan_text_bytes(planned: Mapping[str, QuantSpec]) -> int:
    """An upper bound on what listing ``planned`` adds to the recipe and plan files (names, measured costs)."""
    return sum(2 * len(n) + 160 for n in planned)


def _stored_keys(form: OutputForm, spec: QuantSpec) -> tuple[str, ...]:
    if form.format == "compressed-tensors":
        return ("weight_packed", "weight_scale", "weight_shape") + (() if spec.sym else ("weight_zero_point",))
    return ("qweight", "qzeros", "scales", "g_idx")
