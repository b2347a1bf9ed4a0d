"""Run a matrix of recipes and methods on a model, evaluate each against the original, and
regenerate the summary tables in ``evals/README.md``.

On the bundled model (the default) this runs on a laptop CPU in minutes:

    python evals/run_matrix.py                                   # a4e4, a4e3, a4e2 x gptq, rtn
    python evals/run_matrix.py --peer-python /path/to/peer/bin/python   # + llm-compressor side by side
    python evals/run_matrix.py --policy-study                    # starved-expert policies at tiny budgets

On Mixtral-8x7B with a GPU, the same matrix (reports land in evals/results/mixtral-8x7b/):

    python evals/run_matrix.py --model mistralai/Mixtral-8x7B-v0.1 --name mixtral-8x7b \\
        --calib wikitext2 --dataset wikitext2 --seqlen 2048 --samples 128 --device cuda

Every report is a ``moequant eval`` report (JSON + Markdown + chart) in ``evals/results/``.
The llm-compressor peer runs in its own environment (``evals/peer_llmcompressor.py``) on exactly
the calibration windows and evaluation windows that moequant uses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

from moequant.arch.registry import adapter_for
from moequant.builtin_data import bundled_model_path
from moequant.calib import load_text, load_tokenizer, random_windows, tokenize
from moequant.checkpoint.reader import CheckpointReader
from moequant.compression import CalibSettings, compress
from moequant.compression.plan import first_spec
from moequant.evals.report import write_report
from moequant.evals.run import evaluate, evaluation_windows
from moequant.recipe import load_recipe

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"
PBEGIN, PEND = "<!-- policies:begin -->", "<!-- policies:end -->"


def run_one(model: Path, out_root: Path, name: str, recipe: str, method: str, calib: CalibSettings, dataset: str,
            seqlen: int, device: str, max_windows: int | None, write: bool = True) -> dict:
    label = f"{name}-{recipe.removeprefix('mixtral-')}-{method}"
    t0 = time.perf_counter()
    result = compress(model, out_root / label, recipe=recipe, method=method, calib=calib, device=device,
                      overwrite=True)
    seconds = time.perf_counter() - t0
    report = evaluate(result.path, baseline=model, dataset=dataset, seqlen=seqlen, device=device,
                      max_windows=max_windows)
    report["compress_seconds"] = round(seconds, 2)
    report["method"] = method
    if write:
        write_report(report, RESULTS / f"{label}.json")
    print(f"{label} (seed {calib.seed}): ppl {report['perplexity']:.3f} (original {report['baseline_perplexity']:.3f}), "
          f"KL {report['kl_divergence']['mean']:.5f}, {report['size_bytes'] / 1e6:.2f} MB, "
          f"compress {seconds:.1f} s", flush=True)
    return report


def run_peer(peer_python: str, model: Path, name: str, recipe: str, calib: CalibSettings, dataset: str,
             seqlen: int, max_windows: int | None, size_bytes: int) -> dict:
    rec = load_recipe(recipe)
    arch = adapter_for(CheckpointReader(model).config)
    attn, expert = first_spec(arch, rec, "attention"), first_spec(arch, rec, "expert")
    max_positions = arch.config.max_position_embeddings
    tokenizer = load_tokenizer(model)
    calib_ids = random_windows(tokenize(tokenizer, load_text(calib.source, "calib")), calib.samples,
                               min(calib.seqlen, max_positions), calib.seed)
    seqlen = min(seqlen, max_positions)
    eval_ids = evaluation_windows(dataset, [model], seqlen, max_windows)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({"ids": calib_ids}, f"{tmp}/calib.safetensors")
        save_file({"ids": eval_ids}, f"{tmp}/eval.safetensors")
        cmd = [peer_python, str(HERE / "peer_llmcompressor.py"), "--model", str(model),
               "--calib-ids", f"{tmp}/calib.safetensors", "--eval-ids", f"{tmp}/eval.safetensors",
               "--attn-bits", str(attn.bits), "--expert-bits", str(expert.bits), "--group-size",
               str(attn.group_size), "--expert-group-size", str(expert.group_size), "--damp", str(rec.damp)]
        if not rec.act_order:
            cmd.append("--no-act-order")
        if not attn.sym:
            cmd.append("--asym")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"peer failed: {proc.stderr[-3000:]}")
    peer = json.loads(proc.stdout.strip().splitlines()[-1])
    label = f"{name}-{recipe.removeprefix('mixtral-')}-llmcompressor"
    report = {"model": label, "method": "llmcompressor-gptq", "recipe": {"name": recipe},
              "perplexity": peer["perplexity"], "baseline_perplexity": peer["original_perplexity"],
              "kl_divergence": {"mean": peer.get("kl_mean")}, "top1_agreement": peer.get("top1_agreement"),
              "size_bytes": size_bytes, "compress_seconds": round(wall, 2), "peer_oneshot_seconds": peer["seconds"],
              "windows": int(eval_ids.shape[0]), "seqlen": seqlen, "dataset": dataset,
              "calibration": {"samples": calib.samples, "seqlen": calib.seqlen, "seed": calib.seed},
              "peer": {k: v for k, v in peer.items() if k not in ("perplexity", "original_perplexity")}}
    print(f"{label} (seed {calib.seed}): ppl {peer['perplexity']:.3f} (original {peer['original_perplexity']:.3f}), "
          f"KL {peer.get('kl_mean', float('nan')):.5f}, {wall:.1f} s", flush=True)
    return report


def policy_study(model: Path, name: str, recipe: str, dataset: str, seqlen: int, device: str,
                 budgets: list[tuple[int, int]], seeds: list[int]) -> list[dict]:
    """Perplexity per starved-expert policy at tiny calibration budgets (where experts starve)."""
    from moequant.recipe import Recipe

    base = load_recipe(recipe)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for samples, length in budgets:
            for policy in ("routed", "augmented", "all"):
                ppls, kls = [], []
                starved = []
                for seed in seeds:
                    rec = Recipe.model_validate({**base.model_dump(), "expert_calibration": policy})
                    result = compress(model, Path(tmp) / "o", recipe=rec, calib=CalibSettings("builtin", samples,
                                      length, seed), device=device, overwrite=True)
                    starved.append(len(result.record["starved_experts"]))
                    report = evaluate(result.path, baseline=model, dataset=dataset, seqlen=seqlen, device=device)
                    ppls.append(report["perplexity"])
                    kls.append(report["kl_divergence"]["mean"])
                row = {"samples": samples, "seqlen": length, "policy": policy, "seeds": seeds,
                       "perplexity_mean": sum(ppls) / len(ppls), "perplexities": ppls,
                       "kl_mean": sum(kls) / len(kls), "kls": kls,
                       "starved_experts_mean": sum(starved) / len(starved)}
                rows.append(row)
                print(f"policy {policy:9s} {samples}x{length}: ppl {row['perplexity_mean']:.3f} "
                      f"KL {row['kl_mean']:.5f} "
                      f"({row['starved_experts_mean']:.1f} starved experts)", flush=True)
    (RESULTS / f"{name}-policies.json").write_text(json.dumps({"recipe": recipe, "rows": rows}, indent=2) + "\n")
    return rows


def aggregate(runs: list[dict]) -> dict:
    """One row of the matrix: the mean over calibration seeds, and each seed's perplexity."""
    first = runs[0]

    def mean(get) -> float | None:
        values = [get(r) for r in runs]
        return None if any(v is None for v in values) else sum(values) / len(values)

    return {
        "recipe": first["recipe"]["name"] if isinstance(first.get("recipe"), dict) else first.get("recipe"),
        "method": first["method"],
        "seeds": len(runs),
        "perplexity": mean(lambda r: r["perplexity"]),
        "perplexities": [round(r["perplexity"], 4) for r in runs],
        "baseline_perplexity": first["baseline_perplexity"],
        "kl_mean": mean(lambda r: (r.get("kl_divergence") or {}).get("mean")),
        "top1_agreement": mean(lambda r: r.get("top1_agreement")),
        "router_agreement": mean(lambda r: r.get("router_agreement")),
        "size_bytes": first["size_bytes"],
        "baseline_size_bytes": first.get("baseline_size_bytes"),
        "bits_per_weight": first.get("bits_per_weight"),
        "compress_seconds": mean(lambda r: r.get("compress_seconds")),
        "windows": first["windows"],
        "seqlen": first["seqlen"],
    }


