"""``config.json["quantization_config"]`` in the form GPTQ readers expect, with ``dynamic`` overrides."""

from __future__ import annotations

import re
from collections import Counter

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
    for pattern, key in _compact_patterns(wanted, list(specs) + list(others)):
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


def _compact_patterns(wanted: dict[str, tuple], all_names: list[str]) -> list[tuple[str, tuple]]:
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
    """Patterns for ``name``, most general first: its ancestors (below the layer), then itself."""
    pieces = name.split(".")
    first = next((i + 2 for i, p in enumerate(pieces) if p.isdigit()), len(pieces))
    out = []
    for end in range(first, len(pieces)):
        if not pieces[end - 1].isdigit():
            out.append(_wildcard(".".join(pieces[:end]))[0].removesuffix("$"))
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
