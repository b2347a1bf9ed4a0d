"""``moequant generate``: run a (compressed) checkpoint on a prompt."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from moequant_cli.common import console, out


def generate(
    path: str = typer.Argument(..., help="Checkpoint folder (compressed or original) or hub id."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    backend: str = typer.Option("auto", "--backend", help="Kernels for packed weights: auto, torch or triton."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (checkpoint dtype on CUDA, float32 on CPU), "
                                                      "bfloat16, float16 or float32."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 for greedy decoding, else sampling temperature."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling."),
    offload: bool = typer.Option(False, "--offload", help="Keep the experts in host memory behind a cache on the device."),
    gpu_memory: str = typer.Option(None, "--gpu-memory", help="With --offload: device memory the weights may take, e.g. 10GiB."),
    expert_slots: int = typer.Option(None, "--expert-slots", help="With --offload: experts cached per layer (instead of --gpu-memory)."),
) -> None:
    """Continue PROMPT with the model at PATH and report the decoding speed."""
    import torch

    from moequant.calib import load_tokenizer
    from moequant.device import resolve_device
    from moequant.errors import MoequantError
    from moequant.kernels.dispatch import resolve_backend
    from moequant.loading import load
    from moequant.nn.offload import reset_stats, total_stats
    from moequant.numeric import SEED_MAX, check_float, check_int

    check_int(max_new_tokens, "--max-new-tokens", 1)
    check_float(temperature, "--temperature", 0.0, meaning="0: greedy decoding")
    check_int(seed, "--seed", 0, SEED_MAX)
    dev = resolve_device(device)
    model = load(path, device=dev, dtype=dtype, backend=backend, offload="experts" if offload else None,
                 gpu_memory=gpu_memory, expert_slots=expert_slots)
    tokenizer = load_tokenizer(Path(model.config._name_or_path))
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"].to(dev)
    if ids.shape[1] == 0:
        raise MoequantError("the prompt encodes to no tokens; give a longer --prompt")
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = dict(attention_mask=enc["attention_mask"].to(dev), pad_token_id=pad, top_k=None, top_p=None,
                    **sampling)
    with torch.inference_mode():
        # a short warm-up run pays one-time costs (kernel compilation, layout checks) outside the timing
        model.generate(ids, max_new_tokens=min(2, max_new_tokens), **settings)
        reset_stats(model)
        torch.manual_seed(seed)
        _sync(dev)
        start = time.perf_counter()
        result = model.generate(ids, max_new_tokens=max_new_tokens, **settings)
        _sync(dev)
        elapsed = time.perf_counter() - start
    new = result[0, ids.shape[1]:]
    out.print(prompt + tokenizer.decode(new, skip_special_tokens=True), highlight=False, markup=False)
    used = resolve_backend(backend, dev)
    console.print(
        f"{new.numel()} new tokens in {elapsed:.2f} s (prompt of {ids.shape[1]} included): "
        f"{new.numel() / max(elapsed, 1e-9):.1f} tokens/s "
        f"({dev}, {model.dtype}, {used} kernels)",
        highlight=False,
    )
    stats = total_stats(model)
    if stats is not None:
        console.print(f"expert cache: {stats.hit_rate:.1%} hits, prefetch accuracy {stats.prefetch_accuracy:.1%}, "
                      f"{stats.bytes / max(new.numel(), 1) / 2**20:.2f} MiB copied per token", highlight=False)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def register(app: typer.Typer) -> None:
    """Add ``moequant generate`` to ``app``."""
    app.command("generate")(generate)