def matrix_table(rows: list[dict]) -> str:
    lines = ["| recipe | method | perplexity (mean) | per seed | change | KL mean | top-1 | router | size (MB) | "
             "bits/weight | compress (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        change = 100 * (r["perplexity"] / r["baseline_perplexity"] - 1)
        seeds = ", ".join(f"{p:.3f}" for p in r["perplexities"])
        lines.append(
            f"| {r['recipe']} | {r['method']} | {r['perplexity']:.3f} | {seeds} | {change:+.2f}% | "
            f"{_fmt(r['kl_mean'], '.5f')} | {_fmt(r['top1_agreement'])} | {_fmt(r['router_agreement'])} | "
            f"{r['size_bytes'] / 1e6:.2f} | {_fmt(r['bits_per_weight'], '.2f')} | {_fmt(r['compress_seconds'], '.1f')} |")
    if rows and rows[0].get("baseline_size_bytes"):
        lines.append(f"| original | bf16 | {rows[0]['baseline_perplexity']:.3f} | - | - | - | - | - | "
                     f"{rows[0]['baseline_size_bytes'] / 1e6:.2f} | 16 | - |")
    return "\n".join(lines)


def policy_table(rows: list[dict]) -> str:
    policies = ("routed", "augmented", "all")
    lines = ["| calibration | starved experts (of 32) | " + " | ".join(f"{p}: KL / ppl" for p in policies) + " |",
             "|---|---|---|---|---|"]
    budgets = sorted({(r["samples"], r["seqlen"]) for r in rows})
    for s, L in budgets:
        by = {r["policy"]: r for r in rows if (r["samples"], r["seqlen"]) == (s, L)}
        cells = " | ".join(f"{by[p]['kl_mean']:.5f} / {by[p]['perplexity_mean']:.3f}" for p in policies)
        lines.append(f"| {s} x {L} tokens | {by['routed']['starved_experts_mean']:.1f} | {cells} |")
    return "\n".join(lines)


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return f"{head}{begin}\n{body}\n{end}{tail}"
    return f"{text.rstrip()}\n\n{begin}\n{body}\n{end}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--name", default="bundled")
    ap.add_argument("--recipes", default="a4e4,a4e3,a4e2")
    ap.add_argument("--methods", default="gptq,rtn")
    ap.add_argument("--calib", default="builtin")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048, help="capped at the model's positions")
    ap.add_argument("--dataset", default="builtin")
    ap.add_argument("--seqlen", type=int, default=2048, help="capped at the model's positions")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peer-python", default=None, help="interpreter of an environment with llmcompressor")
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds; the tables show the mean")
    ap.add_argument("--policy-study", action="store_true")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite evals/README.md")
    args = ap.parse_args()
    model = Path(args.model) if args.model else bundled_model_path()
    RESULTS.mkdir(exist_ok=True)
    readme = README.read_text() if README.is_file() else "# Evaluations\n"
    if args.policy_study:
        rows = policy_study(model, args.name, "a4e2", args.dataset, args.seqlen, args.device,
                            budgets=[(1, 64), (2, 64), (4, 64), (8, 128)], seeds=[0, 1, 2])
        readme = replace_block(readme, PBEGIN, PEND, policy_table(rows))
    else:
        rows = []
        seeds = [int(s) for s in args.seeds.split(",")]
        with tempfile.TemporaryDirectory() as tmp:
            for recipe in args.recipes.split(","):
                for method in args.methods.split(","):
                    runs = [run_one(model, Path(tmp), args.name, recipe, method,
                                    CalibSettings(args.calib, args.samples, args.calib_seqlen, seed), args.dataset,
                                    args.seqlen, args.device, args.max_windows, write=i == 0)
                            for i, seed in enumerate(seeds)]
                    rows.append(aggregate(runs))
                if args.peer_python:
                    size = rows[-1]["size_bytes"]
                    runs = [run_peer(args.peer_python, model, args.name, recipe,
                                     CalibSettings(args.calib, args.samples, args.calib_seqlen, seed), args.dataset,
                                     args.seqlen, args.max_windows, size) for seed in seeds]
                    rows.append(aggregate(runs))
        summary = {"model": str(model), "calibration": {"dataset": args.calib, "samples": args.samples,
                                                        "seqlen": args.calib_seqlen, "seeds": seeds},
                   "dataset": args.dataset, "rows": rows}
        (RESULTS / f"{args.name}-matrix.json").write_text(json.dumps(summary, indent=2) + "\n")
        readme = replace_block(readme, BEGIN, END, matrix_table(rows))
    if not args.no_readme:
        README.write_text(readme)
        print(f"updated {README}")


if __name__ == "__main__":
    sys.exit(main())
