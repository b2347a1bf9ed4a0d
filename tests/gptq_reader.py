"""A GPTQ checkpoint reader written from the format's description alone, sharing no code with
moequant: packed words are read as one little-endian bit stream (value ``i`` of ``b`` bits at
stream bits ``b*i .. b*i+b-1``, which is also the 3-bit three-word layout), zero points carry
the v1 offset, and ``dynamic`` overrides apply first match first (``-:`` leaves a module out).

Tests use it to rebuild a plain float checkpoint from a compressed one and compare models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PACKED = ("qweight", "qzeros", "scales", "g_idx")


def unpack_rows(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``words`` int32 ``[R, W]``, each row a bit stream of ``b``-bit values: ``[R, count]`` int64."""
    stream = np.ascontiguousarray(words.astype("<i4")).view(np.uint8)
    flat = np.unpackbits(stream, axis=1, bitorder="little")  # [R, 32 W]
    fields = flat[:, : count * bits].reshape(words.shape[0], count, bits).astype(np.int64)
    return (fields << np.arange(bits, dtype=np.int64)).sum(axis=2)


def module_settings(qconfig: dict, module: str) -> dict | None:
    """``{"bits", "group_size"}`` of ``module`` under ``qconfig``, or None if it is left out."""
    found: dict = {}
    for pattern, override in (qconfig.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        body = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if re.match(body, module):
            if negative:
                return None
            found = override
            break
    return {key: found.get(key, qconfig[key]) for key in ("bits", "group_size")}


def dequantize(tensors: dict[str, torch.Tensor], module: str, bits: int, v1: bool = True) -> torch.Tensor:
    """The float weight ``[N, K]`` of ``module``: ``s[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])``."""
    qweight, qzeros, scales, g_idx = (tensors[f"{module}.{part}"] for part in PACKED)
    k, n = g_idx.shape[0], scales.shape[1]
    q = unpack_rows(qweight.t().numpy(), bits, k)  # [N, K]
    z = unpack_rows(qzeros.numpy(), bits, n) + (1 if v1 else 0)  # [G, N]
    groups = g_idx.long().numpy()
    w = scales.float().numpy()[groups].T * (q - z[groups].T)
    return torch.from_numpy(w.astype(np.float32))


def read_as_float(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config without quantization_config, float32 tensors)`` of a GPTQ checkpoint folder."""
    config = json.loads((folder / "config.json").read_text())
    qconfig = config.pop("quantization_config")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    modules = sorted({name.rsplit(".", 1)[0] for name in tensors if name.endswith(".qweight")})
    plain = {name: t.float() for name, t in tensors.items() if name.rsplit(".", 1)[-1] not in PACKED}
    v1 = qconfig.get("checkpoint_format", "gptq") == "gptq"
    for module in modules:
        settings = module_settings(qconfig, module)
        assert settings is not None, f"{module} is packed but the config leaves it out"
        w = dequantize(tensors, module, settings["bits"], v1)
        groups = tensors[f"{module}.scales"].shape[0]
        size = settings["group_size"]
        assert groups == (1 if size == -1 else -(-w.shape[1] // size)), f"{module}: {groups} groups, group {size}"
        plain[f"{module}.weight"] = w
    return config, plain


def write_float_checkpoint(folder: Path, dest: Path) -> Path:
    """Write ``folder``'s weights, dequantised by this reader, as a float32 checkpoint in ``dest``."""
    config, plain = read_as_float(folder)
    config["dtype"] = "float32"
    if config.get("tie_word_embeddings"):
        plain.pop("lm_head.weight", None)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(config))
    save_file(plain, dest / "model.safetensors")
    return dest
