"""Size budgets: plans by measurement against uniform recipes and against allocations made without measurement.

For each model (the bundled Mixtral; a differently shaped Qwen3-MoE trained by
``python evals/train_bundled.py --family qwen3_moe``; a Mixtral of the bundled shape trained without
the router's balance loss, so that its experts are used very unequally, by
``python evals/train_bundled.py --balance 0 --out evals/models/tiny-mixtral-unbalanced``), attention
at 4 bits (base recipe a4e3):

- uniform recipes a4e2, a4e3, a4e4;
- for each average expert width B (2.25, 2.5, 2.75, 3.0): ``moequant compress --bits B --kinds expert``,
  then, for each expert role, the same number of its modules at each width given by expert index
  (the lowest indices get the widest) and at random (3 seeds): the same tensor bytes;

each compressed by GPTQ on the same calibration windows and evaluated against the original on the
held-out text: KL divergence, top-1 agreement, perplexity. Writes ``results/budget-<name>.json``,
a chart ``results/budget-<name>.png`` and the table in ``README.md``; also times planning against
the compress run it precedes (``compress --bits B`` against ``compress --recipe`` of its plan, the
fastest of three runs each).

    python evals/bench_budget.py                  # the three models, ~18 min on two CPU cores
    python evals/bench_budget.py --models bundled
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from evals.run_matrix import replace_block  # noqa: E402
from moequant.arch.registry import adapter_for  # noqa: E402
from moequant.budget import PLAN_FILE, Budget  # noqa: E402
from moequant.budget.plan import planned_recipe  # noqa: E402
from moequant.builtin_data import bundled_model_path  # noqa: E402
from moequant.checkpoint.reader import CheckpointReader  # noqa: E402
from moequant.compression import CalibSettings, compress  # noqa: E402
from moequant.compression.plan import plan as recipe_specs  # noqa: E402
from moequant.evals.run import evaluate  # noqa: E402
from moequant.recipe import load_recipe  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = {"bundled": bundled_model_path(), "tiny-qwen3-moe": HERE / "models" / "tiny-qwen3-moe",
          "tiny-mixtral-unbalanced": HERE / "models" / "tiny-mixtral-unbalanced"}
MAKE = {"tiny-qwen3-moe": "python evals/train_bundled.py --family qwen3_moe",
        "tiny-mixtral-unbalanced": "python evals/train_bundled.py --balance 0 --out evals/models/tiny-mixtral-unbalanced"}
BEGIN, END = "<!-- budget:begin -->", "<!-- budget:end -->"
BASE = "a4e3"


def run(model: Path, out: Path, recipe, calib: CalibSettings, windows: int | None, budget: Budget | None = None
        ) -> dict:
    t0 = time.perf_counter()
    result = compress(model, out, recipe=recipe, calib=calib, overwrite=True, device="cpu", budget=budget)
    seconds = time.perf_counter() - t0
    report = evaluate(result.path, baseline=model, dataset="builtin", seqlen=calib.seqlen, device="cpu",
                      max_windows=windows)
    bits = [m["bits"] for m in result.record["modules"].values() if m["kind"] == "expert"]
    return {"bytes": report["size_bytes"], "data_bytes": sum(_data_bytes(f) for f in out.glob("*.safetensors")),
            "kl": report["kl_divergence"]["mean"], "top1": report["top1_agreement"],
            "perplexity": report["perplexity"], "baseline_perplexity": report["baseline_perplexity"],
            "expert_bits": sum(bits) / len(bits), "compress_s": round(seconds, 2)}


def timed(model: Path, out: Path, recipe, calib: CalibSettings, budget: Budget | None) -> float:
    """Seconds of one more compress run (timings are the fastest of three)."""
    t0 = time.perf_counter()
    compress(model, out, recipe=recipe, calib=calib, overwrite=True, device="cpu", budget=budget)
    return round(time.perf_counter() - t0, 2)


def _data_bytes(file: Path) -> int:
    """A safetensors file's tensor bytes, without its header (whose length varies with the names and offsets)."""
    with open(file, "rb") as f:
        return file.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def unmeasured(arch, chosen: dict[str, int], order: str, seed: int = 0) -> dict[str, int]:
    """The widths ``chosen`` gives each role of the experts handed out again within the role without
    measurement: by expert index or at random (so the tensors take the same bytes)."""
    infos = {i.name: i for layer in range(arch.config.num_layers) for i in arch.layer_linears(layer)}
    rng = random.Random(seed)
    out: dict[str, int] = {}
    for role in sorted({infos[n].role for n in chosen}):
        names = sorted((n for n in chosen if infos[n].role == role), key=lambda n: (infos[n].expert, infos[n].layer))
        if order == "random":
            rng.shuffle(names)
        out.update(zip(names, sorted((chosen[n] for n in names), reverse=True), strict=True))
    return out


