"""Time moequant's Triton kernels against bf16 torch on a CUDA GPU (Mixtral-8x7B shapes).

Usage:
    PYTHONPATH=. python evals/bench_kernels.py [--bits 2 3 4 8] [--tokens 1 2 4 8 16 64 256]
        [--moe-batch 1 8 32] [--samples 15] [--no-graphs] [--out PATH] [--sweep]
    PYTHONPATH=. TRITON_INTERPRET=1 python evals/bench_kernels.py --smoke
        (tiny shapes on the CPU interpreter: checks that the script runs, times mean nothing)

Dequantising matmul: every Mixtral linear shape (K in x N out) at each token count and bit width,
median time against ``torch`` bf16 ``F.linear``; achieved bandwidth = bytes of packed weights,
zeros and scales / time, against a measured device-to-device copy bandwidth. Fused MoE: one
Mixtral layer (8 experts, top-2, H=4096, I=14336) against a bf16 loop over the routed experts.
``--sweep`` also times candidate tile configurations (and, from 16 rows, dequantising once and
multiplying with torch) per case, each checked against the reference, and records them all.
Weights are rotated through enough copies that they do not sit in L2 between calls; each sample
replays a CUDA graph of many calls (``--no-graphs``: launched one by one) so that Python launch
cost is not timed. Packed weights are random words (every bit pattern is a valid code).
Writes ``evals/results/kernels-<device>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MATMUL_SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]  # (K in, N out)
MOE = {"experts": 8, "top_k": 2, "hidden": 4096, "inter": 14336}
TARGETS_ONE_TOKEN = {4: 3.3, 3: 4.2, 2: 5.5}
TARGET_COPY_FRACTION = 0.75  # and at least this share of the measured copy bandwidth
GROUP_SIZE = 128
ROTATE_BYTES = 512 << 20  # weights rotated through at least this many bytes: well past any L2
MAX_COPIES = 512
ERR_OK = 2e-2  # bf16 activations and output: relative error of a correct kernel stays far below


def device_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def copies_for(nbytes: int, smoke: bool) -> int:
    """How many copies of a weight to rotate through so that none is still cached when reused."""
    if smoke:
        return 2
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def random_words(shape: tuple[int, ...], device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """int32 words with uniformly random bit patterns."""
    raw = torch.randint(0, 256, (*shape, 4), dtype=torch.uint8, generator=gen, device=device)
    return raw.view(torch.int32).reshape(shape)


def random_packed(k: int, n: int, bits: int, device: torch.device, gen: torch.Generator, lead=()) -> dict:
    """A packed ``[n, k]`` linear (or ``lead + [n, k]`` stack) with random codes and zeros."""
    groups = k // GROUP_SIZE
    maxq = 2**bits - 1
    scales = (torch.rand(*lead, groups, n, generator=gen, device=device) + 0.5) * (2.0 / (maxq * k**0.5))
    return {
        "qweight": random_words((*lead, k * bits // 32, n), device, gen),
        "qzeros": random_words((*lead, groups, n * bits // 32), device, gen),
        "scales": scales.to(torch.float16),
    }


def packed_bytes(p: dict) -> int:
    return sum(t.numel() * t.element_size() for t in p.values())


def clone_all(p: dict) -> dict:
    return {key: t.clone() for key, t in p.items()}


class Timer:
    """Median seconds per call of ``run(i)`` (``i`` selects the weight copy)."""

    def __init__(self, device: torch.device, samples: int, graphs: bool):
        self.device = device
        self.samples = samples
        self.graphs = graphs and device.type == "cuda"
        self.modes: set[str] = set()

    def __call__(self, run: Callable[[int], object], copies: int) -> float:
        calls = max(copies, 8) if self.device.type == "cuda" else copies
        for i in range(min(copies, 2)):
            run(i)  # compile and warm up
        if self.device.type != "cuda":
            return self._host(run, copies, calls)
        torch.cuda.synchronize()
        replay = self._capture(run, copies, calls) if self.graphs else None
        if replay is None:
            self.modes.add("eager")

            def replay() -> None:
                for i in range(calls):
                    run(i % copies)

        else:
            self.modes.add("cuda_graph")
        replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(self.samples):
            start.record()
            replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        return statistics.median(times)

    def _capture(self, run, copies: int, calls: int) -> Callable[[], None] | None:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(min(copies, 2)):
                    run(i)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(calls):
                    run(i % copies)
            return graph.replay
        except RuntimeError as exc:
            print(f"  (CUDA graph capture failed, timing eager launches: {str(exc).splitlines()[0]})")
            torch.cuda.synchronize()
            return None

    def _host(self, run, copies: int, calls: int) -> float:
        times = []
        for _ in range(self.samples):
            t0 = time.perf_counter()
            for i in range(calls):
                run(i % copies)
            times.append((time.perf_counter() - t0) / calls)
        self.modes.add("host")
        return statistics.median(times)


class Deadline:
    """A wall-clock budget for the sweeps, so that a run on a lent GPU ends with results."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() > self.end


