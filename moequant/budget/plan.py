"""A size budget turned into a recipe: widths chosen per module by measured cost, the whole model at once.

Every module the base recipe quantises, of the kinds planned, gets one of the candidate widths;
:func:`make_plan` measures what each width would cost each module (:mod:`moequant.budget.costs`)
and solves the multiple-choice knapsack over the whole model (:mod:`moequant.budget.knapsack`):
the least total cost whose modules average at most ``bits`` bits per weight, or whose output
folder takes at most ``size`` bytes. The result is an ordinary recipe: the planned modules listed
by name per width, ahead of the base recipe's rules, under a comment block of the measured costs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from moequant.arch.base import QUANTISABLE_KINDS, Architecture, LinearInfo
from moequant.budget import knapsack
from moequant.budget.costs import WINDOW_SHARE, WINDOW_TOKENS, measure_costs
from moequant.budget.sizes import fixed_bytes, linears, plan_text_bytes
from moequant.calib import check_token_ids
from moequant.checkpoint.compressed_tensors import CT_BITS
from moequant.checkpoint.output_form import OutputForm, module_bytes, output_form
from moequant.checkpoint.reader import CheckpointReader, resolve_source
from moequant.checkpoint.writer import resume_dir_for, write_json_atomic, writing
from moequant.compression.calibration import CalibSettings, calibration_ids, windows_per_chunk
from moequant.compression.job import Job
from moequant.compression.plan import plan as recipe_specs
from moequant.compression.run import open_original
from moequant.device import resolve_device
from moequant.errors import MoequantError
from moequant.packed.widths import BITS
from moequant.progress import Progress
from moequant.recipe import Recipe, Rule, load_recipe, parse_recipe

PLAN_FILE = "plan.yaml"
_SAVED = "plan.json"
BITS_TOLERANCE = 0.01


@dataclass(frozen=True)
class Budget:
    """What a plan must fit: ``bits`` (the planned modules' average code width) or ``size`` (bytes of the
    output folder), with the candidate ``choices`` of width and the ``kinds`` of module planned."""

    bits: float | None = None
    size: int | None = None
    choices: tuple[int, ...] = (2, 3, 4)
    kinds: tuple[str, ...] = QUANTISABLE_KINDS

    def __post_init__(self) -> None:
        if (self.bits is None) == (self.size is None):
            raise MoequantError("give one budget: --bits (average bits per weight) or --size (bytes of the output)")
        if self.bits is not None and not (isinstance(self.bits, (int, float)) and math.isfinite(self.bits)
                                          and self.bits > 0):
            raise MoequantError(f"--bits must be a positive number of bits per weight, e.g. 2.5; got {self.bits!r}")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0):
            raise MoequantError(f"--size must be a positive number of bytes; got {self.size!r}")
        bad = [c for c in self.choices if c not in BITS]
        if bad or len(set(self.choices)) < 2:
            raise MoequantError(f"--choices must list two or more widths of {', '.join(map(str, BITS))}; "
                                f"got {','.join(map(str, self.choices))}")
        unknown = [k for k in self.kinds if k not in QUANTISABLE_KINDS]
        if unknown or not self.kinds:
            raise MoequantError(f"--kinds takes {', '.join(QUANTISABLE_KINDS)}; got {','.join(self.kinds) or 'none'}")
        object.__setattr__(self, "choices", tuple(sorted(set(self.choices))))
        object.__setattr__(self, "kinds", tuple(k for k in QUANTISABLE_KINDS if k in self.kinds))

    def describe(self) -> str:
        return f"{self.bits:g} bits" if self.bits is not None else f"{self.size:,} bytes"


def parse_widths(text: str) -> tuple[int, ...]:
    """``"2,3,4"`` as widths."""
    try:
        return tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise MoequantError(f"--choices must be widths separated by commas, e.g. 2,3,4; got {text!r}") from None


@dataclass
class Plan:
    """The planned recipe, its YAML with the comment block (what ``plan.yaml`` holds), a summary, and the key
    of what it was planned for (:func:`plan_key`)."""

    recipe: Recipe
    text: str
    summary: dict = field(default_factory=dict)
    key: str = ""

    def save(self, resume_dir: Path) -> None:
        """Keep the plan where a resumed run finds it."""
        with writing(resume_dir):
            resume_dir.mkdir(exist_ok=True)
        write_json_atomic(resume_dir / _SAVED, {"key": self.key, "text": self.text, "summary": self.summary})


def saved_plan(resume_dir: Path, key: str) -> Plan | None:
    """The plan an interrupted run saved for the same ``key``, or ``None``."""
    try:
        data = json.loads((resume_dir / _SAVED).read_text())
        if data["key"] != key:
            return None
        return Plan(parse_recipe(data["text"], source="the saved plan"), data["text"], data["summary"], key)
    except (OSError, ValueError, KeyError, TypeError, MoequantError):
        return None


def plan_run(out: Path, reader: CheckpointReader, arch: Architecture, base: Recipe, budget: Budget, form: OutputForm,
             calib: CalibSettings, device: torch.device, progress: Progress, resume: bool, expert_batch: int = 0) -> Plan:
    """The plan of a compression run into ``out``: the one its interrupted run saved when resuming, else a new one."""
    key = plan_key(reader, base, budget, calib, form)
    saved = saved_plan(resume_dir_for(out), key) if resume else None
    if saved is not None:
        progress.note("replaying the plan of the interrupted run")
        return saved
    return make_plan(reader, arch, base, budget, form, calib, device, progress, expert_batch)


def check_size(folder: Path, size: int) -> None:
    """Refuse an output folder larger than ``size`` bytes (the plan's bounds make this never happen)."""
    total = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    if total > size:
        raise MoequantError(f"the output takes {total:,} bytes, over --size {size:,}; plan with a smaller --size")


def plan_key(reader: CheckpointReader, base: Recipe, budget: Budget, calib: CalibSettings, form: OutputForm) -> str:
    """What a saved plan must share with a run to be replayed by it."""
    return json.dumps({"config": reader.config, "recipe": base.fingerprint(), "budget": asdict(budget),
                       "calib": vars(calib), "form": [form.format, form.layout]}, sort_keys=True, default=str)


def make_plan(reader: CheckpointReader, arch: Architecture, base: Recipe, budget: Budget, form: OutputForm,
              calib: CalibSettings, device: torch.device, progress: Progress | None = None,
              expert_batch: int = 0) -> Plan:
    """The recipe that fits ``budget`` at the least measured cost, from ``base`` (its settings, and the width of
    every module it quantises but does not plan); ``expert_batch`` experts are read at a time (0: a layer's)."""
    progress = progress or Progress()
    started = time.perf_counter()
    base_specs = recipe_specs(arch, base)
    infos = {i.name: i for i in linears(arch)}
    planned = {n: s for n, s in base_specs.items()
               if s is not None and infos[n].kind in budget.kinds}
    if not planned:
        raise MoequantError(f"recipe {base.name} quantises no module of the kinds planned ({', '.join(budget.kinds)}); "
                            "choose a recipe that does, or other --kinds")
    if form.format == "compressed-tensors" and (bad := [c for c in budget.choices if c not in CT_BITS]):
        raise MoequantError(f"--format compressed-tensors takes widths {', '.join(map(str, CT_BITS))}; drop "
                            f"{', '.join(map(str, bad))} from --choices")
    names = list(planned)
    if budget.bits is not None:
        total = sum(infos[n].numel for n in names)
        items_size = [[infos[n].numel * b for b in budget.choices] for n in names]
        capacity = math.floor(budget.bits * total + 1e-6)
        fixed = 0
    else:
        specs_at = {n: [replace(planned[n], bits=b) for b in budget.choices] for n in names}
        items_size = [[module_bytes(form, infos[n].out_features, infos[n].in_features, s) for s in specs_at[n]]
                      for n in names]
        fixed = fixed_bytes(reader, arch, base_specs, form, set(names), reader.path) + plan_text_bytes(planned)
        capacity = budget.size - fixed
    _check_reachable(budget, items_size, capacity, fixed, len(names))

    job = Job(reader, arch, base, base_specs, device, progress, windows=windows_per_chunk(calib, arch),
              expert_batch=expert_batch or arch.config.num_experts)
    ids, calib_info = calibration_ids(reader.path, calib, arch, progress)
    check_token_ids(ids, reader.shape(arch.embed_name)[0], arch.embed_name)
    ids = ids[:max(1, min(WINDOW_TOKENS, ids.numel() // WINDOW_SHARE) // ids.shape[1])]
    hidden = reader.get(arch.embed_name, dtype=torch.float32, device=device)[ids.to(device)]
    costs = measure_costs(job, hidden, planned, budget.choices)
    del hidden

    items = [[(size, costs[n][b]) for size, b in zip(sizes, budget.choices, strict=True)]
             for n, sizes in zip(names, items_size, strict=True)]
    solution = knapsack.solve(items, capacity)
    chosen = {n: budget.choices[j] for n, j in zip(names, solution.choice, strict=True)}
    recipe = planned_recipe(base, budget, chosen, infos)
    final_specs = recipe_specs(arch, recipe)
    output_form(arch, form.format, form.layout, final_specs)
    summary = _summary(budget, base, chosen, infos, solution, fixed, calib_info, time.perf_counter() - started)
    text = _comment_block(reader, budget, summary, costs, chosen) + recipe.to_yaml()
    return Plan(recipe, text, summary, plan_key(reader, base, budget, calib, form))


def _check_reachable(budget: Budget, items: Sequence[Sequence[int]], capacity: int, fixed: int, count: int) -> None:
    low, high = knapsack.smallest([[(s, 0.0) for s in it] for it in items]), \
        knapsack.largest([[(s, 0.0) for s in it] for it in items])
    widths = ",".join(map(str, budget.choices))
    if budget.bits is not None:
        if min(budget.choices) <= budget.bits <= max(budget.choices):
            return
        raise MoequantError(f"--bits {budget.bits:g} is out of reach: the {count} planned modules average "
                            f"{min(budget.choices)} to {max(budget.choices)} bits with --choices {widths}")
    if low <= capacity <= high:
        return
    raise MoequantError(f"--size {budget.size:,} is out of reach: this output takes {fixed + low:,} to "
                        f"{fixed + high:,} bytes with --choices {widths} ({count} modules planned)")


def planned_recipe(base: Recipe, budget: Budget, chosen: dict[str, int], infos: dict[str, LinearInfo]) -> Recipe:
    """``base`` with the ``chosen`` width of each module (``infos`` by name): one rule per kind and width listing
    its modules, ahead of ``base``'s own rules (which keep each module's group size, symmetry and solver)."""
    groups: dict[tuple, list[str]] = {}
    for name, bits in chosen.items():
        rule = base.rule_for(infos[name])[1]
        groups.setdefault((infos[name].kind, bits, rule.group_size, rule.sym, rule.method), []).append(name)
    order = {k: i for i, k in enumerate(QUANTISABLE_KINDS)}
    rules = [Rule(kind=kind, modules=names, bits=bits, group_size=group, sym=sym, method=method)
             for (kind, bits, group, sym, method), names in sorted(groups.items(),
                                                                   key=lambda kv: (order[kv[0][0]], kv[0][1]))]
    return base.model_copy(update={
        "name": f"{base.name}-{_budget_tag(budget)}",
        "description": f"planned by moequant plan for {budget.describe()} from {base.name}",
        "rules": rules + list(base.rules),
    })


def _budget_tag(budget: Budget) -> str:
    return f"b{budget.bits:g}" if budget.bits is not None else f"s{budget.size}"


def _summary(budget: Budget, base: Recipe, chosen: dict[str, int], infos: dict[str, LinearInfo],
             solution: knapsack.Solution, fixed: int, calib_info: dict, seconds: float) -> dict:
    params = sum(infos[n].numel for n in chosen)
    bits = sum(infos[n].numel * b for n, b in chosen.items()) / params
    out = {
        "budget": {"bits": budget.bits} if budget.bits is not None else {"size": budget.size},
        "choices": list(budget.choices),
        "kinds": list(budget.kinds),
        "base_recipe": base.name,
        "modules": len(chosen),
        "parameters": params,
        "bits": round(bits, 6),
        "widths": {str(b): sum(1 for v in chosen.values() if v == b) for b in budget.choices},
        "cost": solution.cost,
        "lower_bound": solution.bound,
        "calibration": calib_info,
        "plan_s": round(seconds, 3),
    }
    if budget.size is not None:
        out["bytes_at_most"] = fixed + solution.size
    return out


def _comment_block(reader: CheckpointReader, budget: Budget, summary: dict, costs: dict[str, dict[int, float]],
                   chosen: dict[str, int]) -> str:
    widths = ", ".join(f"{n} at {b} bits" for b, n in summary["widths"].items())
    size = f", at most {summary['bytes_at_most']:,} bytes" if "bytes_at_most" in summary else ""
    gap = 0.0 if summary["cost"] <= summary["lower_bound"] else 1 - summary["lower_bound"] / summary["cost"]
    lines = [
        f"moequant plan of {reader.path.name} for {budget.describe()} (base recipe {summary['base_recipe']}, "
        f"kinds {', '.join(budget.kinds)})",
        f"chosen: {summary['modules']} modules averaging {summary['bits']:.4f} bits{size}: {widths}",
        f"estimated cost {summary['cost']:.6g}; no choice within the budget costs less than "
        f"{summary['lower_bound']:.6g} ({gap:.2%} below)",
        "cost of each module at each width: the error quantising it alone to that width is expected to leave in",
        "the model's output, summed over the calibration tokens (see moequant.budget.costs);",
        "-> the width chosen",
    ]
    width = max(len(n) for n in chosen)
    for name, bits in chosen.items():
        row = "  ".join(f"{b}: {c:.3e}" for b, c in costs[name].items())
        lines.append(f"  {name:<{width}}  {row}  -> {bits}")
    return "".join(f"# {line}\n" for line in lines)


def plan_model(model: str | Path, budget: Budget, recipe: str | Path | Recipe = "a4e3",
               calib: CalibSettings | None = None, device: str = "auto", output_format: str = "gptq",
               layout: str | None = None, allow_pickle: bool = False, progress: Progress | None = None) -> Plan:
    """The plan of the checkpoint ``model`` (folder or hub id) for ``budget``, from ``recipe``; sizes are those of
    ``output_format`` and ``layout``."""
    reader, arch = open_original(resolve_source(model), allow_pickle)
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    form = output_form(arch, output_format, layout)
    return make_plan(reader, arch, base, budget, form, calib or CalibSettings(), resolve_device(device), progress)