def study(name: str, model: Path, budgets: list[float], seeds: list[int], calib: CalibSettings,
          windows: int | None, work: Path) -> dict:
    arch = adapter_for(CheckpointReader(model).config)
    base = load_recipe(BASE)
    infos = {i.name: i for layer in range(arch.config.num_layers) for i in arch.layer_linears(layer)}
    rows: dict = {"model": name, "calibration": vars(calib), "uniform": {}, "budgets": []}
    for recipe in ("a4e2", "a4e3", "a4e4"):
        rows["uniform"][recipe] = run(model, work / recipe, recipe, calib, windows)
        print(name, recipe, rows["uniform"][recipe], flush=True)
    for bits in budgets:
        budget = Budget(bits=bits, kinds=("expert",))
        planned = run(model, work / f"plan-{bits}", base, calib, windows, budget)  # compress --bits B
        recipe = load_recipe(work / f"plan-{bits}" / PLAN_FILE)
        replayed = run(model, work / f"replay-{bits}", recipe, calib, windows)  # compress --recipe PLAN.yaml
        with_plan = min([planned["compress_s"]] + [timed(model, work / "again", base, calib, budget) for _ in range(2)])
        alone = min([replayed["compress_s"]] + [timed(model, work / "again", recipe, calib, None) for _ in range(2)])
        entry = {"bits": bits, "widths": json.loads((work / f"plan-{bits}" / "moequant.json").read_text())["plan"][
            "widths"], "plan": planned, "replayed_identical": all(
                (work / f"replay-{bits}" / f.name).read_bytes() == f.read_bytes()
                for f in (work / f"plan-{bits}").glob("*.safetensors")),
            "plan_over_compress": round(with_plan / alone - 1, 3)}
        chosen = {n: s.bits for n, s in recipe_specs(arch, recipe).items()
                  if s is not None and infos[n].kind == "expert"}
        entry["index"] = run(model, work / f"index-{bits}",
                             planned_recipe(base, budget, unmeasured(arch, chosen, "index"), infos), calib, windows)
        entry["random"] = [run(model, work / f"random-{bits}-{s}",
                               planned_recipe(base, budget, unmeasured(arch, chosen, "random", s), infos), calib,
                               windows) for s in seeds]
        rows["budgets"].append(entry)
        print(name, bits, json.dumps(entry), flush=True)
    rows["checks"] = checks(rows)
    return rows


def checks(rows: dict) -> dict:
    """The targets: plans beat index and random allocations of their size, and lie below the uniform e2-e3 line."""
    e2, e3 = rows["uniform"]["a4e2"], rows["uniform"]["a4e3"]

    def line(size: int) -> float:
        return e2["kl"] + (size - e2["bytes"]) / (e3["bytes"] - e2["bytes"]) * (e3["kl"] - e2["kl"])

    out = {}
    for entry in rows["budgets"]:
        p = entry["plan"]
        out[str(entry["bits"])] = {
            "below_index": p["kl"] < entry["index"]["kl"],
            "below_every_random": all(p["kl"] < r["kl"] for r in entry["random"]),
            "below_uniform_line": p["kl"] < line(p["bytes"]),
            "same_data_bytes": all(x["data_bytes"] == p["data_bytes"] for x in [entry["index"], *entry["random"]]),
            "replayed_identical": entry["replayed_identical"],
            "plan_at_most_half_of_compress": entry["plan_over_compress"] <= 0.5,
        }
        same = [u for u in rows["uniform"].values() if u["data_bytes"] == p["data_bytes"]]
        if same:
            out[str(entry["bits"])]["below_uniform_of_its_size"] = all(p["kl"] < u["kl"] for u in same)
    return out