def config_dict(cfg) -> dict:
    return {key: getattr(cfg, key) for key in cfg.__dataclass_fields__}


def matmul_candidates(m: int, n: int, k: int, device: torch.device) -> list:
    """Tile configurations to try for ``[m, k] @ [k, n]``: gemv shapes for one row, dot tiles for
    more, weights-left dot tiles up to 64 rows (one row too)."""
    import triton

    from moequant.kernels.triton_launch import device_programs
    from moequant.kernels.triton_matmul import MatmulConfig
    from moequant.kernels.triton_split import split_for

    out = []
    programs = device_programs(device)
    if m == 1:
        for bn, bk, warps in [(128, 128, 4), (64, 128, 4), (64, 64, 2), (32, 128, 2)]:  # wider tiles spill
            splits = {1}
            for target in (programs, 2 * programs, 4 * programs):
                splits.add(split_for(k, bk, triton.cdiv(n, bn), target))
            out += [MatmulConfig(1, bn, bk, sp, warps, 3, gemv=True) for sp in sorted(splits)]
            # The same tile without software pipelining (its K loop waits on each tile's loads).
            out.append(
                MatmulConfig(
                    1, bn, bk, split_for(k, bk, triton.cdiv(n, bn), 2 * programs), warps, 1, gemv=True
                )
            )
    if m >= 2:
        bm = 16 if m <= 16 else min(64, 1 << (m - 1).bit_length())
        tiles = [(bm, 64, 128, 4, 4), (bm, 128, 64, 4, 3)]
        if m > 64:
            tiles = [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 128, 4, 3)]
        for bm_, bn, bk, warps, stages in tiles:
            splits = {1, split_for(k, bk, triton.cdiv(m, bm_) * triton.cdiv(n, bn), programs)}
            out += [MatmulConfig(bm_, bn, bk, sp, warps, stages) for sp in sorted(splits)]
    if m <= 64:  # the weights as the dot's left operand (tensor cores from one row on)
        bm = 16 if m <= 16 else 1 << (m - 1).bit_length()
        for bn, bk, warps in [(128, 128, 4), (128, 64, 4), (64, 128, 4)]:
            tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
            splits = {1, split_for(k, bk, tiles, programs), split_for(k, bk, tiles, 2 * programs)}
            out += [MatmulConfig(bm, bn, bk, sp, warps, 3, weights_left=True) for sp in sorted(splits)]
            if bn == 128 and bk == 128:  # without software pipelining, and with more tiles in flight
                sp = split_for(k, bk, tiles, 2 * programs)
                out += [MatmulConfig(bm, bn, bk, sp, warps, stages, weights_left=True) for stages in (1, 5)]
    return out


