"""The compressed-tensors ``pack-quantized`` format, written from the GPTQ tensors and read back as them.

A module ``X`` with weight ``W [N, K]`` quantised to ``b`` bits in ``G`` groups is stored as:

- ``X.weight_packed``     int32 ``[N, K*b/32]``: the unsigned codes ``u`` of each output row along
  K, as one little-endian bit stream (the stream of a GPTQ ``qweight`` column: ``weight_packed``
  is ``qweight`` transposed);
- ``X.weight_scale``      float16 ``[N, G]``;
- ``X.weight_zero_point`` int32 ``[N*b/32, G]`` (asymmetric modules only): the zero points ``z``
  packed along N;
- ``X.weight_shape``      int64 ``[2]``: ``[N, K]``.

compressed-tensors holds signed values ``u - 2^(b-1)`` and packs them with that offset added back,
so the dequantised weight is ``s * (u - z)``, with ``z = 2^(b-1)`` for symmetric modules: the
GPTQ grid itself. Groups are static (``g_idx[k] = k // g``: actorder ``static``), so no
``weight_g_idx`` is written; one is read where a checkpoint has it (actorder ``group``).

Widths: 2, 4 and 8 bits, which every compressed-tensors release packs alike (releases before 0.20
pack 3-bit values ten to a word, later ones as a dense stream, so a 3-bit checkpoint would read
differently by version). vLLM serves 4 and 8.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from moequant.checkpoint.gptq_config import compact_patterns
from moequant.errors import MoequantError
from moequant.packed.bitstream import pack_qzeros, pack_rows, unpack_qzeros, unpack_rows
from moequant.packed.widths import effective_group_size, is_monotone_g_idx, monotone_g_idx
from moequant.quant.types import QuantSpec

METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
CT_BITS = (2, 4, 8)
KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def check_spec(name: str, spec: QuantSpec, in_features: int) -> None:
    """Refuse a module spec that the compressed-tensors format cannot hold, naming the module."""
    if spec.bits not in CT_BITS:
        raise MoequantError(
            f"{name} gets {spec.bits}-bit codes, which --format compressed-tensors does not write "
            f"(it takes {', '.join(map(str, CT_BITS))} bits: compressed-tensors releases pack 3-bit values "
            "differently); use --format gptq, or a recipe without 3-bit modules"
        )
    if spec.group_size != -1 and in_features % spec.group_size:
        raise MoequantError(
            f"{name} has {in_features} inputs, which groups of {spec.group_size} do not divide; "
            "compressed-tensors takes only groups that divide a module's inputs: use --format gptq, or a "
            "group size that divides it (a rule with group_size)"
        )


# -- writing -----------------------------------------------------------------------------------
def stored_bytes(n: int, k: int, spec: QuantSpec) -> int:
    """Bytes of the tensors :func:`to_compressed` writes for a ``[n, k]`` weight at ``spec``."""
    groups = -(-k // effective_group_size(spec.group_size, k))
    zero_point = 0 if spec.sym else n * spec.bits // 32 * groups * 4
    return n * k * spec.bits // 8 + n * groups * 2 + 2 * 8 + zero_point


def to_compressed(packed: Mapping[str, torch.Tensor], spec: QuantSpec, in_features: int) -> dict[str, torch.Tensor]:
    """A module's GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) as compressed-tensors ones."""
    bits = spec.bits
    qweight, scales = packed["qweight"], packed["scales"]
    n = qweight.shape[-1]
    group = effective_group_size(spec.group_size, in_features)
    if not is_monotone_g_idx(packed["g_idx"], group):
        raise MoequantError("compressed-tensors takes static groups only (g_idx[k] = k // group_size)")
    out = {
        "weight_packed": qweight.t().contiguous(),
        "weight_scale": scales.t().contiguous(),
        "weight_shape": torch.tensor([n, in_features], dtype=torch.int64),
    }
    if not spec.sym:
        zeros = unpack_qzeros(packed["qzeros"], bits)  # [G, N]
        out["weight_zero_point"] = pack_rows(zeros.t().contiguous(), bits).contiguous()
    return out


