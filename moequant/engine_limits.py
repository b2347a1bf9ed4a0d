"""What other GPTQ engines make of a checkpoint's quantised modules.

moequant's own loader runs every combination of bits, group sizes and symmetry per module. The
widest public server of GPTQ MoE checkpoints, vLLM, fuses a layer's experts into one MoE kernel
that takes 4- and 8-bit experts only, one setting for all of a layer's experts (w1 and w3 of
each expert alike), symmetric ones on its Marlin path; and it fuses q, k and v into one matrix.
A checkpoint beyond those limits fails to load there, or loads with settings other than those it
was written with (per-expert ``dynamic`` rules do not match a fused layer's name); these notes
say so when the checkpoint is made and inspected, before a server is tried.
"""

from __future__ import annotations

from collections.abc import Mapping

from moequant.arch.base import Architecture

# How one linear module is stored: (bits, group size, symmetric), or None for a 16-bit weight.
Stored = tuple[int, int, bool] | None

ENGINE_EXPERT_BITS = (4, 8)


_FUSED_BY_VLLM = (("q", "k", "v"), ("q_a", "kv_a"))
"""Attention projections vLLM runs as one matrix (``qkv_proj``; MLA's ``fused_qkv_a_proj``)."""


def uneven_expert_layers(adapter: Architecture, stored: Mapping[str, Stored]) -> list[int]:
    """The layers whose experts are stored in more than one setting (a size plan's output, for example)."""
    return [layer for layer in range(adapter.config.num_layers) if not _one_setting(
        [(stored.get(i.name), i.in_features) for i in adapter.layer_linears(layer) if i.kind == "expert"])]


def engine_limits(adapter: Architecture, stored: Mapping[str, Stored]) -> list[str]:
    """One line per limit of fused-MoE GPTQ engines (vLLM) that the checkpoint runs into.

    ``stored`` maps module names (``model.layers.0.block_sparse_moe.experts.3.w1``) to how each
    is stored; modules it lacks count as 16-bit. An empty list: nothing beyond those limits.
    """
    low_bits: dict[int, list[int]] = {}
    asym_experts, uneven_qkv, partial_groups = [], [], []
    for layer in range(adapter.config.num_layers):
        infos = adapter.layer_linears(layer)
        if any((s := stored.get(i.name)) is not None and s[1] != -1 and i.in_features % s[1] for i in infos):
            partial_groups.append(layer)
        experts = [(stored.get(i.name), i.in_features) for i in infos if i.kind == "expert"]
        quantised = [s for s, _ in experts if s is not None]
        for bits in sorted({s[0] for s in quantised} - set(ENGINE_EXPERT_BITS)):
            low_bits.setdefault(bits, []).append(layer)
        if any(not s[2] for s in quantised):
            asym_experts.append(layer)
        for fused in _FUSED_BY_VLLM:
            members = [(stored.get(i.name), i.in_features) for i in infos if i.kind == "attention" and i.role in fused]
            if not _one_setting(members):
                uneven_qkv.append(layer)
                break
    notes = [
        f"{bits}-bit experts ({_layers(layers)}) run on moequant's kernels only: vLLM's MoE kernels take "
        "4- and 8-bit experts"
        for bits, layers in sorted(low_bits.items())
    ]
    uneven_experts = uneven_expert_layers(adapter, stored)
    if uneven_experts:
        notes.append(
            f"the experts of {_layers(uneven_experts)} differ in bits, group size or symmetry: vLLM needs "
            "one setting for all of a layer's experts"
        )
    if asym_experts:
        notes.append(
            f"asymmetric experts ({_layers(asym_experts)}): vLLM's Marlin MoE kernels take symmetric "
            "experts only"
        )
    if uneven_qkv:
        notes.append(
            f"q, k and v (or MLA's q_a and kv_a) of {_layers(uneven_qkv)} differ in bits, group size or "
            "symmetry: vLLM fuses them into one matrix with one setting"
        )
    if partial_groups:
        notes.append(
            f"group sizes that do not divide a module's inputs ({_layers(partial_groups)}, the last group "
            "shorter): vLLM needs groups that divide every input"
        )
    return notes


def _one_setting(modules: list[tuple[Stored, int]]) -> bool:
    """Whether one ``(bits, group_size, sym)`` config describes all ``(stored, in_features)`` modules.

    A module in one group fits a configured group size of -1 as well as its own width.
    """
    if not modules or all(s is None for s, _ in modules):
        return True
    if any(s is None for s, _ in modules) or len({(s[0], s[2]) for s, _ in modules}) > 1:
        return False
    fits = None
    for (_, group, _), width in modules:
        size = width if group == -1 else group
        own = {size, -1} if size >= width else {size}
        fits = own if fits is None else fits & own
    return bool(fits)


def _layers(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``layers 0-2, 5``."""
    spans: list[list[int]] = []
    for layer in layers:
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return ("layer " if len(layers) == 1 else "layers ") + text
