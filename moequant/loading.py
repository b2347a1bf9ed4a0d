"""Loading checkpoints as runnable ``transformers`` models, compressed or not.

:func:`load` builds the family's transformers model (``MixtralForCausalLM``,
``Qwen3MoeForCausalLM``, ...) on the meta device, swaps every quantised linear for
a :class:`~moequant.nn.quant_linear.QuantLinear` and every layer's experts for a
:class:`~moequant.nn.quant_experts.QuantExperts`, allocates the model once on the target device
and reads each tensor from the shards (positional reads, one tensor at a time) into place.
Packed weights stay packed: no full-precision copy of a quantised weight is ever made. A checkpoint without
``quantization_config`` loads the same way, into a plain model.

:func:`dequantized_model` gives the plain model whose weights are the dequantised codes, the
float reference that a compressed model must reproduce.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moequant.arch.base import QUANTISABLE_KINDS, Architecture
from moequant.arch.registry import adapter_for
from moequant.checkpoint.against_config import check_tensors
from moequant.checkpoint.gptq_config import modules_in_block, quantization_config_of
from moequant.checkpoint.reader import QUANT_CONFIG_FILES, CheckpointReader, resolve_source
from moequant.checkpoint.weights import tensor_getter
from moequant.device import resolve_device
from moequant.errors import MoequantError
from moequant.kernels import dispatch
from moequant.nn.offload import offload_experts, slots_for
from moequant.nn.quant_experts import LinearSpec, QuantExperts, stacked_specs
from moequant.nn.quant_linear import QuantLinear
from moequant.numeric import check_int, parse_size
from moequant.packed.shapes import packed_shapes
from moequant.packed.widths import PACKED_KEYS, stored_group_size

_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
    "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_IGNORED_EXTRA = re.compile(r".*rotary_emb\.inv_freq$")


# -- the quantisation config ------------------------------------------------------------------
def module_spec(qcfg: dict | None, name: str) -> LinearSpec | None:
    """How the GPTQ ``quantization_config`` stores module ``name`` (None: a plain 16-bit weight).

    The first ``dynamic`` pattern that ``re.match``-es the name wins: ``-:pattern`` keeps the
    module 16-bit, ``+:pattern`` (or no prefix) overrides ``bits``/``group_size`` of the defaults.
    A ``modules_in_block_to_quantize`` list (groups of names inside a decoder layer, as optimum and
    AutoGPTQ write it) keeps every layer module it does not name 16-bit.
    """
    if not qcfg:
        return None
    listed = modules_in_block(qcfg)
    inside = re.match(r"model\.layers\.\d+\.(.+)$", name)
    if listed is not None and inside and inside.group(1) not in listed:
        return None
    spec = LinearSpec(int(qcfg.get("bits", 4)), int(qcfg.get("group_size", 128)))
    for pattern, override in (qcfg.get("dynamic") or {}).items():
        skip = pattern.startswith("-:")
        regex = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if not re.match(regex, name):
            continue
        if skip:
            return None
        override = override or {}
        return LinearSpec(int(override.get("bits", spec.bits)), int(override.get("group_size", spec.group_size)))
    return spec


def linear_specs(adapter: Architecture, qcfg: dict | None,
                 stored_name: Callable[[str], str] = str) -> dict[str, LinearSpec | None]:
    """The storage spec of every attention, expert and ``lm_head`` linear (by canonical module name).

    GPTQ quantises attention, expert and other MLP projections by default, ``lm_head`` only when the
    config says ``"lm_head": true``; routers and embeddings never. The config's patterns are matched
    against ``stored_name(module)``, the name the checkpoint stores it under.
    """
    specs: dict[str, LinearSpec | None] = {}
    for layer in range(adapter.config.num_layers):
        for info in adapter.layer_linears(layer):
            if info.kind in QUANTISABLE_KINDS:
                spec = module_spec(qcfg, stored_name(info.name))
                specs[info.name] = _one_group_if_wider(spec, info.in_features)
    if not adapter.config.tie_word_embeddings:
        lm_head = module_spec(qcfg, "lm_head") if qcfg and qcfg.get("lm_head") else None
        specs["lm_head"] = _one_group_if_wider(lm_head, adapter.config.hidden_size)
    return specs


def _one_group_if_wider(spec: LinearSpec | None, in_features: int) -> LinearSpec | None:
    """``spec`` with a group wider than the input read as one group (:func:`stored_group_size`)."""
    return None if spec is None else LinearSpec(spec.bits, stored_group_size(spec.group_size, in_features))


# -- the plan: which checkpoint tensor goes where ----------------------------------------------
@dataclass(frozen=True)
class _Fill:
    """Copy checkpoint tensor ``disk`` into model tensor ``target`` (optionally a slice of it)."""

    disk: str
    target: str
    index: tuple | None = None


def _packed_fills(disk_module: str, target_module: str) -> list[_Fill]:
    return [_Fill(f"{disk_module}.{k}", f"{target_module}.{k}") for k in PACKED_KEYS]


def _plain_or_packed(disk_module: str, target_module: str, spec: LinearSpec | None) -> list[_Fill]:
    if spec is None:
        return [_Fill(disk_module + ".weight", target_module + ".weight")]
    return _packed_fills(disk_module, target_module)


def _experts_layout(reader: CheckpointReader, adapter: Architecture, layer: int,
                    specs: dict[str, LinearSpec | None]) -> tuple[str, list[dict[str, LinearSpec | None]]]:
    """``("plain" | "stacked" | "per-expert", per-expert role specs)`` of one layer's experts."""
    c = adapter.config
    roles = [{r: specs[adapter.expert_name(layer, e, r)] for r in ("w1", "w3", "w2")} for e in range(c.num_experts)]
    if all(s is None for r in roles for s in r.values()):
        return "plain", roles
    if stacked_specs(roles) is None:
        return "per-expert", roles
    for e in range(c.num_experts):
        w1, w3 = (adapter.expert_name(layer, e, r) + ".g_idx" for r in ("w1", "w3"))
        if reader.has(w1) and reader.has(w3) and reader.shape(w1) == reader.shape(w3):
            if not torch.equal(reader.get(w1).to(torch.int32), reader.get(w3).to(torch.int32)):
                return "per-expert", roles
    return "stacked", roles


