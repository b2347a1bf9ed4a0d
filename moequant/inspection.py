"""What a checkpoint holds: architecture, parameters, bits per module group, size."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moequant.arch.registry import adapter_for
from moequant.checkpoint.against_config import check_tensors
from moequant.checkpoint.gptq_config import quantization_config_of
from moequant.checkpoint.output_form import readers_of, stored_form
from moequant.checkpoint.reader import CheckpointReader, resolve_source
from moequant.compression.record import RECORD_FILE
from moequant.engine_limits import Stored, engine_limits
from moequant.errors import MoequantError, first_line
from moequant.loading import check_loadable, linear_specs
from moequant.packed.bitstream import unpack_qzeros
from moequant.packed.shapes import bits_of, stored_bits
from moequant.packed.widths import PACKED_KEYS, effective_group_size


def describe(path: str | Path, allow_pickle: bool = False) -> dict:
    """A JSON-ready description of an original or a compressed checkpoint."""
    source = resolve_source(path)
    reader = CheckpointReader(source, allow_pickle=allow_pickle)
    adapter = adapter_for(reader.config)
    check_tensors(reader, adapter, missing_modules_ok=True)
    c = adapter.config
    quant = quantization_config_of(reader.config)
    by_module = _problems_by_module(reader, adapter, quant)
    groups: dict[str, dict] = {}
    params = 0
    stored: dict[str, Stored] = {}
    for layer in range(c.num_layers):
        for info in adapter.layer_linears(layer):
            params += info.numel
            if by_module.get(info.name):
                continue
            _count(groups, info.kind, info.numel, *_module_bits(reader, info))
            if reader.has(info.name + ".qweight"):
                stored[info.name] = _stored(reader, info)
    for info in adapter.global_linears():
        if by_module.get(info.name) or (not reader.has(info.weight) and not reader.has(info.name + ".qweight")):
            continue
        params += info.numel
        _count(groups, info.kind, info.numel, *_module_bits(reader, info))
    linear_names = {i.weight for layer in range(c.num_layers) for i in adapter.layer_linears(layer)}
    linear_names |= {i.weight for i in adapter.global_linears()}
    for name in reader.names:
        if name not in linear_names and not name.endswith(tuple("." + s for s in PACKED_KEYS)):
            params += reader.numel(name)
    size = reader.total_bytes()
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
    experts = groups.get("expert", {}).get("stored_bytes", 0)
    moe_layers = sum(1 for layer in range(c.num_layers) if adapter.is_moe_layer(layer))
    if experts and moe_layers:
        per_expert = experts // (moe_layers * c.num_experts)
        info["device_memory"] = {"full": size, "offloaded": size - experts, "per_cached_expert": per_expert,
                                 "moe_layers": moe_layers,
                                 "offloaded_top_k_cached": size - experts + moe_layers * c.top_k * per_expert}
    if stored:
        info["engine_limits"] = engine_limits(adapter, stored)
    form = stored_form(reader, adapter)
    if form is not None:
        info["format"], info["layout"] = form.format, form.layout
        info["readers"], info["not_read_by"] = readers_of(adapter, form, stored)
    if quant is not None:
        info["quantization_config"] = {k: quant[k] for k in ("quant_method", "checkpoint_format", "bits",
                                                             "group_size", "sym", "desc_act") if k in quant}
    rec = read_record(source / RECORD_FILE)
    if rec is not None:
        info["recipe"] = rec["recipe"]["name"]
        info["moequant_version"] = rec["moequant_version"]
        info["starved_experts"] = len(rec["starved_experts"])
    info["problems"] = [p for lines in by_module.values() for p in lines]
    if not info["problems"]:
        try:
            check_loadable(reader)
        except MoequantError as exc:
            info["problems"].append(f"moequant.load refuses it: {exc}")
    info["loadable"] = not info["problems"]
    return info


def read_record(path: Path) -> dict | None:
    """The fields of a ``moequant.json`` that ``inspect`` shows, checked; ``None`` if there is none.

    Returns ``{"recipe": {"name": str | None}, "moequant_version": str | None, "starved_experts": list}``.
    """
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoequantError(f"{path} is not valid JSON ({first_line(exc)}); restore it or delete it") from exc
    if not isinstance(rec, dict):
        raise MoequantError(f"{path} must hold a JSON object, got {type(rec).__name__}; restore it or delete it")
    recipe = rec.get("recipe") or {}
    fields = {"recipe": (recipe, dict), "recipe.name": (recipe.get("name") if isinstance(recipe, dict) else None,
                                                         str),
              "moequant_version": (rec.get("moequant_version"), str),
              "starved_experts": (rec.get("starved_experts", []), list)}
    for field, (value, kind) in fields.items():
        if value is not None and not isinstance(value, kind):
            raise MoequantError(f"{path}: {field} must be a {_JSON_KIND[kind]}, got {type(value).__name__}; "
                                "restore the file or delete it")
    return {"recipe": {"name": recipe.get("name")}, "moequant_version": rec.get("moequant_version"),
            "starved_experts": rec.get("starved_experts") or []}


_JSON_KIND = {dict: "JSON object", str: "string", list: "list"}


def _problems_by_module(reader: CheckpointReader, adapter, qcfg: dict | None) -> dict[str, list[str]]:
    """Per attention, expert and ``lm_head`` module, where ``quantization_config`` and its tensors disagree.

    Tensors missing, packed where the config keeps 16-bit (or the reverse), code bits (``qweight
    [K*b/32, N]``) or a group count (``scales [ceil(K/g), N]``) other than the config's.
    """
    specs = linear_specs(adapter, qcfg, reader.stored_module)
    inputs = {i.name: i.in_features for layer in range(adapter.config.num_layers) for i in adapter.layer_linears(layer)}
    inputs["lm_head"] = adapter.config.hidden_size
    return {name: _module_problems(reader, name, inputs[name], spec) for name, spec in specs.items()}


def _module_problems(reader: CheckpointReader, name: str, k: int, spec) -> list[str]:
    """How module ``name`` (``k`` inputs) as stored differs from ``spec`` (``None``: 16-bit)."""
    present = [key for key in PACKED_KEYS if reader.has(f"{name}.{key}")]
    plain = reader.has(name + ".weight")
    said = "16-bit" if spec is None else f"{spec.bits}-bit"
    if not present:
        if plain:
            return [] if spec is None else [f"{name} is stored 16-bit, quantization_config says {said}"]
        return [f"{name} has no tensors (quantization_config says {said})"]
    if spec is None:
        return [f"{name} is stored packed, quantization_config says 16-bit"]
    if len(present) < len(PACKED_KEYS):
        return [f"{name} lacks {', '.join(f'{name}.{key}' for key in PACKED_KEYS if key not in present)}"]
    rows = reader.shape(name + ".qweight")[0]
    problems = []
    if rows * 32 != k * spec.bits:
        problems.append(f"{name}.qweight has {rows} rows, {rows * 32 / k:g}-bit codes for {k} inputs; "
                        f"quantization_config says {said}")
    groups, want = reader.shape(name + ".scales")[0], -(-k // effective_group_size(spec.group_size, k))
    if groups != want:
        problems.append(f"{name}.scales has {groups} groups, quantization_config's group_size {spec.group_size} "
                        f"gives {want} for {k} inputs")
    return problems


def _module_bits(reader: CheckpointReader, info) -> tuple[int, int]:
    """``(bits per weight code, stored bits)`` of one linear module."""
    if reader.has(info.name + ".qweight"):
        bits = bits_of(info.name, reader.shape(info.name + ".qweight")[0], info.in_features)
        groups = reader.shape(info.name + ".scales")[0]
        group_size = info.in_features // groups
        return bits, stored_bits(info.out_features, info.in_features, bits, group_size)
    if reader.has(info.weight):
        width = _width(reader, info.weight)
        return width, width * info.numel
    return 0, 0


def _stored(reader: CheckpointReader, info) -> Stored:
    """``(bits, group size, symmetric)`` of a packed module, read from its tensors."""
    bits = bits_of(info.name, reader.shape(info.name + ".qweight")[0], info.in_features)
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
