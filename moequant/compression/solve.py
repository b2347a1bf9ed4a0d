"""Quantising a stack of modules: solve, pack into the layer's tensors, record."""

from __future__ import annotations

import torch

from moequant.compression.job import Job
from moequant.compression.policy import Policy
from moequant.compression.record import Record, module_record
from moequant.quant.gptq import gptq_quantize, output_error
from moequant.quant.pack import pack_result
from moequant.quant.rtn import rtn
from moequant.quant.types import QuantSpec


def solve_modules(job: Job, record: Record, names: list[str], weights: torch.Tensor, hessians: torch.Tensor | None,
                  tensors: dict[str, torch.Tensor], tokens: list[int], policies: list[Policy | None]
                  ) -> torch.Tensor:
    """Quantise ``weights [E, N, K]`` (module ``names[i]`` is ``weights[i]``) and return them dequantised.

    ``hessians [E, K, K]`` (or ``None``: no calibration data) drive GPTQ; modules that share a spec
    are solved as one batch; a module whose ``policies[i]`` has no calibration rows is rounded to
    nearest. The packed tensors go into ``tensors`` under the module's name, modules kept 16-bit
    are copied through as read, and each module's entry goes into ``record``.
    """
    out = weights.clone()
    by_spec: dict[QuantSpec | None, list[int]] = {}
    for i, name in enumerate(names):
        by_spec.setdefault(job.specs[name], []).append(i)
    for spec, members in by_spec.items():
        if spec is None:
            for i in members:
                tensors[names[i] + ".weight"] = job.reader.get(names[i] + ".weight")
                record.modules[names[i]] = module_record(weights.shape[1:], None, tokens[i], _label(policies[i]))
            continue
        sel = torch.tensor(members, device=weights.device)
        w_sel = weights.index_select(0, sel)
        h_sel = None if hessians is None else hessians.index_select(0, sel.to(hessians.device))
        with job.phases("solve"):
            if spec.method == "gptq" and h_sel is not None:
                result = gptq_quantize(w_sel, h_sel, spec)
            else:
                result = rtn(w_sel, spec.bits, spec.group_size, spec.sym, spec.clip_grid)
                if h_sel is not None:
                    result.error = output_error(w_sel, result.dequantize(), h_sel)
        with job.phases("pack"):
            # Packed on the solver's device: b/32 of the codes' bytes cross to the host.
            packed = {key: value.cpu() for key, value in pack_result(result, spec.bits).items()}
        deq = result.dequantize()
        for j, i in enumerate(members):
            for key, value in packed.items():
                tensors[f"{names[i]}.{key}"] = value[j]
            calibrated = policies[i] is None or policies[i].calibrates
            applied = "gptq" if spec.method == "gptq" and h_sel is not None and calibrated else "rtn"
            record.modules[names[i]] = module_record(
                weights.shape[1:], spec, tokens[i], _label(policies[i]), applied, error=float(result.error[j]),
                damp=float(result.damp[j]), error_kind="output" if h_sel is not None else "weight",
            )
            out[i] = deq[j].to(out.dtype)
    return out


def _label(policy: Policy | None) -> str | None:
    return None if policy is None else policy.label