def time_candidate(config: dict, run: Callable[[int], torch.Tensor], copies: int, want, timer: Timer) -> dict:
    """One sweep entry: ``run(i)`` checked against ``want`` on copy 0, then timed over ``copies``.

    A candidate that fails is recorded with its error, not raised."""
    try:
        err = rel_err(run(0), want)
        t = timer(run, copies)
    except Exception as exc:  # noqa: BLE001
        return {"config": config, "error": str(exc).splitlines()[0][:200], "ok": False}
    return {"config": config, "ms": t * 1e3, "max_rel_err": err, "ok": err < ERR_OK}


def best_of(sweep: list[dict], base_s: float, nbytes: int, copy_bw: float) -> dict | None:
    """The fastest correct entry of a sweep, with its speedup and copy-bandwidth fraction; printed."""
    best = min((c for c in sweep if c["ok"]), key=lambda c: c["ms"], default=None)
    if best is None:
        return None
    t = best["ms"] / 1e3
    print(f"    sweep best {best['ms']:.4f} ms ({base_s / t:.2f}x): {best['config']}")
    return {**best, "speedup": base_s / t, "copy_bw_fraction": nbytes / t / copy_bw}


def sweep_matmul(
    x, copies: list[dict], bits: int, want, timer: Timer, device, deadline: Deadline
) -> list[dict]:
    """Time every candidate configuration on the same inputs; each checked against ``want``."""
    k = x.shape[-1]
    n = copies[0]["qweight"].shape[1]
    results = []
    if x.shape[0] >= 16:
        run = functools.partial(_dequant_then_matmul, x, copies, bits)
        results.append(time_candidate({"dequant_then_matmul": True}, run, len(copies), want, timer))
    for cfg in matmul_candidates(x.shape[0], n, k, device):
        if deadline.passed():
            break
        run = functools.partial(_packed_linear_cfg, x, copies, bits, cfg)
        results.append(time_candidate(config_dict(cfg), run, len(copies), want, timer))
    return results


def _dequant_then_matmul(x, copies: list[dict], bits: int, i: int):
    from moequant.kernels.triton_matmul import dequantize_triton

    return x @ dequantize_triton(**copies[i], g_idx=None, bits=bits, group_size=GROUP_SIZE, dtype=x.dtype)


def _packed_linear_cfg(x, copies: list[dict], bits: int, cfg, i: int):
    from moequant.kernels.triton_matmul import dequant_matmul_triton

    return dequant_matmul_triton(x, **copies[i], g_idx=None, bits=bits, group_size=GROUP_SIZE, config=cfg)