def chart(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    mb = 1e6
    uni = rows["uniform"]
    ax.plot([uni[r]["bytes"] / mb for r in uni], [uni[r]["kl"] for r in uni], "o", color="black",
            label="uniform a4e2 / a4e3 / a4e4")
    for r, u in uni.items():
        ax.annotate(r, (u["bytes"] / mb, u["kl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    e2, e3 = uni["a4e2"], uni["a4e3"]
    ax.plot([e2["bytes"] / mb, e3["bytes"] / mb], [e2["kl"], e3["kl"]], ":", color="gray", label="line a4e2-a4e3")
    b = rows["budgets"]
    ax.plot([e["plan"]["bytes"] / mb for e in b], [e["plan"]["kl"] for e in b], "-o", color="tab:blue",
            label="moequant plan (measured)")
    ax.plot([e["index"]["bytes"] / mb for e in b], [e["index"]["kl"] for e in b], "s", color="tab:orange",
            label="same widths by expert index")
    ax.plot([r["bytes"] / mb for e in b for r in e["random"]], [r["kl"] for e in b for r in e["random"]], "x",
            color="tab:red", label="same widths at random (3 seeds)")
    ax.set_xlabel("checkpoint size (MB)")
    ax.set_ylabel("KL divergence to the original (mean per token)")
    ax.set_title(f"{rows['model']}: size vs KL, attention 4-bit")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: dict) -> str:
    lines = [f"**{rows['model']}** (uniform: " + ", ".join(
        f"{r} {u['bytes'] / 1e6:.3f} MB KL {u['kl']:.5f}" for r, u in rows["uniform"].items()) + ")", "",
        "| expert bits | size (MB) | KL plan | KL by index | KL random (3 seeds) | top-1 plan | ppl plan | "
        "planning adds |", "|---|---|---|---|---|---|---|---|"]
    for e in rows["budgets"]:
        rnd = ", ".join(f"{r['kl']:.5f}" for r in e["random"])
        lines.append(f"| {e['bits']} | {e['plan']['bytes'] / 1e6:.3f} | {e['plan']['kl']:.5f} | "
                     f"{e['index']['kl']:.5f} | {rnd} | {e['plan']['top1']:.4f} | {e['plan']['perplexity']:.3f} | "
                     f"{e['plan_over_compress']:.0%} |")
    return "\n".join(lines)


def arguments(description: str, seeds: bool = True, calib_seeds: bool = False) -> argparse.Namespace:
    """The options this bench shares with ``budget_oracle.py`` and ``budget_seeds.py``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budgets", default="2.25,2.5,2.75,3.0")
    if seeds:
        ap.add_argument("--seeds", default="0,1,2", help="seeds of the random allocations")
    if calib_seeds:
        ap.add_argument("--calib-seeds", default="0,1,2,3", help="seeds of the calibration windows")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--no-readme", action="store_true")
    return ap.parse_args()


def models(names: str) -> list[tuple[str, Path]]:
    """The models named (comma-separated), each checked to be there."""
    out = []
    for name in names.split(","):
        model = MODELS[name]
        if not (model / "config.json").is_file():
            sys.exit(f"{model} is missing; make it with: {MAKE[name]}")
        out.append((name, model))
    return out


def into_readme(begin: str, end: str, tables: list[str]) -> None:
    """Replace the block between ``begin`` and ``end`` of ``README.md`` with ``tables``."""
    readme = HERE / "README.md"
    readme.write_text(replace_block(readme.read_text(), begin, end, "\n\n".join(tables)))


def each_model(args: argparse.Namespace, results: str, study_one: Callable[[str, Path, Path], dict],
               table_of: Callable[[dict], str], begin: str, end: str,
               after: Callable[[str, dict], None] | None = None) -> None:
    """``study_one(name, model, scratch folder)`` for each model of ``--models``: its rows written to
    ``results/<results>-<name>.json`` (and shown to ``after``), its table into ``README.md`` between ``begin`` and
    ``end`` unless ``--no-readme``."""
    tables = []
    for name, model in models(args.models):
        with tempfile.TemporaryDirectory() as work:
            rows = study_one(name, model, Path(work))
        (RESULTS / f"{results}-{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
        if after is not None:
            after(name, rows)
        tables.append(table_of(rows))
    if not args.no_readme:
        into_readme(begin, end, tables)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    calib = CalibSettings(samples=args.samples, seqlen=args.seqlen)

    def report(name: str, rows: dict) -> None:
        chart(rows, RESULTS / f"budget-{name}.png")
        print(json.dumps(rows["checks"], indent=2))

    each_model(args, "budget", lambda name, model, work: study(
        name, model, [float(b) for b in args.budgets.split(",")], [int(s) for s in args.seeds.split(",")], calib,
        args.max_windows, work), table, BEGIN, END, report)


if __name__ == "__main__":
    main()
