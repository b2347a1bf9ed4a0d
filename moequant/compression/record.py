"""What a compressed checkpoint says about itself: ``moequant.json``, ``recipe.yaml`` and the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moequant import __version__
from moequant.checkpoint.output_form import readers_of, stored_quantization_config
from moequant.checkpoint.reader import QUANT_CONFIG_FILES
from moequant.checkpoint.writer import CheckpointWriter
from moequant.compression.job import Job
from moequant.engine_limits import engine_limits
from moequant.packed.shapes import stored_bits
from moequant.quant.types import QuantSpec

RECORD_FILE = "moequant.json"
RECIPE_FILE = "recipe.yaml"
COPY_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
_TIMING_KEYS = ("time_s", "phases_s", "experts_s")


@dataclass
class Record:
    """The record as it grows: one entry per module by name, one per completed layer."""

    modules: dict[str, dict] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)


def module_record(shape, spec: QuantSpec | None, tokens: int | None = None, policy: str | None = None,
                  applied: str | None = None, error: float | None = None, damp: float | None = None,
                  error_kind: str | None = None) -> dict:
    """One module's entry: its shape ``[N, K]``, how it is stored, the solver ``applied``, its relative error
    (``output``: ``||(W - Q) X|| / ||W X||``; ``weight``: without calibration data), calibration tokens
    and expert calibration ``policy``."""
    rec: dict = {"shape": [int(shape[0]), int(shape[1])]}
    if spec is None:
        rec.update(bits=16, method="keep")
    else:
        rec.update(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, method=applied or spec.method,
                   act_order=spec.act_order and (applied or spec.method) == "gptq")
        if damp is not None and (applied or spec.method) == "gptq":
            rec["damp"] = round(damp, 6)
        if error is not None:
            rec["error"] = round(error, 6)
            rec["error_kind"] = error_kind
    if tokens is not None:
        rec["tokens"] = tokens
    if policy is not None:
        rec["calibration"] = policy
    return rec


def finish_record(job: Job, record: Record, source: Path, calib_info: dict | None, method: str | None,
                  out_bytes: int, total_s: float) -> dict:
    """The whole ``moequant.json``: settings, totals, per-kind groups, starved experts, layers, modules, timing."""
    a = job.arch
    all_infos = [i for layer in range(a.config.num_layers) for i in a.layer_linears(layer)] + a.global_linears()
    stored = {n: (s.bits, s.group_size, s.sym) for n, s in job.specs.items() if s is not None}
    readers, not_read_by = readers_of(a, job.form, stored)
    modules = record.modules
    for info in all_infos:
        if info.name not in modules and (info.kind != "lm_head" or job.reader.has(info.weight)):
            modules[info.name] = module_record((info.out_features, info.in_features), None)
        if info.name in modules:
            modules[info.name] = {"kind": info.kind, **modules[info.name]}
    source_params = sum(job.reader.numel(n) for n in job.reader.names)
    quant_params = sum(i.numel for i in all_infos if job.specs.get(i.name) is not None)
    quant_bits = sum(stored_bits(i.out_features, i.in_features, s.bits, s.group_size)
                     for i in all_infos if (s := job.specs.get(i.name)) is not None)
    source_bytes = job.reader.total_bytes()
    starved = [{"layer": r["layer"], "expert": e, "tokens": r["routing_histogram"][e],
                "policy": r["calibration_policy"]}
               for r in record.layers for e in r.get("starved_experts", [])]
    recipe = job.recipe
    return {
        "moequant_version": __version__,
        "format": job.form.format,
        "layout": job.form.layout,
        "readers": readers,
        "not_read_by": not_read_by,
        "source": str(source),
        "architecture": (job.reader.config.get("architectures") or [a.family])[0],
        "recipe": {"name": recipe.name, "fingerprint": recipe.fingerprint(), "file": RECIPE_FILE},
        "method_override": method,
        "settings": {"act_order": recipe.act_order, "damp": recipe.damp, "block_size": recipe.block_size,
                     "min_tokens": recipe.min_tokens, "expert_calibration": recipe.expert_calibration,
                     "hessian_weighting": recipe.hessian_weighting},
        "calibration": calib_info,
        "totals": {
            "parameters": source_params,
            "quantised_parameters": quant_params,
            "bytes": out_bytes,
            "source_bytes": source_bytes,
            "bits_per_weight": round(8 * out_bytes / max(source_params, 1), 4),
            "bits_per_weight_quantised": round(quant_bits / max(quant_params, 1), 4),
            "compression_ratio": round(source_bytes / max(out_bytes, 1), 4),
        },
        "groups": _groups(job, modules, all_infos),
        "starved_experts": starved,
        "engine_limits": engine_limits(a, stored),
        "layers": [{k: v for k, v in r.items() if k not in _TIMING_KEYS} for r in record.layers],
        "modules": dict(sorted(modules.items(), key=lambda kv: _natural(kv[0]))),
        "timing": {"total_s": round(total_s, 3), "device": str(job.device),
                   "layers_s": [r.get("time_s") for r in record.layers],
                   "layer_phases_s": [r.get("phases_s") for r in record.layers],
                   "layer_experts_s": [r.get("experts_s") for r in record.layers]},
    }


def _groups(job: Job, modules: dict[str, dict], infos) -> dict[str, dict]:
    """Per module kind: modules, parameters, modules per bit width, mean relative error."""
    by_kind: dict[str, dict] = {}
    for info in infos:
        spec = job.specs.get(info.name)
        g = by_kind.setdefault(info.kind, {"modules": 0, "parameters": 0, "bits": {}, "error_sum": 0.0,
                                           "errors": 0})
        g["modules"] += 1
        g["parameters"] += info.numel
        key = str(16 if spec is None else spec.bits)
        g["bits"][key] = g["bits"].get(key, 0) + 1
        err = modules.get(info.name, {}).get("error")
        if err is not None:
            g["error_sum"] += err
            g["errors"] += 1
    return {k: {"modules": v["modules"], "parameters": v["parameters"], "bits": v["bits"],
                "mean_error": round(v["error_sum"] / v["errors"], 6) if v["errors"] else None}
            for k, v in by_kind.items()}


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def write_metadata(job: Job, writer: CheckpointWriter, source: Path, record: dict) -> None:
    """config.json with its ``quantization_config``, quantize_config.json, the record, the recipe, the tokenizer."""
    config = dict(job.reader.config)
    config["quantization_config"] = stored_quantization_config(
        job.form, job.arch, job.specs, __version__, job.recipe.name, job.recipe.damp, job.recipe.act_order)
    writer.write_json("config.json", config)
    if job.form.format == "gptq":
        writer.write_json(QUANT_CONFIG_FILES[0], config["quantization_config"])
    writer.write_json(RECORD_FILE, record)
    writer.write_text(RECIPE_FILE, job.recipe.to_yaml())
    for name in COPY_FILES:
        if (source / name).is_file():
            writer.copy_file(source / name)