def moe_candidates(slots: int, experts: int, hidden: int, inter: int, device: torch.device) -> list:
    """MoE kernel configurations to try for ``slots`` routed slots."""
    import triton

    from moequant.kernels.triton_launch import device_programs
    from moequant.kernels.triton_moe import MoeConfig
    from moequant.kernels.triton_split import split_for

    programs = device_programs(device)
    out = []
    if slots <= 2 * experts:
        for bn, bk, warps in [(64, 128, 4), (128, 128, 4), (64, 64, 2), (32, 128, 2)]:

            def decode_splits(target: int, bn: int = bn, bk: int = bk) -> tuple[int, int]:
                """``(down, gate/up)`` splits to about ``target`` programs."""
                return (
                    split_for(inter, bk, slots * triton.cdiv(hidden, bn), target),
                    split_for(hidden, bk, slots * triton.cdiv(inter, bn), target),
                )

            splits = {(1, 1)}
            for target in (programs, 2 * programs, 4 * programs):
                down, gate_up = decode_splits(target)
                splits |= {(down, 1), (down, gate_up)}
            out += [
                MoeConfig(1, bn, bk, bk, sp, warps, 3, gemv=True, split_k_gate_up=sp13)
                for sp, sp13 in sorted(splits)
            ]
            sp, sp13 = decode_splits(4 * programs)
            out.append(MoeConfig(1, bn, bk, bk, sp, warps, 1, gemv=True, split_k_gate_up=sp13))
            if warps == 4:  # each slot's row in a 16-row dot with the weights on the left
                for target, stages in [(2 * programs, 3), (4 * programs, 3), (4 * programs, 5)]:
                    sp, sp13 = decode_splits(target)
                    out.append(
                        MoeConfig(1, bn, bk, bk, sp, 4, stages, gemv=True, split_k_gate_up=sp13, weights_left=True)
                    )
    if slots >= 8:
        per_expert = slots / experts
        bm = 16 if per_expert <= 16 else 32
        for bn, bk, warps, stages in [(64, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4), (32, 128, 4, 3)]:
            blocks = min(experts, slots) + triton.cdiv(slots, bm)
            splits = {1, split_for(inter, bk, blocks * triton.cdiv(hidden, bn), programs)}
            out += [MoeConfig(bm, bn, bk, bk, sp, warps, stages) for sp in sorted(splits)]
        for bn, bk in [(128, 128), (64, 128), (128, 64)]:  # the weights as the dots' left operand
            blocks = min(experts, slots) + triton.cdiv(slots, bm)
            splits = {1, split_for(inter, bk, blocks * triton.cdiv(hidden, bn), programs)}
            out += [MoeConfig(bm, bn, bk, bk, sp, 4, 3, weights_left=True) for sp in sorted(splits)]
    return out


def sweep_moe(x, ids, weights, experts: list, want, timer: Timer, device, deadline: Deadline) -> list[dict]:
    """Time every candidate MoE configuration on the same routing; each checked against ``want``."""
    a, b = experts[0]
    results = []
    for cfg in moe_candidates(ids.numel(), a.num_experts, x.shape[1], b.in_features, device):
        if deadline.passed():
            break
        run = functools.partial(_packed_moe_cfg, x, ids, weights, experts, cfg)
        results.append(time_candidate(config_dict(cfg), run, len(experts), want, timer))
    return results


def _packed_moe_cfg(x, ids, weights, experts: list, cfg, i: int):
    from moequant.kernels.triton_moe import fused_moe_triton

    return fused_moe_triton(x, ids, weights, *experts[i], config=cfg)