def quantization_config(specs: Mapping[str, QuantSpec | None], others: list[str] = ()) -> dict:
    """The ``quantization_config`` of a compressed-tensors checkpoint whose modules got ``specs``.

    ``specs`` maps stored module names to their spec (``None``: 16-bit); ``others`` are linear
    modules never quantised (routers). Each distinct scheme becomes a config group whose
    ``targets`` are regexes covering exactly its modules (generalised over layer and expert
    indices, and to a parent module where all of it shares the scheme, so that readers that fuse
    projections find them); every 16-bit linear is under ``ignore``.
    """
    wanted = {n: ("skip",) if s is None else _scheme_key(s) for n, s in specs.items()}
    wanted.update({n: ("skip",) for n in others})
    groups: dict[tuple, list[str]] = {}
    ignore: list[str] = []
    for pattern, key in compact_patterns(wanted, list(wanted)):
        if key == ("skip",):
            ignore.append("re:" + pattern)
        else:
            groups.setdefault(key, []).append("re:" + pattern)
    config_groups = {}
    for i, (key, targets) in enumerate(sorted(groups.items(), key=lambda kv: kv[0])):
        bits, group, sym, act_order = key
        config_groups[f"group_{i}"] = {
            "targets": targets,
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": sym,
                "strategy": "group" if group != -1 else "channel",
                "group_size": group if group != -1 else None,
                "actorder": "static" if act_order and group != -1 else None,
                "dynamic": False,
            },
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    return {
        "quant_method": METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def _scheme_key(spec: QuantSpec) -> tuple[int, int, bool, bool]:
    return spec.bits, spec.group_size, spec.sym, spec.act_order and spec.method == "gptq"


# -- reading -----------------------------------------------------------------------------------
def is_compressed_tensors(qcfg: object) -> bool:
    return isinstance(qcfg, dict) and str(qcfg.get("quant_method", "")).lower() == METHOD


def present_as_gptq(reader) -> None:
    """Present the modules of ``reader``'s compressed-tensors checkpoint as GPTQ tensors (converted when
    read), and its ``quantization_config`` as the GPTQ config that gives every module the same storage."""
    from moequant.checkpoint.gptq_config import quantization_config

    modules = sorted(n[: -len(".weight_packed")] for n in reader.names if n.endswith(".weight_packed"))
    schemes = module_schemes(reader.config["quantization_config"], modules)
    for module in modules:
        scheme = schemes.get(module)
        if scheme is None:
            raise MoequantError(f"{module} is packed, but quantization_config gives it no scheme (it is "
                                "ignored, or no config group targets it)")
        if not reader.has(module + ".weight_shape"):
            raise MoequantError(f"{module}.weight_shape is missing from the checkpoint at {reader.path}")
        shape = [int(v) for v in reader.get(module + ".weight_shape").reshape(-1).tolist()]
        if len(shape) != 2 or min(shape) < 1:
            raise MoequantError(f"{module}.weight_shape is {shape}; it must be [out_features, in_features]")
        n, k = shape
        bits = scheme["bits"]
        if (k * bits) % 32 or (n * bits) % 32:
            raise MoequantError(f"{module} is a [{n}, {k}] weight; moequant runs {bits}-bit weights whose sizes "
                                "are multiples of 32")
        groups = -(-k // effective_group_size(scheme["group_size"], k))
        for key in KEYS:
            if reader.has(f"{module}.{key}"):
                reader.consume(f"{module}.{key}")
        converted = _Converted(reader.read_consumed, module, scheme, n, k)
        for key, shp, dtype in (("qweight", (k * bits // 32, n), torch.int32),
                                ("qzeros", (groups, n * bits // 32), torch.int32),
                                ("scales", (groups, n), torch.float16), ("g_idx", (k,), torch.int32)):
            reader.add_derived(f"{module}.{key}", shp, dtype, lambda key=key, c=converted: c.tensor(key),
                               beside=module + ".weight_packed")
    linears = [n[: -len(".weight")] for n in reader.names
               if n.endswith(".weight") and len(reader.shape(n)) == 2 and "embed" not in n]
    specs = gptq_specs(schemes, modules + linears)
    reader.config["quantization_config"] = quantization_config(
        specs, "compressed-tensors", "", 0.01, False, lm_head=specs.get("lm_head") is not None)


class _Converted:
    """One module's GPTQ tensors, converted once for all four of them."""

    def __init__(self, get, module: str, scheme: dict, n: int, k: int) -> None:
        self.get, self.module, self.scheme, self.n, self.k = get, module, scheme, n, k
        self._tensors: dict[str, torch.Tensor] | None = None

    def tensor(self, key: str) -> torch.Tensor:
        if self._tensors is None or key not in self._tensors:
            self._tensors = from_compressed(self.get, self.module, self.scheme, self.n, self.k)
        out = self._tensors.pop(key)
        if not self._tensors:
            self._tensors = None
        return out


def module_schemes(qcfg: dict, modules: list[str]) -> dict[str, dict]:
    """The weight scheme (``num_bits``, ``symmetric``, ``strategy``, ``group_size``, ``actorder``) of
    each module in ``modules`` (stored names of modules with ``weight_packed``), by the config's own rule:
    a module in ``ignore`` has none; else the first group with a target that names it exactly, matches
    it as ``re:`` regex, or is ``Linear``."""
    fmt = str(qcfg.get("format") or FORMAT)
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise MoequantError("quantization_config.config_groups must be an object of quantisation schemes")
    ignore = _string_list(qcfg.get("ignore") or [], "quantization_config.ignore")
    schemes: dict[str, dict] = {}
    for module in modules:
        if any(_matches(module, t) for t in ignore):
            continue
        for gname, group in groups.items():
            where = f"quantization_config.config_groups.{gname}"
            if not isinstance(group, dict):
                raise MoequantError(f"{where} must be an object with targets and weights")
            targets = _string_list(group.get("targets") or [], where + ".targets")
            if any(t == "Linear" or _matches(module, t) for t in targets):
                if str(group.get("format") or fmt) != FORMAT:
                    raise MoequantError(f"{where} has format {group.get('format')!r}; moequant reads the "
                                        f"{FORMAT!r} compressed-tensors format")
                schemes[module] = _weights_of(group.get("weights"), where + ".weights")
                break
    return schemes


def _weights_of(weights: object, where: str) -> dict:
    if not isinstance(weights, dict):
        raise MoequantError(f"{where} must describe the weight quantisation")
    bits = weights.get("num_bits")
    if weights.get("type", "int") != "int" or bits not in CT_BITS:
        raise MoequantError(f"{where}: moequant reads integer weights of 2, 4 or 8 bits, got "
                            f"type {weights.get('type')!r} with num_bits {bits!r}")
    strategy = weights.get("strategy", "group")
    if strategy not in ("group", "channel"):
        raise MoequantError(f"{where}.strategy is {strategy!r}; moequant reads 'group' and 'channel' weights")
    group = weights.get("group_size") if strategy == "group" else -1
    if not isinstance(group, int) or isinstance(group, bool) or (group != -1 and group < 1):
        raise MoequantError(f"{where}.group_size must be a positive whole number for strategy 'group', got {group!r}")
    return {"bits": bits, "group_size": group, "sym": bool(weights.get("symmetric", True)),
            "actorder": weights.get("actorder")}


def from_compressed(get, module: str, scheme: dict, n: int, k: int) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of ``module`` (``qweight``, ``qzeros``, ``scales``, ``g_idx``) from its
    compressed-tensors ones, read with ``get(tensor_name)``."""
    bits, group = scheme["bits"], effective_group_size(scheme["group_size"], k)
    n_groups = -(-k // group)
    packed = get(module + ".weight_packed")
    if tuple(packed.shape) != (n, k * bits // 32):
        raise MoequantError(f"{module}.weight_packed is {list(packed.shape)}; a {bits}-bit [{n}, {k}] weight "
                            f"packs to [{n}, {k * bits // 32}]")
    scales = get(module + ".weight_scale")
    if tuple(scales.shape) != (n, n_groups):
        raise MoequantError(f"{module}.weight_scale is {list(scales.shape)}, expected [{n}, {n_groups}]")
    if scheme["sym"]:
        zeros = torch.full((n_groups, n), 1 << (bits - 1), dtype=torch.int32)
    else:
        zp = get(module + ".weight_zero_point").to(torch.int32)
        if tuple(zp.shape) != (n * bits // 32, n_groups):
            raise MoequantError(f"{module}.weight_zero_point is {list(zp.shape)}, expected "
                                f"[{n * bits // 32}, {n_groups}]")
        zeros = unpack_rows(zp, bits).t()
    if scheme.get("actorder") == "group":
        g_idx = get(module + ".weight_g_idx").to(torch.int32)
    else:
        g_idx = monotone_g_idx(k, group)
    return {"qweight": packed.to(torch.int32).t().contiguous(), "qzeros": pack_qzeros(zeros, bits),
            "scales": scales.to(torch.float16).t().contiguous(), "g_idx": g_idx}


def gptq_specs(schemes: Mapping[str, dict], modules: list[str]) -> dict[str, QuantSpec | None]:
    """The spec of every module in ``modules`` as a GPTQ config would give it."""
    return {m: (QuantSpec(s["bits"], s["group_size"], s["sym"]) if (s := schemes.get(m)) else None)
            for m in modules}


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        try:
            return re.match(target[3:], module) is not None
        except re.error as exc:
            raise MoequantError(f"quantization_config target {target!r} is not a valid regular expression "
                                f"({exc})") from exc
    return target == module


def _string_list(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MoequantError(f"{where} must be a list of module names or 're:' patterns")
    return value
