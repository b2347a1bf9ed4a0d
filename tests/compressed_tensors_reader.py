"""A compressed-tensors checkpoint's weights as the ``compressed_tensors`` package itself decompresses them.

The package's own steps, as transformers runs them on load: parse ``quantization_config``, attach
its schemes to the ``nn.Linear`` modules its targets match (``apply_quantization_config``), turn
those modules into their compressed form, fill them from the checkpoint, and decompress. The
modules are a bare tree of ``nn.Linear`` named as the checkpoint stores them, so no model class
of any family is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


def _linear_tree(state: dict[str, torch.Tensor]) -> nn.Module:
    root = nn.Module()
    for key, tensor in state.items():
        if key.endswith(".weight_shape"):
            module, (n, k) = key[: -len(".weight_shape")], tensor.tolist()
        elif key.endswith(".weight") and tensor.dim() == 2 and "embed" not in key:
            module, (n, k) = key[: -len(".weight")], tensor.shape
        else:
            continue
        *parents, leaf = module.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.add_module(leaf, nn.Linear(k, n, bias=False))
    return root


def decompressed_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """``{module: weight [N, K]}`` of every module compressed-tensors decompresses in checkpoint ``path``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    path = Path(path)
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    root = _linear_tree(state)
    config = QuantizationConfig.model_validate(qcfg)
    apply_quantization_config(root, config)
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(root)
    compressed = {name for name, m in root.named_modules() if hasattr(m, "weight_packed")}
    for name, tensor in list(root.named_parameters()) + list(root.named_buffers()):
        if name not in state:
            raise AssertionError(f"compressed-tensors expects {name}, which the checkpoint lacks")
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise AssertionError(f"{name}: compressed-tensors expects {list(tensor.shape)}, "
                                 f"the checkpoint has {list(state[name].shape)}")
        tensor.data = state[name].clone()
    compressor.decompress_model(root)
    return {name: module.weight.detach() for name, module in root.named_modules() if name in compressed}
