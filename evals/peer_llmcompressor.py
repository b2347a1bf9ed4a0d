"""Run llm-compressor's GPTQ on a checkpoint with given settings and score it on given windows.

This script runs inside a separate environment that has `llmcompressor` installed (its
dependencies pin their own transformers); `evals/quality.py` and `evals/bench_gptq.py` call it
with the same calibration and evaluation windows that moequant uses, so the two are compared on
identical data. It prints one JSON object: seconds spent in `oneshot`, and the perplexity of the
original and of the quantised model on the evaluation windows, with the KL divergence of the
quantised model's next-token distribution from the original's and their top-1 agreement.

    PEER_PYTHON evals/peer_llmcompressor.py --model DIR --calib-ids calib.safetensors \\
        --eval-ids eval.safetensors --attn-bits 4 --expert-bits 3 [--expert-group-size 128]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from safetensors.torch import load_file


def score(model, windows: torch.Tensor, batch: int = 8) -> tuple[float, list[torch.Tensor]]:
    """Perplexity over every predicted token, and the next-token log-probabilities per chunk."""
    nll, count, logps = 0.0, 0, []
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch):
            ids = windows[s : s + batch]
            logits = model(input_ids=ids).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
            count += ids[:, 1:].numel()
            logps.append(logp)
    return math.exp(nll / count), logps


def agreement(base: list[torch.Tensor], model: list[torch.Tensor]) -> dict:
    """Mean KL(base || model) over tokens, and top-1 agreement."""
    kl = torch.cat([(b.exp() * (b - m)).sum(-1).flatten() for b, m in zip(base, model, strict=True)])
    top1 = torch.cat([(b.argmax(-1) == m.argmax(-1)).flatten() for b, m in zip(base, model, strict=True)])
    return {"kl_mean": kl.mean().item(), "top1_agreement": top1.float().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib-ids", required=True)
    ap.add_argument("--eval-ids", required=True)
    ap.add_argument("--attn-bits", type=int, default=4)
    ap.add_argument("--expert-bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--expert-group-size", type=int, default=None)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--no-act-order", action="store_true")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-original", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = load_file(args.calib_ids)["ids"]
    windows = load_file(args.eval_ids)["ids"]
    result: dict = {"peer": "llmcompressor", "version": __import__("llmcompressor").__version__}
    base_logps = None
    if not args.skip_original:
        original = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        result["original_perplexity"], base_logps = score(original, windows)
        del original
    with load_quantizable_moe():
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    def weights(bits: int, group: int) -> dict:
        return {"num_bits": bits, "type": "int", "symmetric": not args.asym, "strategy": "group",
                "group_size": group, "actorder": None if args.no_act_order else "static"}

    groups = {
        "attention": {"targets": [r"re:.*self_attn\.(q|k|v|o)_proj$"],
                      "weights": weights(args.attn_bits, args.group_size)},
        "experts": {"targets": [r"re:.*experts\.\d+\.(gate|up|down)_proj$"],
                    "weights": weights(args.expert_bits, args.expert_group_size or args.group_size)},
    }
    recipe = GPTQModifier(config_groups=groups, ignore=["lm_head", r"re:.*mlp\.gate$"],
                          dampening_frac=args.damp, block_size=128)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, processor=AutoTokenizer.from_pretrained(args.model), dataset=dataset, recipe=recipe,
            max_seq_length=calib.shape[1], num_calibration_samples=calib.shape[0])
    result["seconds"] = time.perf_counter() - t0
    model.eval()
    result["perplexity"], logps = score(model, windows)
    if base_logps is not None:
        result.update(agreement(base_logps, logps))
    quantised = [n for n, m in model.named_modules() if hasattr(m, "quantization_scheme")]
    result["quantised_modules"] = len(quantised)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
