"""Train the tiny Mixtral model that ships inside moequant.

Reproducible from the bundled text alone (``moequant.builtin_data``, the "train" split): a
byte-level BPE tokenizer, then a small ``MixtralForCausalLM`` trained in fp32 on CPU and saved
in bfloat16 with the real Mixtral on-disk tensor names, its tokenizer and a ``training.json``
record. Held-out perplexity is measured on the "eval" split.

    python evals/train_bundled.py

The defaults reproduce the bundled model (recorded in its ``training.json``). A step (32
windows of 128 tokens) takes about 0.4 s on two idle cores and 0.7 s on one; the 600 steps
took 13 minutes on a shared machine. With the train split only ~100k tokens, the dropout and
the best-on-calib state keep the model from memorising it.

``--family qwen3_moe`` trains a second, differently shaped MoE the same way: a
``Qwen3MoeForCausalLM`` (16 experts, top-4, one KV head, per-head q/k norms) with the same tokenizer
and hyperparameters, saved by default to ``evals/models/tiny-qwen3-moe``. ``--balance 0`` trains
without the router's balance loss, so that experts end up used very unequally (the size-budget
evals' third model: ``--balance 0 --out evals/models/tiny-mixtral-unbalanced``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

VOCAB_SIZE = 2048
SEQ_LEN = 128
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
DEFAULT_OUT = {
    "mixtral": REPO_ROOT / "moequant" / "assets" / "tiny-mixtral",
    "qwen3_moe": REPO_ROOT / "evals" / "models" / "tiny-qwen3-moe",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=tuple(DEFAULT_OUT), default="mixtral")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: moequant/assets/tiny-mixtral, or evals/models/tiny-qwen3-moe for qwen3_moe",
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 reproduces the bundled model bit for bit")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--balance", type=float, default=0.02, help="router balance-loss coefficient; 0 trains the router unbalanced"
    )
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.25, help="train-only residual/embedding dropout")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--val-every", type=int, default=50, help="calib-split perplexity every N steps; the best state is kept"
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT[args.family]
    return args


def train_tokenizer(text: str):
    """Byte-level BPE on ``text``, wrapped as a transformers fast tokenizer that prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    bos, eos = SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {eos} {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
    )
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=SPECIAL_TOKENS[0],
        bos_token=bos,
        eos_token=eos,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer, text: str):
    """Token ids ``[T]`` (int64) of a whole text, ``<s>`` first, without the max-length warning."""
    import torch

    return torch.tensor(tokenizer.backend_tokenizer.encode(text).ids, dtype=torch.long)


def build_config(family: str = "mixtral"):
    """The untrained model's config: the bundled Mixtral, or the Qwen3-MoE of ``--family qwen3_moe``."""
    if family == "qwen3_moe":
        return build_qwen3_moe_config()
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=SEQ_LEN,  # the trained context; tools cap their windows here
        tie_word_embeddings=False,
        router_aux_loss_coef=0.02,
        output_router_logits=True,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
    )


