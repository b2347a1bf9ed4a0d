"""Offloaded experts: cache hit rate, prefetch accuracy and bytes copied per token while decoding real text.

The bundled model, compressed with a4e2 (4-bit attention, 2-bit experts), is loaded with
``offload="experts"`` on the CPU (the host standing in for the device: every cache decision is the
one a GPU run makes) with 2, 4 and 6 experts cached per layer of its 8, with and without the
prefetch, and decodes held-out text token by token (teacher-forced, after a 16-token prompt per
window). Reported per cache size:

- hit rate: lookups served by an expert already on the device when the layer began;
- prefetch accuracy: of the experts fetched for the next layer by its router applied to the
  current hidden state, the share that layer then used; prefetch recall: the share of all
  lookups that a prefetch served;
- bytes copied per token, against the same copies of 16-bit experts (the offloading that
  compression does not help), and for Mixtral-8x7B's expert size (same 8 experts, top-2, 32
  layers) at the loads per layer measured here.

    python evals/bench_offload.py        # about a minute on two CPU cores

Writes ``results/offload.json``. With a CUDA GPU, ``--device cuda`` times decoding against the
fully loaded model as well.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from moequant.builtin_data import bundled_model_path  # noqa: E402
from moequant.compression import CalibSettings, compress  # noqa: E402
from moequant.evals.run import evaluation_windows  # noqa: E402
from moequant.loading import load  # noqa: E402
from moequant.nn.offload import CacheStats, OffloadedExperts, reset_stats, total_stats  # noqa: E402
from moequant.packed.shapes import stored_bits  # noqa: E402
from moequant.recipe import load_recipe  # noqa: E402
from moequant.sizes import MIXTRAL_8X7B  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = 16


def decode(model, windows: torch.Tensor, device: str) -> tuple[CacheStats | None, int, float]:
    """Teacher-forced decoding of every window after its prompt: the caches' statistics, tokens, seconds."""
    tokens, seconds = 0, 0.0
    reset_stats(model)
    decoded = CacheStats()
    for window in windows:
        ids = window[None].to(device)
        with torch.inference_mode():
            out = model(input_ids=ids[:, :PROMPT], use_cache=True)
            prompt = total_stats(model)
            past = out.past_key_values
            start = time.perf_counter()
            for t in range(PROMPT, ids.shape[1]):
                out = model(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
                past = out.past_key_values
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
        tokens += ids.shape[1] - PROMPT
        after = total_stats(model)
        if after is not None:
            for name in ("hits", "misses", "loaded", "bytes", "prefetched", "prefetch_used"):
                setattr(decoded, name, getattr(decoded, name) + getattr(after, name) - getattr(prompt, name))
        reset_stats(model)
    return (decoded if total_stats(model) is not None else None), tokens, seconds


def expert_bytes(recipe: str, hidden: int, inter: int) -> tuple[int, int]:
    """Bytes of one expert (three linears) packed by ``recipe``'s expert rule, and in 16 bits."""
    rule = next(r for r in load_recipe(recipe).rules if r.kind == "expert")
    group = rule.group_size or load_recipe(recipe).group_size
    packed = 2 * stored_bits(inter, hidden, rule.bits, group) + stored_bits(hidden, inter, rule.bits, group)
    return packed // 8, 3 * hidden * inter * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", default="2,4,6")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--recipe", default="a4e2")
    args = ap.parse_args()
    torch.set_num_threads(2)
    bundled = bundled_model_path()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        out = compress(bundled, Path(work) / "c", recipe=args.recipe, calib=CalibSettings(samples=32, seqlen=128)).path
        windows = evaluation_windows("builtin", [out], 128, args.windows)
        model = load(out, device=args.device, backend="torch")
        _, tokens, full_s = decode(model, windows, args.device)
        del model
        config = json.loads((out / "config.json").read_text())
        layers, experts = config["num_hidden_layers"], config["num_local_experts"]
        packed, plain = expert_bytes(args.recipe, config["hidden_size"], config["intermediate_size"])
        big_packed, big_plain = expert_bytes(args.recipe, MIXTRAL_8X7B["hidden_size"],
                                             MIXTRAL_8X7B["intermediate_size"])
        for slots, prefetch in [(int(s), p) for s in args.slots.split(",") for p in (True, False)]:
            model = load(out, device=args.device, backend="torch", offload="experts", expert_slots=slots)
            if not prefetch:
                for m in model.modules():
                    if isinstance(m, OffloadedExperts):
                        m.next_router = None
            stats, tokens, seconds = decode(model, windows, args.device)
            loads_per_layer = stats.loaded / tokens / layers
            row = {
                "slots": slots, "prefetch": prefetch, "of_experts": experts, "tokens": tokens, "hit_rate": round(stats.hit_rate, 4),
                "prefetch_accuracy": round(stats.prefetch_accuracy, 4),
                "prefetch_recall": round(stats.prefetch_used / max(stats.hits + stats.misses, 1), 4),
                "loads_per_token_and_layer": round(loads_per_layer, 4),
                "bytes_per_token": round(stats.bytes / tokens), "bytes_per_token_16bit": round(
                    stats.loaded * plain / tokens),
                "mixtral_8x7b_bytes_per_token": round(loads_per_layer * MIXTRAL_8X7B["num_hidden_layers"] * big_packed),
                "mixtral_8x7b_bytes_per_token_16bit": round(
                    loads_per_layer * MIXTRAL_8X7B["num_hidden_layers"] * big_plain),
                "decode_tokens_per_s": round(tokens / seconds, 2), "full_decode_tokens_per_s": round(tokens / full_s, 2),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {"model": "bundled", "recipe": args.recipe, "device": args.device, "windows": args.windows,
              "prompt_tokens": PROMPT, "expert_bytes": packed, "expert_bytes_16bit": plain,
              "mixtral_8x7b_expert_bytes": big_packed, "mixtral_8x7b_expert_bytes_16bit": big_plain, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    name = "offload.json" if args.device == "cpu" else f"offload-{args.device.replace(':', '')}.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
