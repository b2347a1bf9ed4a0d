"""Peak memory of `moequant compress --method rtn` on checkpoints of 1 and 3 layers of a real model's shape.

Builds random bf16 checkpoints with the real layer shapes of Mixtral-8x7B (hidden 4096,
intermediate 14336, 8 experts, 32/8 heads) or Qwen3-30B-A3B (hidden 2048, 128 experts of
intermediate 768, top-8, 32/4 heads of 128, q/k norms), a small vocabulary; compresses each in a
fresh process and reads that process's peak resident memory. Prints both peaks, their ratio and
the peak against one layer's bf16 size, and writes ``evals/results/memory.json`` (Mixtral) or
``memory-<shape>.json``.

Targets: the 3-layer run needs < 15% more memory than the 1-layer run, and < 2.5x one layer's
bf16 size.

    python evals/bench_memory.py [--shape mixtral-8x7b|qwen3-30b-a3b] [--workdir /tmp/moequant-bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 1024
SHAPES = {
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    },
    "mixtral-quarter": {  # Mixtral-8x7B with a quarter of its widths: expert-parallel timing on a CPU
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 1024,
        "intermediate_size": 3584, "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
    },
}


def config(shape: str, layers: int) -> dict:
    return {**SHAPES[shape], "num_hidden_layers": layers, "vocab_size": VOCAB, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def layer_tensors(shape: str, layer: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    from moequant.arch.registry import adapter_for

    adapter = adapter_for(config(shape, layer + 1))

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    out = {name: torch.ones(size, dtype=torch.bfloat16) for name, (size, _) in adapter.layer_vectors(layer).items()}
    for info in adapter.layer_linears(layer):
        out[info.weight] = rnd(info.out_features, info.in_features)
    return out


def build(path: Path, shape: str, layers: int) -> int:
    """Write a sharded checkpoint (one shard per layer); returns one layer's bytes."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    layer_bytes = 0
    shards = layers + 1
    for layer in range(layers):
        tensors = layer_tensors(shape, layer, gen)
        layer_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        name = f"model-{layer + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    hidden = SHAPES[shape]["hidden_size"]
    rest = {
        "model.embed_tokens.weight": (torch.randn(VOCAB, hidden, generator=gen) * 0.02).to(torch.bfloat16),
        "lm_head.weight": (torch.randn(VOCAB, hidden, generator=gen) * 0.02).to(torch.bfloat16),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
    }
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(rest, str(path / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config(shape, layers)))
    return layer_bytes


def peak_rss_of(cmd: list[str]) -> tuple[int, float]:
    """Run ``cmd`` in a fresh child of a fresh process; return its peak RSS (bytes) and seconds."""
    probe = (
        "import resource, subprocess, sys, time; t = time.time(); "
        "rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.time() - t, rc)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True)
    peak, seconds, rc = out.stdout.split()[-3:]
    if rc != "0":
        raise SystemExit(f"compress failed ({rc}): {out.stderr[-2000:]}")
    return int(peak), float(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moequant-bench-memory"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--recipe", default="a4e3")
    ap.add_argument("--shape", default="mixtral-8x7b", choices=list(SHAPES))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    # The command installed beside this interpreter: another `moequant` on PATH may be another version.
    beside = Path(sys.executable).parent / "moequant"
    moequant = str(beside) if beside.is_file() else shutil.which("moequant")
    if moequant is None:
        raise SystemExit("no moequant command beside this Python or on PATH; pip install -e . first")
    results = {}
    layer_bytes = 0
    for layers in (1, 3):
        src = args.workdir / f"{args.shape}-{layers}l"
        out = args.workdir / f"{args.shape}-{layers}l-out"
        if not (src / "config.json").is_file():
            t = time.time()
            layer_bytes = build(src, args.shape, layers)
            print(f"built {layers}-layer checkpoint in {time.time() - t:.0f} s", flush=True)
        elif not layer_bytes:
            layer_bytes = sum(t.numel() * t.element_size()
                              for t in layer_tensors(args.shape, 0, torch.Generator()).values())
        peak, seconds = peak_rss_of([moequant, "compress", str(src), "-o", str(out), "--method", "rtn",
                                     "--recipe", args.recipe, "--device", "cpu", "--overwrite"])
        results[layers] = {"peak_rss_bytes": peak, "seconds": round(seconds, 1)}
        print(f"{layers} layer(s): peak RSS {peak / 2**30:.2f} GiB, {seconds:.0f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    growth = results[3]["peak_rss_bytes"] / results[1]["peak_rss_bytes"]
    vs_layer = results[3]["peak_rss_bytes"] / layer_bytes
    report = {
        "benchmark": f"compress --method rtn peak memory, {args.shape} layer shapes",
        "recipe": args.recipe,
        "layer_bf16_bytes": layer_bytes,
        "runs": {f"{k}_layers": v for k, v in results.items()},
        "ratio_3_to_1_layers": round(growth, 4),
        "peak_over_layer_bf16": round(vs_layer, 4),
        "targets": {"ratio_3_to_1_layers": "< 1.15", "peak_over_layer_bf16": "< 2.5"},
        "met": growth < 1.15 and vs_layer < 2.5,
        "command": "moequant compress SRC -o OUT --method rtn --recipe RECIPE --device cpu --overwrite",
        "measured": "peak resident memory (ru_maxrss) of the moequant process, run from a fresh parent",
        "checkpoint": "bf16, one safetensors shard per layer plus one for the rest, model.safetensors.index.json",
        "machine": {"cpus": __import__("os").cpu_count(), "torch": torch.__version__},
    }
    print(f"\none layer bf16: {layer_bytes / 2**30:.2f} GiB")
    print(f"3-layer / 1-layer peak: {growth:.3f} (target < 1.15)")
    print(f"3-layer peak / one layer bf16: {vs_layer:.3f} (target < 2.5)")
    suffix = "" if args.shape == "mixtral-8x7b" else f"-{args.shape}"
    dest = Path(__file__).resolve().parent / "results" / f"memory{suffix}.json"
    dest.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {dest}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
