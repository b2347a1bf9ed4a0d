"""Plans from measured quality: what a size plan reaches when each (layer, expert role) group's cost is its real KL.

For each model of ``bench_budget.py``, every group of experts sharing a layer and a role (gate, up
or down of all the layer's experts) is compressed alone at each candidate width (attention at 4
bits as in a4e3, every other expert kept 16-bit), by GPTQ on the same calibration windows, and
evaluated against the original; the group's cost at a width is that KL less the KL of attention
alone. The multiple-choice knapsack over the groups (the solver ``moequant plan`` uses) then
chooses one width per group for each average expert width of ``bench_budget.py``, and each
choice is compressed and evaluated like the plans there. This is the best a cost estimate can do
when it knows each group's real cost; it takes a compress run per group and width, so it is a
yardstick for estimates, not a way to plan. Writes ``results/budget-oracle-<name>.json`` and
the table in ``README.md``.

    python evals/budget_oracle.py                 # the three models, ~12 min on two CPU cores
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from evals.bench_budget import BASE, RESULTS, arguments, each_model, run  # noqa: E402
from moequant.arch.registry import adapter_for  # noqa: E402
from moequant.budget import knapsack  # noqa: E402
from moequant.checkpoint.reader import CheckpointReader  # noqa: E402
from moequant.compression import CalibSettings  # noqa: E402
from moequant.recipe import Recipe, Rule, load_recipe  # noqa: E402

BEGIN, END = "<!-- budget-oracle:begin -->", "<!-- budget-oracle:end -->"
WIDTHS = (2, 3, 4)
ROLE_NAMES = {"w1": "gate", "w3": "up", "w2": "down"}


def expert_groups(arch) -> dict[str, list]:
    """The experts' linears grouped by layer and role: ``"layer.role" -> [LinearInfo]``."""
    groups: dict[str, list] = {}
    for layer in range(arch.config.num_layers):
        for info in arch.layer_linears(layer):
            if info.kind == "expert":
                groups.setdefault(f"{layer}.{ROLE_NAMES[info.role]}", []).append(info)
    return groups


def with_widths(base: Recipe, name: str, widths: dict[str, int], groups: dict[str, list]) -> Recipe:
    """``base`` with each group of ``widths`` at its width and every other expert kept 16-bit."""
    rules = [Rule(kind="expert", modules=[i.name for i in groups[g]], bits=b) for g, b in widths.items()]
    return base.model_copy(update={"name": name, "rules": rules + [Rule(kind="expert", bits=16)] + list(base.rules)})


def study(name: str, model: Path, budgets: list[float], calib: CalibSettings, windows: int | None,
          work: Path) -> dict:
    arch = adapter_for(CheckpointReader(model).config)
    base, groups = load_recipe(BASE), expert_groups(arch)
    alone = run(model, work / "attention", with_widths(base, "attention", {}, groups), calib, windows)["kl"]
    costs = {}
    for g in groups:
        costs[g] = [run(model, work / "group", with_widths(base, f"{g}-{b}", {g: b}, groups), calib, windows)["kl"]
                    - alone for b in WIDTHS]
        print(name, g, costs[g], flush=True)
    size = {g: sum(i.numel for i in infos) for g, infos in groups.items()}
    total = sum(size.values())
    rows: dict = {"model": name, "calibration": vars(calib), "attention_alone_kl": alone, "group_costs": costs,
                  "budgets": []}
    for bits in budgets:
        items = [[(size[g] * b, costs[g][j]) for j, b in enumerate(WIDTHS)] for g in groups]
        solution = knapsack.solve(items, int(bits * total + 1e-6))
        chosen = {g: WIDTHS[j] for g, j in zip(groups, solution.choice, strict=True)}
        result = run(model, work / f"oracle-{bits}", with_widths(base, f"oracle-{bits}", chosen, groups), calib,
                     windows)
        rows["budgets"].append({"bits": bits, "widths": chosen, "result": result})
        print(name, bits, json.dumps(rows["budgets"][-1]), flush=True)
    return rows


def table(rows: dict) -> str:
    """The oracle's KL beside the plan's and the uniform a4e3's, from ``results/budget-<name>.json`` when present."""
    bench = RESULTS / f"budget-{rows['model']}.json"
    measured = json.loads(bench.read_text()) if bench.is_file() else {"budgets": [], "uniform": {}}
    plans = {b["bits"]: b for b in measured["budgets"]}
    uniform = measured["uniform"].get("a4e3", {}).get("kl")
    lines = [f"**{rows['model']}** (a4e3: KL {uniform:.5f})" if uniform is not None else f"**{rows['model']}**", "",
             "| expert bits | KL by measured groups | KL plan | widths by group (layer.role: bits) |",
             "|---|---|---|---|"]
    for b in rows["budgets"]:
        plan = plans.get(b["bits"])
        widths = ", ".join(f"{g}: {w}" for g, w in b["widths"].items())
        lines.append(f"| {b['bits']:g} | {b['result']['kl']:.5f} | {plan['plan']['kl']:.5f} | {widths} |"
                     if plan else f"| {b['bits']:g} | {b['result']['kl']:.5f} | - | {widths} |")
    return "\n".join(lines)


def main() -> None:
    args = arguments(__doc__.splitlines()[0], seeds=False)
    calib = CalibSettings(samples=args.samples, seqlen=args.seqlen)
    each_model(args, "budget-oracle", lambda name, model, work: study(
        name, model, [float(b) for b in args.budgets.split(",")], calib, args.max_windows, work), table, BEGIN, END)


if __name__ == "__main__":
    main()
