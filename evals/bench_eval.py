"""Benchmark the streamed evaluation: speed against a plain transformers forward, and peak memory.

1. Throughput: the streamed evaluation (``moequant.evals.streamed.evaluate_windows``, reading every
   weight from the checkpoint as it goes) against ``MixtralForCausalLM`` over the same windows in the
   same process, on the bundled model (or a random model of its shape when the bundle is missing).
   Runs alternate and the best of ``--repeat`` is kept. The transformers time is the forward plus the
   NLL (its load is reported apart); the target is a ratio of at least 0.8.
2. Peak memory: one subprocess per measurement runs the streamed evaluation on random checkpoints
   shaped like Mixtral-8x7B layers (hidden 4096, intermediate 14336, 8 experts, top-2, small vocab,
   bf16, written with safetensors directly) of 1 and 3 layers, alone and against itself as baseline.
   Reported: peak RSS (``VmHWM``), peak anonymous RSS (sampled from /proc: memory the process
   allocated, without the page cache of mapped weight files), and the RSS before the evaluation started. The checkpoints live under ``--tmp`` and are deleted afterwards (~2.8 GB per layer).

Usage: python evals/bench_eval.py [--windows 16 --seqlen 256 --repeat 3 --threads 1]
       [--layers 1 3 --memory-windows 2 --memory-seqlen 128] [--skip-memory] [--tmp /tmp]
       [--out evals/results/eval-bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moequant.builtin_data import BUNDLED_MODEL_DIR  # noqa: E402

BUNDLE_SHAPE = dict(
    vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
    tie_word_embeddings=False,
)
MIB = 1 << 20


# -- throughput --------------------------------------------------------------------------------------
def _bench_model(tmp: Path) -> tuple[Path, str]:
    if (BUNDLED_MODEL_DIR / "config.json").is_file():
        return BUNDLED_MODEL_DIR, "bundled tiny-mixtral"
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    path = tmp / "random-tiny-mixtral"
    MixtralForCausalLM(MixtralConfig(**BUNDLE_SHAPE)).save_pretrained(path, safe_serialization=True)
    return path, "random model of the bundled shape (bundle missing)"


def _windows(model: Path, count: int, seqlen: int, vocab: int) -> tuple[torch.Tensor, str]:
    from moequant.calib import consecutive_windows, load_text, load_tokenizer, tokenize
    from moequant.errors import MoequantError

    try:
        tokens = tokenize(load_tokenizer(model), load_text("builtin", "eval"))
        return consecutive_windows(tokens, seqlen, count), "builtin eval text"
    except MoequantError:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (count, seqlen), generator=gen), "random tokens (no tokenizer)"


def throughput(args: argparse.Namespace, tmp: Path) -> dict:
    from transformers import MixtralForCausalLM

    from moequant.evals.perplexity import next_token_nll
    from moequant.evals.streamed import evaluate_windows

    model, label = _bench_model(tmp)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    windows, text = _windows(model, args.windows, args.seqlen, vocab)
    batch = args.batch or windows.shape[0]
    tokens = windows.numel()

    def transformers_run() -> tuple[float, float, torch.Tensor]:
        t0 = time.perf_counter()
        hf = MixtralForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        t1 = time.perf_counter()
        nll = []
        with torch.no_grad():
            for chunk in torch.split(windows, batch):
                nll.append(next_token_nll(hf(input_ids=chunk, use_cache=False).logits, chunk))
        return t1 - t0, time.perf_counter() - t1, torch.cat(nll)

    streamed_s, hf_s, hf_load_s = [], [], []
    streamed_nll = hf_nll = None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        streamed_nll = evaluate_windows(model, windows, device="cpu", batch=batch).nll
        streamed_s.append(time.perf_counter() - t0)
        load_s, fwd_s, hf_nll = transformers_run()
        hf_load_s.append(load_s)
        hf_s.append(fwd_s)
    rel = float(((streamed_nll - hf_nll).abs() / hf_nll.abs().clamp_min(1e-12)).max())
    best_streamed, best_hf, best_load = min(streamed_s), min(hf_s), min(hf_load_s)
    return {
        "model": label,
        "windows_text": text,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "batch": batch,
        "tokens": tokens,
        "streamed_s": round(best_streamed, 4),
        "transformers_forward_s": round(best_hf, 4),
        "transformers_load_s": round(best_load, 4),
        "streamed_tokens_per_s": round(tokens / best_streamed, 1),
        "transformers_tokens_per_s": round(tokens / best_hf, 1),
        "transformers_with_load_tokens_per_s": round(tokens / (best_hf + best_load), 1),
        "ratio_vs_forward": round(best_hf / best_streamed, 3),
        "ratio_vs_forward_and_load": round((best_hf + best_load) / best_streamed, 3),
        "all_streamed_s": [round(t, 4) for t in streamed_s],
        "all_transformers_forward_s": [round(t, 4) for t in hf_s],
        "max_rel_nll_difference": rel,
        "target_ratio": 0.8,
    }


# -- Mixtral-shaped checkpoints -----------------------------------------------------------------------
def write_mixtral_shaped(root: Path, layers: int, vocab: int, seed: int = 0) -> list[Path]:
    """A ``layers``-deep random bf16 checkpoint of Mixtral-8x7B's layer shape, one shard per layer.

    Returns the shard files (layer shards first, then the globals shard).
    """
    from safetensors.torch import save_file

    from moequant.arch.registry import adapter_for
    from moequant.sizes import MIXTRAL_8X7B

    config = {**MIXTRAL_8X7B, "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 4096,
              "torch_dtype": "bfloat16"}
    adapter = adapter_for(config)
    c = adapter.config
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.bfloat16).normal_(0.0, std, generator=gen)

    shards, weight_map = [], {}
    for layer in range(layers):
        tensors = {name: torch.ones(c.hidden_size, dtype=torch.bfloat16) for name in adapter.norm_names(layer)}
        for info in adapter.layer_linears(layer):
            tensors[info.weight] = rnd(info.out_features, info.in_features)
        shards.append(_save(save_file, root / f"layer-{layer:05d}.safetensors", tensors, weight_map))
        del tensors
    globals_ = {adapter.embed_name: rnd(vocab, c.hidden_size, std=1.0),
                adapter.final_norm_name: torch.ones(c.hidden_size, dtype=torch.bfloat16),
                "lm_head.weight": rnd(vocab, c.hidden_size)}
    shards.append(_save(save_file, root / "globals.safetensors", globals_, weight_map))
    _write_meta(root, config, weight_map)
    return shards


def _save(save_file, path: Path, tensors: dict, weight_map: dict) -> Path:
    save_file(tensors, str(path))
    weight_map.update({name: path.name for name in tensors})
    return path


def _write_meta(root: Path, config: dict, weight_map: dict) -> None:
    (root / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def shallower_view(deep: Path, shards: list[Path], root: Path, layers: int) -> None:
    """A ``layers``-deep checkpoint that hard-links the first layer shards of ``deep``."""
    root.mkdir(parents=True, exist_ok=True)
    config = json.loads((deep / "config.json").read_text())
    config["num_hidden_layers"] = layers
    wanted = {s.name for s in shards[:layers]} | {shards[-1].name}
    index = json.loads((deep / "model.safetensors.index.json").read_text())["weight_map"]
    for name in wanted:
        os.link(deep / name, root / name)
    _write_meta(root, config, {k: v for k, v in index.items() if v in wanted})


# -- one memory measurement (runs in its own process) -----------------------------------------------------
def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def measure(args: argparse.Namespace) -> None:
    from moequant.evals.streamed import evaluate_windows

    torch.set_num_threads(args.threads)
    config = json.loads((Path(args.measure) / "config.json").read_text())
    windows = torch.randint(0, config["vocab_size"], (args.memory_windows, args.memory_seqlen),
                            generator=torch.Generator().manual_seed(0))
    before = _status()
    peak = {"RssAnon": before["RssAnon"], "VmRSS": before["VmRSS"]}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s = _status()
            peak["RssAnon"] = max(peak["RssAnon"], s["RssAnon"])
            peak["VmRSS"] = max(peak["VmRSS"], s["VmRSS"])
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    baseline = args.measure if args.with_baseline else None
    evaluate_windows(args.measure, windows, baseline=baseline, device="cpu")
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(json.dumps({
        "rss_before_mib": round(before["VmRSS"] / MIB, 1),
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec
        "peak_rss_mib": round(_status()["VmHWM"] / MIB, 1),
        "peak_rss_sampled_mib": round(peak["VmRSS"] / MIB, 1),
        "peak_anon_rss_mib": round(peak["RssAnon"] / MIB, 1),
        "anon_rss_before_mib": round(before["RssAnon"] / MIB, 1),
        "time_s": round(elapsed, 2),
    }))


def memory(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="moequant-eval-bench-", dir=args.tmp))
    rows = []
    try:
        deep_layers = max(args.layers)
        t0 = time.perf_counter()
        deep = tmp / f"mixtral-shaped-{deep_layers}"
        shards = write_mixtral_shaped(deep, deep_layers, args.vocab)
        write_s = time.perf_counter() - t0
        layer_bytes = shards[0].stat().st_size
        for layers in sorted(args.layers):
            path = deep
            if layers != deep_layers:
                path = tmp / f"mixtral-shaped-{layers}"
                shallower_view(deep, shards, path, layers)
            for with_baseline in (False, True):
                cmd = [sys.executable, __file__, "--measure", str(path), "--threads", str(args.threads),
                       "--memory-windows", str(args.memory_windows), "--memory-seqlen", str(args.memory_seqlen)]
                if with_baseline:
                    cmd.append("--with-baseline")
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"measurement failed: {proc.stderr.strip().splitlines()[-1:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row.update(layers=layers, baseline="itself" if with_baseline else None)
                rows.append(row)
                print(f"  {layers} layer(s), baseline {row['baseline']}: peak RSS {row['peak_rss_mib']:.0f} MiB, "
                      f"peak anon {row['peak_anon_rss_mib']:.0f} MiB, {row['time_s']:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "shape": "Mixtral-8x7B layers: hidden 4096, intermediate 14336, 8 experts, top-2, 32/8 heads, bf16",
        "vocab": args.vocab,
        "windows": args.memory_windows,
        "seqlen": args.memory_seqlen,
        "layer_file_mib": round(layer_bytes / MIB, 1),
        "one_expert_float32_mib": round(3 * 4096 * 14336 * 4 / MIB, 1),
        "checkpoint_write_s": round(write_s, 1),
        "runs": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=0, help="windows per chunk for both (0: all at once)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 3])
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--memory-windows", type=int, default=2)
    p.add_argument("--memory-seqlen", type=int, default=128)
    p.add_argument("--skip-memory", action="store_true", help="only throughput; keeps earlier memory results")
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "eval-bench.json"))
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--with-baseline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(args)
        return
    torch.set_num_threads(args.threads)
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                 "torch": torch.__version__, "cores": os.cpu_count()}}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t = throughput(args, Path(tmp))
    results["throughput"] = t
    print(f"{'':26}{'tokens/s':>12}{'seconds':>10}")
    print(f"{'streamed evaluation':26}{t['streamed_tokens_per_s']:>12.0f}{t['streamed_s']:>10.3f}")
    print(f"{'transformers forward':26}{t['transformers_tokens_per_s']:>12.0f}{t['transformers_forward_s']:>10.3f}")
    print(f"{'  + from_pretrained':26}{t['transformers_with_load_tokens_per_s']:>12.0f}"
          f"{t['transformers_forward_s'] + t['transformers_load_s']:>10.3f}")
    print(f"ratio streamed / forward {t['ratio_vs_forward']:.2f} (target >= 0.8), vs forward+load "
          f"{t['ratio_vs_forward_and_load']:.2f}; {t['model']}, {t['windows']} x {t['seqlen']} tokens, "
          f"max rel. NLL difference {t['max_rel_nll_difference']:.1e}", flush=True)
    if not args.skip_memory:
        print("peak memory of the streamed evaluation (Mixtral-8x7B-shaped layers):", flush=True)
        results["memory"] = memory(args)
        m = results["memory"]
        print(f"{'layers':>7}{'baseline':>10}{'peak RSS MiB':>14}{'peak anon MiB':>15}{'before MiB':>12}{'s':>7}")
        for r in m["runs"]:
            print(f"{r['layers']:>7}{str(r['baseline']):>10}{r['peak_rss_mib']:>14.0f}{r['peak_anon_rss_mib']:>15.0f}"
                  f"{r['rss_before_mib']:>12.0f}{r['time_s']:>7.1f}")
        print(f"(one layer file {m['layer_file_mib']:.0f} MiB bf16; one expert in float32 "
              f"{m['one_expert_float32_mib']:.0f} MiB)")
    out = Path(args.out)
    if args.skip_memory and out.is_file():
        previous = json.loads(out.read_text()).get("memory")
        if previous is not None:
            results["memory"] = previous
            print(f"kept the memory results already in {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