def _expert_fills(adapter: Architecture, layer: int, layout: str,
                  roles: list[dict[str, LinearSpec | None]]) -> list[_Fill]:
    c = adapter.config
    inter = c.intermediate_size
    target = f"model.layers.{layer}.mlp.experts"
    fills: list[_Fill] = []
    for e in range(c.num_experts):
        disk = {r: adapter.expert_name(layer, e, r) for r in ("w1", "w3", "w2")}
        if layout == "plain":
            fills += [
                _Fill(disk["w1"] + ".weight", f"{target}.gate_up_proj", (e, slice(0, inter))),
                _Fill(disk["w3"] + ".weight", f"{target}.gate_up_proj", (e, slice(inter, 2 * inter))),
                _Fill(disk["w2"] + ".weight", f"{target}.down_proj", (e,)),
            ]
        elif layout == "stacked":
            bits = roles[e]["w1"].bits
            halves = {"qweight": inter, "qzeros": inter * bits // 32, "scales": inter}
            for key, width in halves.items():
                fills.append(_Fill(f"{disk['w1']}.{key}", f"{target}.w13_{key}", (e, slice(None), slice(0, width))))
                fills.append(_Fill(f"{disk['w3']}.{key}", f"{target}.w13_{key}",
                                   (e, slice(None), slice(width, 2 * width))))
            # w3 shares w1's g_idx (checked when choosing the layout); copying both checks both are there
            fills.append(_Fill(f"{disk['w1']}.g_idx", f"{target}.w13_g_idx", (e,)))
            fills.append(_Fill(f"{disk['w3']}.g_idx", f"{target}.w13_g_idx", (e,)))
            fills += [_Fill(f"{disk['w2']}.{k}", f"{target}.w2_{k}", (e,)) for k in PACKED_KEYS]
        else:
            for r in ("w1", "w3", "w2"):
                fills += _plain_or_packed(disk[r], f"{target}.experts.{e}.{r}", roles[e][r])
    return fills


# -- building the model -----------------------------------------------------------------------
def resolve_dtype(dtype: str | torch.dtype | None, config: dict, device: torch.device) -> torch.dtype:
    """The compute dtype: ``dtype`` if given, else the checkpoint's on CUDA (float16 for a bfloat16
    checkpoint on a GPU without bfloat16 arithmetic) and float32 on CPU."""
    if dtype is not None and not isinstance(dtype, torch.dtype) and str(dtype) != "auto":
        if str(dtype) not in _DTYPE_NAMES:
            raise MoequantError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
        dtype = _DTYPE_NAMES[str(dtype)]
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise MoequantError(f"dtype {dtype} is not a floating-point type; use bfloat16, float16 or float32")
        if dtype == torch.bfloat16 and device.type == "cuda" and not _has_bf16(device):
            raise MoequantError(f"{device} has no bfloat16 arithmetic (compute capability below 8.0); use float16")
        return dtype
    if device.type != "cuda":
        return torch.float32
    stored = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    chosen = _DTYPE_NAMES.get(stored, torch.bfloat16)
    return torch.float16 if chosen == torch.bfloat16 and not _has_bf16(device) else chosen


def _has_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` does bfloat16 arithmetic natively (compute capability 8.0 and up)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def _hf_config(raw: dict, adapter: Architecture, keep_quant: bool):
    from transformers import CONFIG_MAPPING

    fields = {k: v for k, v in raw.items() if keep_quant or k != "quantization_config"}
    try:
        return CONFIG_MAPPING[adapter.model_type].from_dict(fields)
    except Exception as exc:
        raise MoequantError(f"config.json does not describe a {adapter.family} model transformers accepts "
                            f"({exc})") from exc


def _skeleton(raw: dict, adapter: Architecture, specs: dict[str, LinearSpec | None],
              layouts: list[tuple[str, list] | None], backend: str, keep_quant: bool) -> nn.Module:
    """The family's transformers model on the meta device with packed modules in place."""
    from transformers import AutoModelForCausalLM

    config = _hf_config(raw, adapter, keep_quant)
    c = adapter.config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        for layer, layout in enumerate(layouts):
            for info in adapter.layer_linears(layer):
                spec = specs.get(info.name)
                if info.kind != "expert" and spec is not None:
                    parent, _, leaf = info.name.rpartition(".")
                    owner = model.get_submodule(parent)
                    old = getattr(owner, leaf)
                    setattr(owner, leaf, QuantLinear(old.in_features, old.out_features, spec.bits, spec.group_size,
                                                     bias=old.bias is not None, backend=backend))
            if layout is not None and layout[0] != "plain":
                model.model.layers[layer].mlp.experts = QuantExperts(
                    c.num_experts, c.hidden_size, c.intermediate_size, layout[1], config.hidden_act, backend,
                    force_per_expert=layout[0] == "per-expert",
                )
        lm_spec = specs.get("lm_head")
        if lm_spec is not None:
            model.lm_head = QuantLinear(c.hidden_size, c.vocab_size, lm_spec.bits, lm_spec.group_size,
                                        backend=backend)
    return model


def _plan(reader: CheckpointReader, adapter: Architecture, specs: dict[str, LinearSpec | None]
          ) -> tuple[list[tuple[str, list] | None], list[_Fill]]:
    """Which checkpoint tensor fills which model tensor, and each layer's experts layout (``None``: dense)."""
    a, c = adapter, adapter.config
    fills = [_Fill(a.embed_name, "model.embed_tokens.weight"), _Fill(a.final_norm_name, "model.norm.weight")]
    layouts: list[tuple[str, list] | None] = []
    for layer in range(c.num_layers):
        prefix = f"model.layers.{layer}."
        fills += [_Fill(name, name) for name in a.layer_vectors(layer)]
        for info in a.layer_linears(layer):
            if info.kind == "router":
                target = prefix + "mlp.gate.weight" if info.role == "gate" else info.weight
                fills.append(_Fill(info.weight, target))
            elif info.kind != "expert":
                fills += _plain_or_packed(info.name, info.name, specs[info.name])
        if not a.is_moe_layer(layer):
            layouts.append(None)
            continue
        layout = _experts_layout(reader, a, layer, specs)
        layouts.append(layout)
        fills += _expert_fills(a, layer, *layout)
    if not c.tie_word_embeddings:
        fills += _plain_or_packed("lm_head", "lm_head", specs.get("lm_head"))
    return layouts, fills


def _check_fills(reader: CheckpointReader, fills: list[_Fill], targets: dict[str, torch.Tensor]) -> None:
    """Every checkpoint tensor is present, has the shape its slot needs and a usable dtype."""
    missing = [f.disk for f in fills if not reader.has(f.disk)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MoequantError(
            f"the checkpoint at {reader.path} lacks tensor {', '.join(missing[:3])}{more}; re-create it with "
            "moequant compress"
        )
    for f in fills:
        want = tuple(_slot(targets[f.target], f.index).shape)
        got = reader.shape(f.disk)
        if got != want:
            raise MoequantError(
                f"tensor {f.disk} has shape {list(got)}, but config.json and quantization_config imply "
                f"{list(want)}; the checkpoint does not match its config"
            )
        dtype = reader.dtype(f.disk)
        if f.disk.endswith((".qweight", ".qzeros")) and dtype != torch.int32:
            raise MoequantError(f"tensor {f.disk} is {dtype}, packed GPTQ codes must be int32")
        if f.disk.endswith(".g_idx") and (dtype.is_floating_point or dtype == torch.bool):
            raise MoequantError(f"tensor {f.disk} is {dtype}, g_idx must be an integer tensor")
        if not f.disk.endswith((".qweight", ".qzeros", ".g_idx")) and not dtype.is_floating_point:
            raise MoequantError(f"tensor {f.disk} is {dtype}, expected a floating-point tensor")


def _slot(tensor: torch.Tensor, index: tuple | None) -> torch.Tensor:
    return tensor if index is None else tensor[index]


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def _warn_unused(reader: CheckpointReader, used: set[str], tied: bool) -> None:
    extra = [n for n in reader.names if n not in used and not _IGNORED_EXTRA.match(n)
             and not (tied and n == "lm_head.weight")]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        warnings.warn(f"ignored {len(extra)} checkpoint tensors the model has no place for: "
                      f"{', '.join(extra[:3])}{more}", stacklevel=4)


def _build(path: str | os.PathLike, device: str | torch.device | None, dtype: str | torch.dtype | None,
           backend: str, dequantize: bool) -> nn.Module:
    source = resolve_source(path)
    reader = CheckpointReader(source)
    raw = reader.config
    dev = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, raw, dev)
    dispatch.resolve_backend(backend, dev)
    adapter, model, fills = _prepare(reader, backend, dequantize)
    if dequantize:
        get = tensor_getter(reader, dtype=torch.float32)
    else:

        def get(name: str) -> torch.Tensor:
            return reader.get(name)

    model.to(compute_dtype)
    model.to_empty(device=dev)
    targets = _targets(model)
    used: set[str] = set()
    with torch.no_grad():
        for f in fills:
            tensor = get(f.disk)
            slot = _slot(targets[f.target], f.index)
            if tuple(tensor.shape) != tuple(slot.shape):
                raise MoequantError(f"tensor {f.disk} has shape {list(tensor.shape)}, expected {list(slot.shape)}")
            if f.disk.endswith(".g_idx"):
                _check_g_idx(f.disk, tensor, targets[f.target.replace("g_idx", "scales")])
            slot.copy_(tensor)
            _check_finite(reader, f.disk, tensor, slot)
            used.add(f.disk)
            if dequantize and not reader.has(f.disk):
                used.update(f"{f.disk[: -len('.weight')]}.{k}" for k in PACKED_KEYS)
        _reset_rotary(model, dev)
        if adapter.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    _warn_unused(reader, used, adapter.config.tie_word_embeddings)
    _load_generation_config(model, source)
    model.config._name_or_path = str(source)
    model.config.dtype = compute_dtype
    return model.eval()


def _prepare(reader: CheckpointReader, backend: str, dequantize: bool
             ) -> tuple[Architecture, nn.Module, list[_Fill]]:
    """The model on the meta device and the tensors that fill it, after every check that needs no weights."""
    raw = reader.config
    adapter = adapter_for(raw)
    check_tensors(reader, adapter)
    qcfg = quantization_config_of(raw)
    if qcfg is None:
        packed = next((n for n in reader.names if n.endswith(".qweight")), None)
        if packed is not None:
            raise MoequantError(
                f"{reader.path} holds packed weights ({packed}) but no quantisation config: add the bits, "
                f"group_size and sym it was packed with as quantization_config in config.json (or as "
                f"{QUANT_CONFIG_FILES[0]})"
            )
    specs = linear_specs(adapter, None if dequantize else qcfg, reader.stored_module)
    for name, spec in specs.items():
        if spec is not None:
            try:
                packed_shapes(*_shape_of(adapter, name), spec.bits, spec.group_size)
            except MoequantError as exc:
                raise MoequantError(f"quantization_config gives {name} bits={spec.bits}, "
                                    f"group_size={spec.group_size}, which cannot hold it: {exc}") from exc
    layouts, fills = _plan(reader, adapter, specs)
    model = _skeleton(raw, adapter, specs, layouts, backend, keep_quant=not dequantize)
    covered = {f.target for f in fills}
    tied = adapter.config.tie_word_embeddings
    uncovered = [n for n in model.state_dict() if n not in covered and not (tied and n == "lm_head.weight")]
    if uncovered:
        raise MoequantError(f"no checkpoint tensor fills {', '.join(uncovered[:3])}; this model layout is not "
                            "supported")
    if not dequantize:
        _check_fills(reader, fills, _targets(model))
    return adapter, model, fills


def check_loadable(reader: CheckpointReader) -> None:
    """Raise the :class:`MoequantError` that :func:`load` would raise for this checkpoint, reading no weights
    but the packed ``scales`` (checked for NaN and Inf)."""
    _, _, fills = _prepare(reader, "torch", dequantize=False)
    for f in fills:
        if f.disk.endswith(".scales"):
            reader.get(f.disk, check_finite=True)


def _check_finite(reader: CheckpointReader, name: str, stored: torch.Tensor, slot: torch.Tensor) -> None:
    """Refuse a tensor whose values are NaN or Inf as stored, or turn infinite in the model's dtype."""
    if not slot.is_floating_point() or bool(torch.isfinite(slot).all()):
        return
    if not reader.has(name):  # a packed module read dequantised: its scales are its float part
        name = name[: -len(".weight")] + ".scales"
        stored = reader.get(name)
    if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
        bad = "NaN" if bool(torch.isnan(stored).any()) else "Inf"
        raise MoequantError(f"tensor {name} in {reader.shard_of(name).name} contains {bad} values; the checkpoint "
                            "is corrupt, re-create it")
    raise MoequantError(f"tensor {name} holds values beyond the range of {slot.dtype}; load it with "
                        "dtype=float32 or bfloat16")


def _shape_of(adapter: Architecture, name: str) -> tuple[int, int]:
    c = adapter.config
    if name == "lm_head":
        return c.vocab_size, c.hidden_size
    layer = int(name.split(".")[2])
    for info in adapter.layer_linears(layer):
        if info.name == name:
            return info.out_features, info.in_features
    raise MoequantError(f"unknown module {name}")


def _check_g_idx(name: str, g_idx: torch.Tensor, scales: torch.Tensor) -> None:
    groups = scales.shape[-2]
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise MoequantError(f"tensor {name} names groups outside [0, {groups - 1}]; the checkpoint is corrupt")


def _reset_rotary(model: nn.Module, device: torch.device) -> None:
    """Recompute the rotary embedding's (non-persistent) inverse frequencies on ``device``."""
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)


def _load_generation_config(model: nn.Module, source: Path) -> None:
    if not (source / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(source)
    except Exception as exc:  # a broken generation config should not stop the model from loading
        warnings.warn(f"ignored generation_config.json ({exc})", stacklevel=4)


# -- public API -------------------------------------------------------------------------------
def load(path: str | os.PathLike, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, backend: str = "auto", offload: str | None = None,
         gpu_memory: str | int | None = None, expert_slots: int | None = None) -> nn.Module:
    """A checkpoint folder (compressed by moequant, or an original MoE checkpoint) as a model.

    Args:
        path: checkpoint folder (``config.json``, safetensors shards) or hub id.
        device: ``cpu``, ``cuda[:N]``; None or ``auto``: CUDA when available, else CPU.
        dtype: compute dtype of activations and 16-bit weights. Default: the checkpoint's
            ``dtype``/``torch_dtype`` (bf16/fp16) on CUDA (fp16 for bf16 on GPUs before compute
            capability 8.0, which lack bf16), float32 on CPU. Packed scales stay float16 whatever
            the dtype.
        backend: kernels for packed weights: ``torch`` (any device), ``triton`` (CUDA, or CPU
            under ``TRITON_INTERPRET=1``) or ``auto`` (Triton on CUDA when available).
        offload: ``"experts"`` keeps the packed experts in host memory behind a per-layer cache of
            experts on ``device`` (:mod:`moequant.nn.offload`); everything else goes to ``device``.
        gpu_memory: with ``offload``, the device memory the weights may take (bytes, or ``"10GiB"``,
            ``"12GB"``); the cache gets what is left after the other weights (leave room for activations).
        expert_slots: with ``offload``, the experts cached per layer, instead of ``gpu_memory``.

    Returns:
        ``MixtralForCausalLM`` in eval mode: quantised attention projections (and ``lm_head``
        if quantised) are :class:`QuantLinear`, each layer's ``mlp.experts`` with quantised
        experts a :class:`QuantExperts`; everything else is the ordinary transformers module.
        It runs ``model(input_ids=...)`` and ``model.generate(...)``; the tokenizer loads with
        ``AutoTokenizer.from_pretrained(path)``.

    Raises:
        MoequantError: missing or mis-shaped tensors (named), unsupported configs, or a backend
            that cannot run on ``device``.
    """
    if offload is None:
        if gpu_memory is not None or expert_slots is not None:
            raise MoequantError("gpu_memory and expert_slots size the cache of offload='experts'; pass that too")
        return _build(path, device, dtype, backend, dequantize=False)
    if offload != "experts":
        raise MoequantError(f"offload={offload!r}: the one thing moequant offloads is 'experts'")
    dev = resolve_device(device)
    dispatch.resolve_backend(backend, dev)
    raw = CheckpointReader(resolve_source(path)).config
    model = _build(path, "cpu", resolve_dtype(dtype, raw, dev), "auto" if backend == "triton" else backend,
                   dequantize=False)
    if expert_slots is None:
        if gpu_memory is None:
            raise MoequantError("offload='experts' needs gpu_memory (e.g. '10GiB') or expert_slots")
        budget = parse_size(gpu_memory, "gpu_memory") if isinstance(gpu_memory, str) else \
            check_int(gpu_memory, "gpu_memory", 1, meaning="bytes")
        expert_slots = slots_for(model, budget)
        if expert_slots < 1:
            raise MoequantError(f"gpu_memory {gpu_memory} holds the weights outside the experts but no expert per "
                                "layer; give more, or load without offload on the CPU")
    check_int(expert_slots, "expert_slots", 1, meaning="experts cached per layer")
    offload_experts(model, dev, expert_slots, adapter_for(raw).config.top_k)
    _reset_rotary(model, dev)
    return model


def dequantized_model(path: str | os.PathLike, device: str | torch.device | None = None,
                      dtype: str | torch.dtype | None = None) -> nn.Module:
    """The family's plain transformers model whose weights are the checkpoint's dequantised codes.

    Every packed module ``X`` becomes the float ``X.weight = s * (q - z)`` (via
    :func:`~moequant.checkpoint.weights.tensor_getter`); same device and dtype defaults as
    :func:`load`. It holds full-precision weights: use it as a reference, not to save memory.
    """
    return _build(path, device, dtype, "torch", dequantize=True)


def model_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total

