"""How a compressed checkpoint is stored: its format (``gptq`` or ``compressed-tensors``) and its
layout (the module names, per family: which readers find them).

Compression produces every tensor under its canonical name in the GPTQ layout; :func:`stored_tensors`
turns a layer's tensors into what the chosen form writes, and :func:`stored_quantization_config`
gives the matching ``quantization_config``. The reader turns every form back into the canonical
GPTQ view, so loading, evaluation and inspection read all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moequant.arch.base import Architecture
from moequant.checkpoint import compressed_tensors as ct
from moequant.checkpoint.gptq_config import quantization_config as gptq_quantization_config
from moequant.engine_limits import Stored, uneven_expert_layers
from moequant.errors import MoequantError
from moequant.packed.shapes import stored_bits
from moequant.quant.types import QuantSpec

FORMATS = ("gptq", "compressed-tensors")


_READERS = {
    ("gptq", "vllm"): ["vLLM (4- and 8-bit modules)", "AutoGPTQ and optimum with transformers 4", "moequant"],
    ("gptq", "gptqmodel"): ["GPTQModel 7", "moequant"],
    ("compressed-tensors", "vllm"): ["vLLM (4- and 8-bit modules, symmetric experts)",
                                     "transformers (dequantised to float on load)", "compressed-tensors", "moequant"],
}
_TRANSFORMERS = "transformers 5 from_pretrained (its fused experts stay unquantised: use --format compressed-tensors)"
_NOT_READ_BY = {
    ("gptq", "vllm"): ["GPTQModel 7 (use --layout gptqmodel)", _TRANSFORMERS],
    ("gptq", "gptqmodel"): ["vLLM (use --layout vllm)", _TRANSFORMERS],
    ("compressed-tensors", "vllm"): [],
}
_TRANSFORMERS_UNEVEN = ("transformers 5 from_pretrained when the experts of a layer differ in bits (a size plan's "
                        "output): it loads them wrong; load with moequant, or plan with --kinds attention")
_GPTQMODEL_DENSE = ("GPTQModel 7.7 when dense MLP layers are quantised: it leaves them unloaded, at random; keep "
                    "them 16-bit for it (a rule {kind: dense_mlp, bits: 16})")


def readers_of(arch: Architecture, form: OutputForm, stored: Mapping[str, Stored]) -> tuple[list[str], list[str]]:
    """Which readers take a checkpoint of ``form`` whose modules are ``stored`` so (verified with the readers
    themselves, see README's interoperability section), and which do not."""
    key = (form.format, form.layout)
    readers, not_read = list(_READERS.get(key, ["moequant"])), list(_NOT_READ_BY.get(key, []))
    if form.format == "gptq" and _layouts_alike(arch):
        readers = list(dict.fromkeys(_READERS["gptq", "vllm"][:-1] + _READERS["gptq", "gptqmodel"]))
        not_read = [_TRANSFORMERS]
    infos = [i for layer in range(arch.config.num_layers) for i in arch.layer_linears(layer)]
    if form.format == "gptq" and "GPTQModel 7" in readers and any(
            stored.get(i.name) is not None for i in infos if i.kind == "dense_mlp"):
        not_read.append(_GPTQMODEL_DENSE)
    if form.format == "compressed-tensors" and uneven_expert_layers(arch, stored):
        readers = [r for r in readers if not r.startswith("transformers")]
        not_read.append(_TRANSFORMERS_UNEVEN)
    return readers, not_read


def _layouts_alike(arch: Architecture) -> bool:
    """Whether every layout names this family's modules alike (Qwen and OLMoE: transformers' names)."""
    names = [i.name for i in arch.layer_linears(_first_moe_layer(arch)) if i.kind in ("expert", "router")]
    return all(arch.disk_name(n, layout) == n for n in names for layout in arch.layouts)


@dataclass(frozen=True)
class OutputForm:
    """``format``: one of :data:`FORMATS`; ``layout``: one of the architecture's ``layouts``."""

    format: str = "gptq"
    layout: str = "vllm"


def output_form(arch: Architecture, fmt: str = "gptq", layout: str | None = None,
                specs: Mapping[str, QuantSpec | None] | None = None) -> OutputForm:
    """The checked form for ``arch``: the format and layout exist, and every module of ``specs`` fits them."""
    if fmt not in FORMATS:
        raise MoequantError(f"unknown format {fmt!r}; use one of: {', '.join(FORMATS)}")
    layouts = list(arch.layouts)
    layout = layout or layouts[0]
    if layout not in arch.layouts:
        raise MoequantError(f"unknown layout {layout!r} for {arch.family}; use one of: {', '.join(layouts)}")
    if fmt == "compressed-tensors":
        if layout != layouts[0]:
            raise MoequantError(f"--layout {layout} is for --format gptq (GPTQModel reads GPTQ tensors); "
                                f"compressed-tensors readers (vLLM, transformers) take the {layouts[0]} layout")
        inputs = {i.name: i.in_features for layer in range(arch.config.num_layers) for i in arch.layer_linears(layer)}
        inputs.update({i.name: i.in_features for i in arch.global_linears()})
        for name, spec in (specs or {}).items():
            if spec is not None:
                ct.check_spec(name, spec, inputs[name])
    return OutputForm(fmt, layout)


def stored_form(reader, arch: Architecture) -> OutputForm | None:
    """The form a quantised checkpoint is stored in (``None`` for a 16-bit one); a layout of ``other``
    where its names are none of the family's layouts."""
    if reader.source_format is None:
        return None
    fmt = "compressed-tensors" if reader.source_format == "compressed-tensors" else "gptq"
    probes = [i.name for i in arch.layer_linears(_first_moe_layer(arch)) if i.kind == "expert"][:1]
    for layout in arch.layouts:
        if all(reader.stored_module(p) == arch.disk_name(p, layout) for p in probes):
            return OutputForm(fmt, layout)
    return OutputForm(fmt, "other")


def stored_tensors(form: OutputForm, arch: Architecture, specs: Mapping[str, QuantSpec | None],
                   tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (canonical names, GPTQ layout) as ``form`` stores them."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module, _, key = name.rpartition(".")
        if form.format == "compressed-tensors" and key in ("qzeros", "scales", "g_idx"):
            continue
        if form.format == "compressed-tensors" and key == "qweight":
            spec = specs[module]
            packed = {k: tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            in_features = tensor.shape[0] * 32 // spec.bits
            for ct_key, value in ct.to_compressed(packed, spec, in_features).items():
                out[f"{arch.disk_name(module, form.layout)}.{ct_key}"] = value
            continue
        out[arch.disk_name(name, form.layout)] = tensor
    return out


def module_bytes(form: OutputForm, out_features: int, in_features: int, spec: QuantSpec) -> int:
    """Bytes of the tensors ``form`` stores for a ``[out_features, in_features]`` weight at ``spec``."""
    if form.format == "compressed-tensors":
        return ct.stored_bytes(out_features, in_features, spec)
    return stored_bits(out_features, in_features, spec.bits, spec.group_size) // 8


def stored_quantization_config(form: OutputForm, arch: Architecture, specs: Mapping[str, QuantSpec | None],
                               version: str, recipe_name: str, damp: float, act_order: bool) -> dict:
    """The ``quantization_config`` of a checkpoint of ``form`` whose modules got ``specs`` (canonical names)."""
    linears = {n: s for n, s in specs.items() if n != "model.embed_tokens"}
    routers = {arch.router_name(layer) for layer in range(arch.config.num_layers)}
    quant = {arch.disk_name(n, form.layout): s for n, s in linears.items()
             if n not in routers and (n != "lm_head" or s is not None)}
    others = [arch.disk_name(n, form.layout) for n in linears if arch.disk_name(n, form.layout) not in quant]
    if form.format == "compressed-tensors":
        return ct.quantization_config(quant, others=others)
    return gptq_quantization_config(quant, version, recipe_name, damp, act_order,
                                    lm_head=specs.get("lm_head") is not None, others=others)


def _first_moe_layer(arch: Architecture) -> int:
    return next((i for i in range(arch.config.num_layers) if arch.is_moe_layer(i)), 0)
