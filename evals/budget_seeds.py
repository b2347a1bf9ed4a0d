"""Size plans against uniform a4e3 and random allocations, over several calibration seeds.

One calibration draw moves the KL of a compressed checkpoint by several percent, as much as the
differences ``bench_budget.py`` compares. For each model of ``bench_budget.py`` and each
calibration seed, this compresses a4e3, ``compress --bits B --kinds expert`` for each budget, and
the plan's widths handed out again within each expert role at random (3 seeds), all by GPTQ on
that seed's windows, and evaluates them against the original on the held-out text. It reports
the mean KL over calibration seeds and on how many seeds the plan is below every random
allocation (and, at 3.0 bits, below a4e3). Writes ``results/budget-seeds-<name>.json`` and the
table in ``README.md``.

    python evals/budget_seeds.py                  # the three models, 4 calibration seeds, ~30 min
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from evals.bench_budget import BASE, arguments, each_model, run, unmeasured  # noqa: E402
from moequant.arch.registry import adapter_for  # noqa: E402
from moequant.budget import PLAN_FILE, Budget  # noqa: E402
from moequant.budget.plan import planned_recipe  # noqa: E402
from moequant.checkpoint.reader import CheckpointReader  # noqa: E402
from moequant.compression import CalibSettings  # noqa: E402
from moequant.compression.plan import plan as recipe_specs  # noqa: E402
from moequant.recipe import load_recipe  # noqa: E402

BEGIN, END = "<!-- budget-seeds:begin -->", "<!-- budget-seeds:end -->"


def study(name: str, model: Path, budgets: list[float], seeds: list[int], calib_seeds: list[int],
          args, work: Path) -> dict:
    arch = adapter_for(CheckpointReader(model).config)
    infos = {i.name: i for layer in range(arch.config.num_layers) for i in arch.layer_linears(layer)}
    base = load_recipe(BASE)
    rows: dict = {"model": name, "calibration": {"samples": args.samples, "seqlen": args.seqlen}, "seeds": {}}
    for cs in calib_seeds:
        calib = CalibSettings(samples=args.samples, seqlen=args.seqlen, seed=cs)
        entry: dict = {"a4e3": run(model, work / "a4e3", BASE, calib, args.max_windows)["kl"], "budgets": {}}
        for bits in budgets:
            budget = Budget(bits=bits, kinds=("expert",))
            plan = run(model, work / "plan", base, calib, args.max_windows, budget)["kl"]
            recipe = load_recipe(work / "plan" / PLAN_FILE)
            chosen = {n: s.bits for n, s in recipe_specs(arch, recipe).items()
                      if s is not None and infos[n].kind == "expert"}
            random = [run(model, work / "random", planned_recipe(base, budget, unmeasured(arch, chosen, "random", s),
                                                                 infos), calib, args.max_windows)["kl"]
                      for s in seeds]
            entry["budgets"][str(bits)] = {"plan": plan, "random": random}
        rows["seeds"][str(cs)] = entry
        print(name, cs, json.dumps(entry), flush=True)
    return rows


def table(rows: dict) -> str:
    seeds = list(rows["seeds"].values())
    n = len(seeds)
    a4e3 = sum(s["a4e3"] for s in seeds) / n
    lines = [f"**{rows['model']}** ({n} calibration seeds; a4e3: mean KL {a4e3:.5f})", "",
             "| expert bits | KL plan (mean) | KL random (mean of each seed) | plan below every random | "
             "plan below a4e3 |", "|---|---|---|---|---|"]
    for bits in seeds[0]["budgets"]:
        plan = sum(s["budgets"][bits]["plan"] for s in seeds) / n
        count = len(seeds[0]["budgets"][bits]["random"])
        random = ", ".join(f"{sum(s['budgets'][bits]['random'][k] for s in seeds) / n:.5f}" for k in range(count))
        below = sum(s["budgets"][bits]["plan"] < min(s["budgets"][bits]["random"]) for s in seeds)
        uniform = f"{sum(s['budgets'][bits]['plan'] < s['a4e3'] for s in seeds)} of {n}" \
            if float(bits) == 3.0 else "-"
        lines.append(f"| {bits} | {plan:.5f} | {random} | {below} of {n} | {uniform} |")
    return "\n".join(lines)


def main() -> None:
    args = arguments(__doc__.splitlines()[0], calib_seeds=True)
    each_model(args, "budget-seeds", lambda name, model, work: study(
        name, model, [float(b) for b in args.budgets.split(",")], [int(s) for s in args.seeds.split(",")],
        [int(s) for s in args.calib_seeds.split(",")], args, work), table, BEGIN, END)


if __name__ == "__main__":
    main()