def copy_bandwidth(device: torch.device, timer: Timer, smoke: bool) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written).

    Float32 elements: a byte-wise copy measured 2.8 TB/s on an H200, below the 3.7 TB/s that a
    bf16 matrix-vector product reached in the same run."""
    nbytes = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda i: dst.copy_(src), 1)
    return 2 * nbytes / t


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30))


def bench_matmul(args, device, timer: Timer, copy_bw: float, gen: torch.Generator) -> list[dict]:
    from moequant.kernels.reference import dequant_matmul_ref
    from moequant.kernels.triton_matmul import DEQUANT_MIN_ROWS, dequant_matmul_triton, pick_config

    dtype = torch.float32 if args.smoke else torch.bfloat16
    rows = []
    for k, n in args.shapes:
        w16 = (torch.randn(n, k, generator=gen, device=device) * k**-0.5).to(dtype)
        w16s = [w16] + [
            w16.clone() for _ in range(copies_for(w16.numel() * w16.element_size(), args.smoke) - 1)
        ]
        xs = {m: torch.randn(m, k, generator=gen, device=device).to(dtype) for m in args.tokens}
        base = {m: timer(functools.partial(_linear, xs[m], w16s), len(w16s)) for m in args.tokens}
        del w16s, w16
        for bits in args.bits:
            packed = random_packed(k, n, bits, device, gen)
            nbytes = packed_bytes(packed)
            copies = [packed] + [clone_all(packed) for _ in range(copies_for(nbytes, args.smoke) - 1)]
            x_check = xs[args.tokens[0]]
            g_idx = torch.arange(k, device=device, dtype=torch.int32) // GROUP_SIZE
            got = dequant_matmul_triton(x_check, **packed, g_idx=None, bits=bits, group_size=GROUP_SIZE)
            err = rel_err(got, dequant_matmul_ref(x_check.float(), **packed, g_idx=g_idx, bits=bits))
            for m in args.tokens:
                t = timer(functools.partial(_packed_linear, xs[m], copies, bits), len(copies))
                sweep = None
                if (
                    args.sweep
                    and bits in args.sweep_bits
                    and m in args.sweep_tokens
                    and not args.deadline.passed()
                ):
                    want = dequant_matmul_ref(xs[m].float(), **packed, g_idx=g_idx, bits=bits)
                    sweep = sweep_matmul(xs[m], copies, bits, want, timer, device, args.deadline)
                row = {
                    "K": k,
                    "N": n,
                    "tokens": m,
                    "bits": bits,
                    "group_size": GROUP_SIZE,
                    "ms": t * 1e3,
                    "bf16_ms": base[m] * 1e3,
                    "speedup": base[m] / t,
                    "bf16_GBps": n * k * 2 / base[m] / 1e9,
                    "weight_bytes": nbytes,
                    "GBps": nbytes / t / 1e9,
                    "copy_bw_fraction": nbytes / t / copy_bw,
                    "max_rel_err": err,
                    "config": {"dequant_then_matmul": True}
                    if m >= DEQUANT_MIN_ROWS
                    else config_dict(
                        pick_config(m, n, k, GROUP_SIZE, device, bits=bits, half=dtype != torch.float32)
                    ),
                }
                if sweep:
                    row["sweep"] = sweep
                    best = best_of(sweep, base[m], nbytes, copy_bw)
                    if best:
                        row["best"] = best
                rows.append(row)
                print(
                    f"  {k:>5}x{n:<5} m={m:<4} {bits}-bit  {row['ms']:8.4f} ms  bf16 {row['bf16_ms']:8.4f} ms  "
                    f"{row['speedup']:5.2f}x  {row['GBps']:7.1f} GB/s ({row['copy_bw_fraction']:.0%} of copy)  "
                    f"err {err:.1e}"
                )
            del copies, packed
    return rows


def bench_moe(args, device, timer: Timer, copy_bw: float, gen: torch.Generator) -> list[dict]:
    from moequant.kernels.reference import fused_moe_ref
    from moequant.kernels.triton_moe import fused_moe_triton, pick_moe_config
    from moequant.packed.experts import PackedExperts

    e, top_k, hidden, inter = args.moe["experts"], args.moe["top_k"], args.moe["hidden"], args.moe["inter"]
    dtype = torch.float32 if args.smoke else torch.bfloat16
    w1 = (torch.randn(e, inter, hidden, generator=gen, device=device) * hidden**-0.5).to(dtype)
    w3 = (torch.randn(e, inter, hidden, generator=gen, device=device) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(e, hidden, inter, generator=gen, device=device) * inter**-0.5).to(dtype)
    rows = []
    for batch in args.moe_batch:
        x = torch.randn(batch, hidden, generator=gen, device=device).to(dtype)
        logits = torch.randn(batch, e, generator=gen, device=device)
        weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        plan = []
        for ex in range(e):
            tok, slot = (ids == ex).nonzero(as_tuple=True)
            if tok.numel():
                plan.append((ex, tok, weights[tok, slot].to(dtype)[:, None]))

        def bf16_loop(_i: int, x=x, plan=plan) -> torch.Tensor:
            out = torch.zeros_like(x)
            for ex, tok, wt in plan:
                xe = x[tok]
                h = F.silu(F.linear(xe, w1[ex])) * F.linear(xe, w3[ex])
                out.index_add_(0, tok, F.linear(h, w2[ex]) * wt)
            return out

        base = timer(bf16_loop, 1)
        active = len(plan)
        for bits in args.bits:
            w13p = random_packed(hidden, 2 * inter, bits, device, gen, lead=(e,))
            w2p = random_packed(inter, hidden, bits, device, gen, lead=(e,))
            experts = [
                (
                    PackedExperts(**w13p, g_idx=_g(hidden, device), bits=bits, group_size=GROUP_SIZE),
                    PackedExperts(**w2p, g_idx=_g(inter, device), bits=bits, group_size=GROUP_SIZE),
                )
            ]
            total = packed_bytes(w13p) + packed_bytes(w2p)
            for _ in range(copies_for(total, args.smoke) - 1):
                experts.append(
                    (
                        PackedExperts(
                            **clone_all(w13p), g_idx=_g(hidden, device), bits=bits, group_size=GROUP_SIZE
                        ),
                        PackedExperts(
                            **clone_all(w2p), g_idx=_g(inter, device), bits=bits, group_size=GROUP_SIZE
                        ),
                    )
                )
            for a, b in experts:  # settle sorted_groups before any graph capture (it synchronises)
                a.has_sorted_groups(), b.has_sorted_groups()
            a, b = experts[0]
            err = rel_err(
                fused_moe_triton(x, ids, weights, a, b), fused_moe_ref(x.float(), ids, weights, a, b)
            )
            t = timer(functools.partial(_packed_moe, x, ids, weights, experts), len(experts))
            active_bytes = total * active // e
            sweep = None
            if args.sweep and bits in args.sweep_bits and not args.deadline.passed():
                want = fused_moe_ref(x.float(), ids, weights, a, b)
                sweep = sweep_moe(x, ids, weights, experts, want, timer, device, args.deadline)
            row = {
                "batch": batch,
                "bits": bits,
                "experts": e,
                "top_k": top_k,
                "hidden": hidden,
                "inter": inter,
                "active_experts": active,
                "ms": t * 1e3,
                "bf16_loop_ms": base * 1e3,
                "speedup": base / t,
                "active_weight_bytes": active_bytes,
                "GBps": active_bytes / t / 1e9,
                "copy_bw_fraction": active_bytes / t / copy_bw,
                "max_rel_err": err,
                "config": config_dict(
                    pick_moe_config(
                        batch * top_k, e, hidden, inter, GROUP_SIZE, GROUP_SIZE, device, bits=bits
                    )
                ),
            }
            if sweep:
                row["sweep"] = sweep
                best = best_of(sweep, base, active_bytes, copy_bw)
                if best:
                    row["best"] = best
            rows.append(row)
            print(
                f"  moe batch={batch:<3} {bits}-bit  {row['ms']:8.4f} ms  bf16 loop {row['bf16_loop_ms']:8.4f} ms  "
                f"{row['speedup']:5.2f}x  experts {active}/{e}  {row['GBps']:7.1f} GB/s "
                f"({row['copy_bw_fraction']:.0%} of copy)  err {err:.1e}"
            )
            del experts, w13p, w2p
    return rows


def _linear(x: torch.Tensor, weights: list[torch.Tensor], i: int) -> torch.Tensor:
    return F.linear(x, weights[i])


def _packed_linear(x: torch.Tensor, copies: list[dict], bits: int, i: int) -> torch.Tensor:
    from moequant.kernels.triton_matmul import dequant_matmul_triton

    return dequant_matmul_triton(x, **copies[i], g_idx=None, bits=bits, group_size=GROUP_SIZE)


def _packed_moe(x, ids, weights, experts: list, i: int) -> torch.Tensor:
    from moequant.kernels.triton_moe import fused_moe_triton

    return fused_moe_triton(x, ids, weights, *experts[i])


def _g(k: int, device: torch.device) -> torch.Tensor:
    return torch.arange(k, device=device, dtype=torch.int32) // GROUP_SIZE


def one_token_targets(rows: list[dict]) -> dict:
    """Per bit width with a target: speedup and share of copy bandwidth at one token per shape, and
    whether every shape meets both."""
    out = {}
    for bits, target in TARGETS_ONE_TOKEN.items():
        hits = [r for r in rows if r["bits"] == bits and r["tokens"] == 1]
        if hits:
            speedups = {f"{r['K']}x{r['N']}": r["speedup"] for r in hits}
            fractions = {f"{r['K']}x{r['N']}": r["copy_bw_fraction"] for r in hits}
            out[str(bits)] = {
                "target": target,
                "copy_fraction_target": TARGET_COPY_FRACTION,
                "speedups": speedups,
                "copy_fractions": fractions,
                "met": all(v >= target for v in speedups.values())
                and all(v >= TARGET_COPY_FRACTION for v in fractions.values()),
            }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256])
    p.add_argument("--moe-batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--samples", type=int, default=15, help="timed samples per case; the median is reported")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="time eager launches")
    p.add_argument("--skip-moe", action="store_true")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default evals/results/kernels-<device>.json)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU interpreter (TRITON_INTERPRET=1)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="also time candidate tile configurations per case")
    p.add_argument("--sweep-bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--sweep-tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument(
        "--sweep-budget-s", type=float, default=240.0, help="stop sweeping after this many seconds"
    )
    args = p.parse_args(argv)
    args.deadline = Deadline(args.sweep_budget_s)
    if args.smoke:
        args.shapes = [(256, 128), (128, 256)]
        args.moe = {"experts": 4, "top_k": 2, "hidden": 128, "inter": 256}
        args.tokens = [t for t in args.tokens if t <= 16] or [1]
        args.moe_batch = [b for b in args.moe_batch if b <= 8] or [1]
        args.samples = min(args.samples, 2)
    else:
        args.shapes = MATMUL_SHAPES
        args.moe = MOE
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import triton
    except ImportError:
        print("bench_kernels needs Triton: pip install 'moequant[triton]'", file=sys.stderr)
        return 1
    from moequant.kernels.dispatch import interpreting

    if args.smoke:
        if not interpreting():
            print("--smoke runs on the CPU interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 1
        device = torch.device("cpu")
        name = "cpu-interpreter"
    else:
        if not torch.cuda.is_available():
            print(
                "bench_kernels times GPU kernels and needs a CUDA device; none is available here "
                "(use --smoke with TRITON_INTERPRET=1 to check the script on CPU)",
                file=sys.stderr,
            )
            return 1
        if interpreting():
            print("unset TRITON_INTERPRET to time compiled kernels on the GPU", file=sys.stderr)
            return 1
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    timer = Timer(device, args.samples, args.graphs)
    copy_bw = copy_bandwidth(device, timer, args.smoke)
    print(f"{name}: torch {torch.__version__}, triton {triton.__version__}, copy {copy_bw / 1e9:.0f} GB/s")
    print("dequantising matmul (group size 128) vs bf16 F.linear:")
    matmul = bench_matmul(args, device, timer, copy_bw, gen)
    moe: list[dict] = []
    if not args.skip_moe:
        print("fused MoE layer vs bf16 loop over routed experts:")
        moe = bench_moe(args, device, timer, copy_bw, gen)
    targets = one_token_targets(matmul)
    for bits, t in targets.items():
        shown = ", ".join(f"{s}: {v:.2f}x {t['copy_fractions'][s]:.0%}" for s, v in t["speedups"].items())
        print(
            f"one-token target {bits}-bit >= {t['target']}x at >= {TARGET_COPY_FRACTION:.0%} of copy: "
            f"{'met' if t['met'] else 'NOT met'} ({shown})"
        )
    result = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timing": sorted(timer.modes),
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "matmul": matmul,
        "moe": moe,
        "targets_one_token": targets,
    }
    out = args.out
    if out is None and not args.smoke:
        out = ROOT / "evals" / "results" / f"kernels-{device_slug(name)}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
