"""Speed and memory of a compressed model against its 16-bit original, on CPU.

Compresses the bundled tiny Mixtral (``moequant.builtin_data.bundled_model_path()``, or
``--model``) with a recipe (default a4e3) by RTN into a temporary folder, loads the
compressed model (torch kernels) and the original with ``moequant.load`` in float32 and in
bfloat16, and measures in one run, interleaving the models so that machine load hits them alike:

- decode: batch 1, greedy, ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt; the
  rate is ``(new - 1) / (t(new tokens) - t(1 token))``, so the prompt's prefill is not counted;
- prefill: one forward pass over 1 x ``--prefill-tokens`` tokens, without a cache;
- memory: bytes held in parameters and buffers (rotary tables included), against what the
  bits promise (codes, zero points, float16 scales and g_idx of every quantised module as
  recorded in ``moequant.json``, plus the 16-bit rest in the compute dtype).

Targets: the compressed model decodes no slower than 3x the original of the same dtype at
batch 1, and holds no more than the bits promise (+1%). Prints a table, writes
``evals/results/runtime-cpu.json``.

    python evals/bench_runtime.py [--model PATH] [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moequant.builtin_data import bundled_model_path  # noqa: E402
from moequant.checkpoint.reader import CheckpointReader  # noqa: E402
from moequant.compression import compress  # noqa: E402
from moequant.loading import load, model_bytes  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DECODE_TARGET = 3.0
MEMORY_SLACK = 1.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="original checkpoint (default: the bundled model)")
    ap.add_argument("--recipe", default="a4e3")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "evals" / "results" / "runtime-cpu.json")
    return ap.parse_args(argv)


def promised_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes the bits promise for the compressed checkpoint at ``path``, with 16-bit parts in ``dtype``.

    A quantised ``[N, K]`` module at ``b`` bits in ``G`` groups: ``N*K*b/8`` of codes, ``G*N*b/8``
    of zero points, ``2*G*N`` of float16 scales and ``4*K`` of int32 g_idx (experts' w1 and w3
    share one). Read from the record (``moequant.json``), not from the tensors.
    """
    modules = json.loads((path / "moequant.json").read_text())["modules"]
    quantised = {name: m for name, m in modules.items() if m["bits"] != 16}
    total = 0
    for name, m in quantised.items():
        (n, k), bits = m["shape"], m["bits"]
        groups = 1 if m["group_size"] == -1 else -(-k // m["group_size"])
        total += n * k * bits // 8 + groups * n * bits // 8 + 2 * groups * n
        total += 0 if name.endswith(".w3") else 4 * k
    reader = CheckpointReader(path)
    size = torch.tensor([], dtype=dtype).element_size()
    packed = {f"{name}.{key}" for name in quantised for key in ("qweight", "qzeros", "scales", "g_idx")}
    total += sum(reader.numel(name) * size for name in reader.names if name not in packed)
    return total


def rotary_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.model.rotary_emb.buffers())


