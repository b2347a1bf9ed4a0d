"""``config.json["quantization_config"]``: written in the form GPTQ readers expect, with ``dynamic``
overrides, and checked when read."""

from __future__ import annotations

import json
import re
from collections import Counter

from moequant.errors import MoequantError
from moequant.packed.widths import BITS
from moequant.quant.types import QuantSpec


def _key(spec: QuantSpec) -> tuple[int, int, bool]:
    return spec.bits, spec.group_size, spec.sym


def quantization_config(specs: dict[str, QuantSpec | None], version: str, recipe_name: str,
                        damp: float, act_order: bool, lm_head: bool, others: list[str] = ()) -> dict:
    """The GPTQ ``quantization_config`` for a checkpoint whose modules got ``specs``.

    ``specs`` maps every linear module that a GPTQ reader would quantise by default (attention
    and expert projections, plus ``lm_head`` when quantised) to its spec, or ``None`` where it
    stays 16-bit. The most common (bits, group size, sym) becomes the default; every module that
    differs gets a ``dynamic`` entry (``+:`` override, ``-:`` left unquantised). Patterns are
    written for ``re.match`` on module names and generalised where that stays exact: over layer
    and expert indices, and to a parent module (``...self_attn``) when every module under it
    shares the override, so that readers which fuse projections (``qkv_proj``, a fused experts
    module) find them too. ``others`` names modules that no pattern may match (routers).
    """
    quantised = {n: s for n, s in specs.items() if s is not None}
    counts = Counter(_key(s) for s in quantised.values())
    default = counts.most_common(1)[0][0] if counts else (4, 128, True)
    wanted: dict[str, tuple] = {}
    for name, spec in specs.items():
        key = ("skip",) if spec is None else _key(spec)
        if key != default:
            wanted[name] = key
    dynamic: dict[str, dict] = {}
    for pattern, key in compact_patterns(wanted, list(specs) + list(others)):
        if key == ("skip",):
            dynamic[f"-:{pattern}"] = {}
        else:
            bits, group, sym = key
            dynamic[f"+:{pattern}"] = {"bits": bits, "group_size": group, "sym": sym}
    bits, group, sym = default
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": group,
        "sym": sym,
        "desc_act": False,
        "static_groups": act_order,
        "true_sequential": True,
        "damp_percent": damp,
        "lm_head": lm_head,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"moequant:{version}"], "recipe": recipe_name, "act_order": act_order},
    }
    if dynamic:
        config["dynamic"] = dynamic
    return config


def compact_patterns(wanted: dict[str, tuple], all_names: list[str]) -> list[tuple[str, tuple]]:
    """Regexes covering exactly the modules of each override, as few as stay exact."""
    by_key: dict[tuple, list[str]] = {}
    for name, key in wanted.items():
        by_key.setdefault(key, []).append(name)
    out: list[tuple[str, tuple]] = []
    for key, names in by_key.items():
        members = set(names)
        done: set[str] = set()
        for name in names:
            if name in done:
                continue
            for pattern in _generalisations(name):
                hits = {n for n in all_names if re.match(pattern, n)}
                if name in hits and hits <= members:
                    out.append((pattern, key))
                    done |= hits
                    break
    return out


def _generalisations(name: str) -> list[str]:
    """Patterns for ``name``, most general first: its ancestors (below the layer; each over every layer,
    then over its own layer), then itself. An ancestor such as ``model.layers.3.block_sparse_moe.experts``
    is what readers that fuse a layer's experts match against."""
    pieces = name.split(".")
    first = next((i + 2 for i, p in enumerate(pieces) if p.isdigit()), len(pieces))
    out = []
    for end in range(first, len(pieces)):
        if not pieces[end - 1].isdigit():
            out += [p.removesuffix("$") for p in _wildcard(".".join(pieces[:end]))]
    return out + _wildcard(name)