def build_qwen3_moe_config():
    """16 narrow experts (top-4, renormalised), one KV head of width 32, every layer sparse."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,  # dense MLP width; unused, every layer is sparse
        moe_intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=SEQ_LEN,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.02,
        output_router_logits=True,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
    )


def model_class(family: str):
    """The transformers causal-LM class of ``family``."""
    if family == "qwen3_moe":
        from transformers import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM


def add_train_dropout(model, p: float) -> list:
    """Dropout on the embeddings and on each attention / MoE output before its residual add.

    Forward hooks, active only in ``model.train()``; the saved model is unchanged. The train
    split is small (~100k tokens), so without it the model memorises the text within a few
    epochs. Returns the hook handles.
    """
    import torch.nn.functional as F

    def drop_tensor(module, inputs, output):
        return F.dropout(output, p, module.training)

    def drop_first(module, inputs, output):
        return (F.dropout(output[0], p, module.training), *output[1:])

    handles = [model.model.embed_tokens.register_forward_hook(drop_tensor)]
    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_hook(drop_first))
        handles.append(layer.mlp.register_forward_hook(drop_tensor))
    return handles


def per_layer_balance_loss(router_logits, top_k: int):
    """Switch-style load-balancing loss, averaged over layers (each ``[tokens, E]`` logits).

    ``E * sum_e f_e * P_e`` per layer, with ``f_e`` the fraction of routing slots that pick
    expert ``e`` (times ``top_k``) and ``P_e`` its mean router probability; ``top_k`` when
    perfectly balanced. Taken per layer so that no layer can hide an idle expert behind another.
    """
    import torch

    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        n_experts = probs.shape[-1]
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, n_experts).sum(1)
        losses.append(n_experts * (chosen.float().mean(0) * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def window_nll(model, ids, seq_len: int = SEQ_LEN, batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token NLL over non-overlapping ``seq_len`` windows of ``ids [T]`` (tail dropped).

    Returns (mean NLL in nats, number of predicted tokens).
    """
    import torch

    n_windows = ids.numel() // seq_len
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size]
            logits = model(input_ids=batch, output_router_logits=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += nll.item()
            count += batch[:, 1:].numel()
    return total / count, count


def expert_counts(model, ids, seq_len: int = SEQ_LEN) -> list[list[int]]:
    """Tokens routed to each expert, per layer: ``[L][E]`` counts over windows of ``ids [T]``."""
    import torch

    n_windows = ids.numel() // seq_len
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=windows, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):  # each [B*S, E]
            top = logits.topk(cfg.num_experts_per_tok, dim=-1).indices
            counts[layer] += torch.bincount(top.flatten(), minlength=cfg.num_local_experts)
    return counts.tolist()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    import torch
    import transformers
    from transformers import GenerationConfig

    from moequant.builtin_data import builtin_text

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal weights and gradients slow CPU training tenfold
    torch.manual_seed(args.seed)

    t0 = time.time()
    tokenizer = train_tokenizer(builtin_text("train"))
    train_ids = encode(tokenizer, builtin_text("train"))
    calib_ids = encode(tokenizer, builtin_text("calib"))
    eval_ids = encode(tokenizer, builtin_text("eval"))
    print(
        f"tokenizer: {len(tokenizer)} tokens in {time.time() - t0:.1f}s; "
        f"train {train_ids.numel()} / calib {calib_ids.numel()} / eval {eval_ids.numel()} tokens",
        flush=True,
    )

    config = build_config(args.family)
    config.router_aux_loss_coef = args.balance
    model = model_class(args.family)(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    sampler = torch.Generator().manual_seed(args.seed)
    max_start = train_ids.numel() - SEQ_LEN

    hooks = add_train_dropout(model, args.dropout) if args.dropout > 0 else []
    best: dict = {"calib_ppl": math.inf, "step": 0, "state": None}
    history: list[dict] = []
    model.train()
    t_train = t_log = time.time()
    recent: list[float] = []
    for step in range(args.steps):
        starts = torch.randint(0, max_start + 1, (args.batch_size,), generator=sampler)
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()])
        out = model(input_ids=batch, output_router_logits=True)
        logits = out.logits[:, :-1]
        lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = per_layer_balance_loss(out.router_logits, config.num_experts_per_tok)
        (lm + config.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(lm.item())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            now = time.time()
            print(
                f"step {done}/{args.steps} lm_loss {sum(recent) / len(recent):.4f} "
                f"aux {aux.item():.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                f"{len(recent) / (now - t_log):.2f} steps/s",
                flush=True,
            )
            t_log = now
            history.append({"step": done, "train_lm_loss": sum(recent) / len(recent)})
            recent = []
        if args.val_every and (done % args.val_every == 0 or done == args.steps):
            model.eval()
            nll, _ = window_nll(model, calib_ids)
            model.train()
            history[-1]["calib_ppl"] = math.exp(nll)
            print(f"  calib perplexity {math.exp(nll):.2f}", flush=True)
            if math.exp(nll) < best["calib_ppl"]:
                best = {"calib_ppl": math.exp(nll), "step": done, "state": copy.deepcopy(model.state_dict())}
    train_seconds = time.time() - t_train
    for handle in hooks:
        handle.remove()
    if best["state"] is not None:
        model.load_state_dict(best["state"])
        print(f"kept the state of step {best['step']} (calib perplexity {best['calib_ppl']:.2f})", flush=True)

    model.eval()
    eval_nll, eval_tokens = window_nll(model, eval_ids)
    eval_ppl = math.exp(eval_nll)
    print(f"held-out perplexity (eval split, {eval_tokens} predicted tokens): {eval_ppl:.2f}", flush=True)
    usage = expert_counts(model, calib_ids)
    for layer, counts in enumerate(usage):
        print(f"  layer {layer} tokens per expert on calib: {counts}", flush=True)

    model.config.output_router_logits = False
    model.config.use_cache = True
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = model.to(torch.bfloat16)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}-", dir=args.out.parent))
    staging.chmod(0o755)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    record = {
        "config": {k: v for k, v in model.config.to_diff_dict().items() if k != "transformers_version"},
        "parameters": n_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "final_train_lm_loss": history[-1]["train_lm_loss"] if history else None,
        "dropout": args.dropout,
        "kept_step": best["step"] or args.steps,
        "kept_calib_perplexity": round(best["calib_ppl"], 3) if best["state"] is not None else None,
        "heldout_perplexity": round(eval_ppl, 3),
        "heldout_tokens": eval_tokens,
        "heldout_perplexity_note": "fp32 weights, eval split, non-overlapping 128-token windows",
        "note": "max_position_embeddings is the trained context (128 tokens), so tools cap calibration "
        "and evaluation windows there",
        "calib_expert_usage": usage,
        "tokens": {"train": train_ids.numel(), "calib": calib_ids.numel(), "eval": eval_ids.numel()},
        "history": history,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    for path in staging.iterdir():
        path.chmod(0o644)
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"saved to {args.out} ({size / 1e6:.2f} MB) after {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
