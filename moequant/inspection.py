"""What a checkpoint holds: architecture, parameters, bits per module group, size."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moequant.arch.registry import adapter_for
from moequant.checkpoint.against_config import check_tensors
from moequant.checkpoint.reader import CheckpointReader, resolve_source
from moequant.checkpoint.weights import packed_bits as packed_code_bits
from moequant.quant.pack import unpack_qzeros
from moequant.serving import Stored, engine_limits
from moequant.sizes import packed_bits

_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def describe(path: str | Path, allow_pickle: bool = False) -> dict:
    """A JSON-ready description of an original or a compressed checkpoint."""
    source = resolve_source(path)
    reader = CheckpointReader(source, allow_pickle=allow_pickle)
    adapter = adapter_for(reader.config)
    check_tensors(reader, adapter)
    c = adapter.config
    groups: dict[str, dict] = {}
    params = 0
    stored: dict[str, Stored] = {}
    for layer in range(c.num_layers):
        for info in adapter.layer_linears(layer):
            params += info.numel
            _count(groups, info.kind, info.numel, *_module_bits(reader, info))
            if reader.has(info.name + ".qweight"):
                stored[info.name] = _stored(reader, info)
    for info in adapter.global_linears():
        if not reader.has(info.weight) and not reader.has(info.name + ".qweight"):
            continue
        params += info.numel
        _count(groups, info.kind, info.numel, *_module_bits(reader, info))
    linear_names = {i.weight for layer in range(c.num_layers) for i in adapter.layer_linears(layer)}
    linear_names |= {i.weight for i in adapter.global_linears()}
    for name in reader.names:
        if name not in linear_names and not name.endswith(tuple("." + s for s in _QUANT_SUFFIXES)):
            params += reader.numel(name)
    size = reader.total_bytes()
    quant = reader.config.get("quantization_config")
    info = {
        "path": str(source),
        "architecture": (reader.config.get("architectures") or [c.model_type])[0],
        "compressed": quant is not None,
        "layers": c.num_layers,
        "experts": c.num_experts,
        "experts_per_token": c.top_k,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "sliding_window": c.sliding_window,
        "parameters": params,
        "size_bytes": size,
        "bits_per_weight": round(8 * size / max(params, 1), 4),
        "groups": {k: {**v, "bits": dict(sorted(v["bits"].items()))} for k, v in groups.items()},
    }
    if stored:
        info["engine_limits"] = engine_limits(adapter, stored)
    if quant is not None:
        info["quantization_config"] = {k: quant[k] for k in ("quant_method", "checkpoint_format", "bits",
                                                             "group_size", "sym", "desc_act") if k in quant}
    record = source / "moequant.json"
    if record.is_file():
        rec = json.loads(record.read_text())
        info["recipe"] = rec.get("recipe", {}).get("name")
        info["moequant_version"] = rec.get("moequant_version")
        info["starved_experts"] = len(rec.get("starved_experts", []))
    return info


def _module_bits(reader: CheckpointReader, info) -> tuple[int, int]:
    """``(bits per weight code, stored bits)`` of one linear module."""
    if reader.has(info.name + ".qweight"):
        bits = packed_code_bits(reader, info.name, info.in_features)
        groups = reader.shape(info.name + ".scales")[0]
        group_size = info.in_features // groups
        return bits, packed_bits(info.out_features, info.in_features, bits, group_size)
    if reader.has(info.weight):
        width = _width(reader, info.weight)
        return width, width * info.numel
    return 0, 0


def _stored(reader: CheckpointReader, info) -> Stored:
    """``(bits, group size, symmetric)`` of a packed module, read from its tensors."""
    bits = packed_code_bits(reader, info.name, info.in_features)
    groups = reader.shape(info.name + ".scales")[0]
    group = info.in_features
    if groups > 1:  # the largest group: the last one is shorter where the size does not divide K
        group = int(torch.bincount(reader.get(info.name + ".g_idx").long().clamp(0, groups - 1)).max())
    zeros = unpack_qzeros(reader.get(info.name + ".qzeros"), bits)
    return bits, group, bool((zeros == 2 ** (bits - 1)).all())


def _width(reader: CheckpointReader, name: str) -> int:
    return torch.finfo(reader.dtype(name)).bits if reader.dtype(name).is_floating_point else 16


def _count(groups: dict, kind: str, numel: int, bits: int, stored: int) -> None:
    g = groups.setdefault(kind, {"modules": 0, "parameters": 0, "stored_bytes": 0, "bits": {}})
    g["modules"] += 1
    g["parameters"] += numel
    g["stored_bytes"] += stored // 8
    g["bits"][str(bits)] = g["bits"].get(str(bits), 0) + 1