def _wildcard(name: str) -> list[str]:
    """Exact patterns for ``name`` from every index a wildcard to none."""
    parts = re.split(r"(\.\d+\.)", name)
    escaped = [re.escape(p) if not re.fullmatch(r"\.\d+\.", p) else None for p in parts]
    numbers = [i for i, p in enumerate(escaped) if p is None]
    out = []
    for mask in range(2 ** len(numbers) - 1, -1, -1):
        pieces = []
        for i, p in enumerate(parts):
            if escaped[i] is not None:
                pieces.append(escaped[i])
            else:
                wild = mask >> numbers.index(i) & 1
                pieces.append(r"\.\d+\." if wild else re.escape(p))
        out.append("^" + "".join(pieces) + "$")
    return out


# -- reading: what a checkpoint's quantization_config says, checked before anything uses it --------


def quantization_config_of(config: dict) -> dict | None:
    """``config["quantization_config"]`` checked by :func:`check_quantization_config`; ``None`` if absent.

    Absent means missing, ``null`` or ``{}``; any other value that is not a GPTQ settings object
    is refused in one line that names the field.
    """
    qcfg = config.get("quantization_config")
    if qcfg is None or qcfg == {}:
        return None
    check_quantization_config(qcfg)
    return qcfg


def check_quantization_config(qcfg: object) -> None:
    """Refuse quantisation configs moequant cannot read, with the field and what it should hold."""
    if not isinstance(qcfg, dict):
        raise MoequantError(f"quantization_config must be a JSON object of GPTQ settings, got {_kind(qcfg)}")
    method = str(qcfg.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise MoequantError(f"quantization_config.quant_method is {method!r}; moequant loads GPTQ checkpoints only")
    fmt = str(qcfg.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise MoequantError(
            f"quantization_config.checkpoint_format is {fmt!r}; moequant reads the 'gptq' (v1) and 'gptq_v2' "
            "layouts"
        )
    _check_storage(qcfg, "quantization_config")
    modules_in_block(qcfg)
    dynamic = qcfg.get("dynamic")
    if dynamic is None:
        return
    if not isinstance(dynamic, dict):
        raise MoequantError("quantization_config.dynamic must be an object mapping module patterns to overrides, "
                            f"got {_kind(dynamic)}")
    for pattern, override in dynamic.items():
        where = f"quantization_config.dynamic[{pattern!r}]"
        regex = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        try:
            re.compile(regex)
        except (re.error, OverflowError, RecursionError) as exc:
            raise MoequantError(f"{where}: {regex!r} is not a valid regular expression ({exc})") from exc
        if override is not None and not isinstance(override, dict):
            raise MoequantError(f"{where} must be an object of overrides (bits, group_size, sym), got {_kind(override)}")
        _check_storage(override or {}, where)


def _check_storage(settings: dict, where: str) -> None:
    """``bits``, ``group_size`` and ``sym`` of ``settings``, where present, have values GPTQ readers take."""
    bits = settings.get("bits")
    if bits is not None and (_not_int(bits) or bits not in BITS):
        raise MoequantError(f"{where}.bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    group = settings.get("group_size")
    if group is not None and (_not_int(group) or (group != -1 and group < 1)):
        raise MoequantError(f"{where}.group_size must be -1 (one group per row) or a positive whole number, "
                            f"got {group!r}")
    sym = settings.get("sym")
    if sym is not None and not isinstance(sym, bool):
        raise MoequantError(f"{where}.sym must be true or false, got {sym!r}")


def modules_in_block(qcfg: dict) -> set[str] | None:
    """The names in ``modules_in_block_to_quantize`` (a list of name lists, or of names)."""
    listed = qcfg.get("modules_in_block_to_quantize")
    if not listed:
        return None
    groups = listed if isinstance(listed, list) else [None]
    if not all(isinstance(g, str) or (isinstance(g, list) and all(isinstance(m, str) for m in g)) for g in groups):
        raise MoequantError("quantization_config.modules_in_block_to_quantize must be a list of lists of module "
                            "names, e.g. [[\"self_attn.q_proj\"], [\"block_sparse_moe.experts.0.w1\"]]")
    return {m for g in groups for m in ([g] if isinstance(g, str) else g)}


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _kind(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, list)) else type(value).__name__
    return f"{type(value).__name__} {text[:40]}" if text != type(value).__name__ else text
