"""Time the batched GPTQ solver against a Python loop over experts on the same inputs.

Usage: python evals/bench_gptq_solver.py [--experts 8 --rows 512 --cols 512 --bits 4 --group-size 128
       --act-order/--no-act-order --device cpu --repeat 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from moequant.quant.gptq import gptq_quantize
from moequant.quant.types import QuantSpec


def _inputs(e: int, n: int, k: int, tokens: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, 16, generator=gen) * 3.0
    w = torch.randn(e, n, k, generator=gen)
    x = torch.randn(e, tokens, 16, generator=gen) @ basis.T + 0.1 * torch.randn(e, tokens, k, generator=gen)
    h = 2.0 * x.transpose(1, 2) @ x / tokens
    return w.to(device), h.to(device)


def _timed(fn, repeat: int, device: str):
    best, out = float("inf"), None
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rows", type=int, default=512, help="N, output features")
    p.add_argument("--cols", type=int, default=512, help="K, input features")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1, help="runs per variant; the best time is reported")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    w, h = _inputs(a.experts, a.rows, a.cols, a.tokens, a.device, a.seed)
    spec = QuantSpec(bits=a.bits, group_size=a.group_size, act_order=a.act_order)
    gptq_quantize(w[:1, :, :32], h[:1, :32, :32], QuantSpec(bits=a.bits, group_size=32))  # warm-up

    t_batched, batched = _timed(lambda: gptq_quantize(w, h, spec), a.repeat, a.device)
    t_loop, looped = _timed(
        lambda: [gptq_quantize(w[i], h[i], spec) for i in range(a.experts)], a.repeat, a.device
    )

    codes_equal = all(torch.equal(batched.codes[i], r.codes) for i, r in enumerate(looped))
    grids_equal = all(
        torch.equal(batched.scales[i], r.scales) and torch.equal(batched.zeros[i], r.zeros)
        for i, r in enumerate(looped)
    )
    err_diff = max(float((batched.error[i] - r.error).abs()) for i, r in enumerate(looped))
    print(
        f"E={a.experts} N={a.rows} K={a.cols} bits={a.bits} group={a.group_size} "
        f"act_order={a.act_order} device={a.device} threads={torch.get_num_threads()}"
    )
    print(f"batched: {t_batched:.3f} s")
    print(f"loop:    {t_loop:.3f} s")
    print(f"loop / batched: {t_loop / t_batched:.2f}x")
    print(f"codes equal: {codes_equal}  scales/zeros equal: {grids_equal}  max |error diff|: {err_diff:.2e}")
    print(f"mean relative output error: {float(batched.error.mean()):.5f}")


if __name__ == "__main__":
    main()
