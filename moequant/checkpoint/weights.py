"""Float weights from any checkpoint: plain tensors, or GPTQ-packed modules dequantised on read."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moequant.checkpoint.reader import CheckpointReader
from moequant.errors import MoequantError
from moequant.packed.bitstream import dequantize_packed
from moequant.packed.shapes import bits_of, check_packed
from moequant.packed.widths import PACKED_KEYS


def read_packed(reader: CheckpointReader, module: str, in_features: int,
                device: str | torch.device | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """The four packed tensors of ``module`` and its bit width, with their shapes checked."""
    missing = [f"{module}.{k}" for k in PACKED_KEYS if not reader.has(f"{module}.{k}")]
    if missing:
        raise MoequantError(f"compressed checkpoint lacks {', '.join(missing)}")
    bits = bits_of(module, reader.shape(module + ".qweight")[0], in_features)
    tensors = {k: reader.get(f"{module}.{k}", device=device) for k in PACKED_KEYS}
    check_packed(*(tensors[k] for k in PACKED_KEYS), bits, in_features, module)
    return tensors, bits


def tensor_getter(reader: CheckpointReader, dtype: torch.dtype = torch.float32,
                  device: str | torch.device | None = None) -> Callable[[str], torch.Tensor]:
    """``get(name)`` for tensor names of the original model.

    A ``X.weight`` that the checkpoint stores packed (``X.qweight`` ...) is dequantised to a
    float ``[N, K]`` matrix; everything else is read as is. Both come back in ``dtype`` on
    ``device``.
    """

    def get(name: str) -> torch.Tensor:
        if name.endswith(".weight") and not reader.has(name):
            module = name[: -len(".weight")]
            if reader.has(module + ".qweight"):
                g_idx_len = reader.shape(module + ".g_idx")[0]
                packed, bits = read_packed(reader, module, g_idx_len, device)
                return dequantize_packed(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"],
                                         bits).to(dtype)
        return reader.get(name, dtype=dtype, device=device)

    return get