def time_generate(model, prompt: torch.Tensor, new: int) -> float:
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def time_prefill(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    source = args.model or bundled_model_path()
    with tempfile.TemporaryDirectory(prefix="moequant-bench-runtime-") as tmp:
        t0 = time.perf_counter()
        compressed = compress(source, Path(tmp) / "compressed", recipe=args.recipe, method="rtn", device="cpu").path
        compress_s = time.perf_counter() - t0
        models = {}
        for dtype_name, dtype in DTYPES.items():
            models[("original", dtype_name)] = load(source, device="cpu", dtype=dtype)
            models[("compressed", dtype_name)] = load(compressed, device="cpu", dtype=dtype, backend="torch")
        promised = {name: promised_bytes(compressed, dtype) for name, dtype in DTYPES.items()}
        config = models[("original", "float32")].config
        prefill_len = min(args.prefill_tokens, config.max_position_embeddings)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, config.vocab_size, (1, args.prompt_tokens), generator=gen)
        long_ids = torch.randint(3, config.vocab_size, (1, prefill_len), generator=gen)

        samples: dict[tuple[str, str], dict[str, list[float]]] = {k: {"decode": [], "prefill": []} for k in models}
        with torch.inference_mode():
            for model in models.values():  # warm-up: one-time costs out of the timings
                time_generate(model, prompt, 2)
                time_prefill(model, long_ids)
            for _ in range(args.repeats):
                for key, model in models.items():
                    one = time_generate(model, prompt, 1)
                    full = time_generate(model, prompt, args.new_tokens)
                    samples[key]["decode"].append((args.new_tokens - 1) / max(full - one, 1e-9))
                    samples[key]["prefill"].append(prefill_len / time_prefill(model, long_ids))

        rows = []
        for (kind, dtype_name), model in models.items():
            held = model_bytes(model)
            row = {
                "model": kind, "dtype": dtype_name, "bytes": held,
                "decode_tokens_per_s": round(statistics.median(samples[(kind, dtype_name)]["decode"]), 2),
                "prefill_tokens_per_s": round(statistics.median(samples[(kind, dtype_name)]["prefill"]), 1),
                "decode_samples": [round(v, 2) for v in samples[(kind, dtype_name)]["decode"]],
                "prefill_samples": [round(v, 1) for v in samples[(kind, dtype_name)]["prefill"]],
            }
            if kind == "compressed":
                row["promised_bytes"] = promised[dtype_name] + rotary_bytes(model)
            rows.append(row)
        record = json.loads((compressed / "moequant.json").read_text())

    by = {(r["model"], r["dtype"]): r for r in rows}
    ratios = {}
    for dtype_name in DTYPES:
        o, c = by[("original", dtype_name)], by[("compressed", dtype_name)]
        ratios[dtype_name] = {
            "decode_slowdown": round(o["decode_tokens_per_s"] / c["decode_tokens_per_s"], 3),
            "prefill_slowdown": round(o["prefill_tokens_per_s"] / c["prefill_tokens_per_s"], 3),
            "memory_ratio": round(o["bytes"] / c["bytes"], 3),
            "held_over_promised": round(c["bytes"] / c["promised_bytes"], 4),
        }
    passed = {
        f"decode_within_{DECODE_TARGET:g}x_{d}": ratios[d]["decode_slowdown"] <= DECODE_TARGET for d in DTYPES
    } | {f"memory_as_promised_{d}": ratios[d]["held_over_promised"] <= MEMORY_SLACK for d in DTYPES}
    report = {
        "benchmark": "CPU decode/prefill speed and memory, compressed (torch kernels) vs original",
        "model": str(source),
        "model_config": {k: getattr(config, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts", "num_experts_per_tok",
            "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "recipe": args.recipe,
        "method": "rtn",
        "compress_seconds": round(compress_s, 2),
        "bits_per_weight_quantised": record["totals"]["bits_per_weight_quantised"],
        "settings": {"new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                     "prefill_tokens": prefill_len, "batch": 1, "repeats": args.repeats, "threads": args.threads},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "processor": platform.processor() or None},
        "rows": rows,
        "ratios": ratios,
        "targets": {"decode_slowdown": f"<= {DECODE_TARGET:g}", "held_over_promised": f"<= {MEMORY_SLACK}"},
        "passed": passed,
    }
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


def print_table(report: dict) -> None:
    s = report["settings"]
    print(f"{report['model']} with {report['recipe']} (RTN), {s['threads']} thread(s), medians of {s['repeats']}")
    header = f"{'model':<11} {'dtype':<9} {'MB held':>9} {'promised':>9} {'decode tok/s':>13} {'prefill tok/s':>14}"
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        promised = f"{r['promised_bytes'] / 1e6:9.3f}" if "promised_bytes" in r else f"{'':>9}"
        print(f"{r['model']:<11} {r['dtype']:<9} {r['bytes'] / 1e6:9.3f} {promised} "
              f"{r['decode_tokens_per_s']:13.1f} {r['prefill_tokens_per_s']:14.1f}")
    for d, q in report["ratios"].items():
        print(f"{d}: decode {q['decode_slowdown']:.2f}x slower (target <= {DECODE_TARGET:g}x), prefill "
              f"{q['prefill_slowdown']:.2f}x slower, original/compressed memory {q['memory_ratio']:.2f}x, "
              f"held/promised {q['held_over_promised']:.4f}")
    print("passed: " + ", ".join(f"{k}={v}" for k, v in report["passed"].items()))


if __name__ == "__main__":
    main()
