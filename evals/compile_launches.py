"""Compile, without a GPU, every Triton kernel launch moequant makes on CUDA for a grid of real shapes.

The dense matmul, dequantise and fused-MoE entry points run on CPU tensors with the CUDA launch
rules in place (inline PTX, 16-bit dots, an H200's program count) and the launches recorded
instead of run; each distinct launch (kernel, constants, pipeline depth, argument types) is then
compiled ahead of time for ``sm_<arch>``. It prints compile failures, and launches whose shared
memory passes the arch's limit with the depth ``launch_fitting`` falls back to (or that none fits).

    python evals/compile_launches.py [--arch 90 80 86] [--bits 2 3 4 8] [--kernel NAME] [--limit N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moequant.kernels import triton_matmul as tm  # noqa: E402
from moequant.kernels import triton_moe as tmoe  # noqa: E402
from moequant.packed.experts import PackedExperts  # noqa: E402

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, opt-in maximum
DENSE = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (2880, 2880), (1408, 2048), (2048, 1408)]
MOE = [(4096, 14336), (2048, 1408), (2880, 2880)]  # (hidden, intermediate), 8 experts, top-2
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
           torch.int64: "*i64"}
CONST = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}


def _arg(a):
    """How Triton's JIT specialises an argument: pointer dtype, or integer (== 1, divisible by 16)."""
    if isinstance(a, torch.Tensor):
        return ("ptr", a.dtype)
    if isinstance(a, int) and not isinstance(a, bool):
        return ("int", a == 1, a % 16 == 0)
    raise TypeError(f"unexpected kernel argument {a!r}")


def record_launches(bits_list: list[int]) -> dict[tuple, tuple]:
    """``{(kernel name, stages, constants): (kernel, argument kinds, stages, constants)}``."""
    launches: dict[tuple, tuple] = {}

    def note(kernel, args: dict, stages, consts):
        key = (kernel.fn.__name__, stages, tuple(sorted((k, str(v)) for k, v in consts.items())))
        launches.setdefault(key, (kernel, {name: _arg(a) for name, a in args.items()}, stages, consts))

    class Dequant:
        def __getitem__(self, grid):
            def launch(num_stages=1, **kwargs):
                consts = {k: v for k, v in kwargs.items() if k in dequant_consts}
                note(real_dequant, {k: v for k, v in kwargs.items() if k not in consts}, num_stages, consts)
            return launch

    real_dequant = tm._dequant_kernel
    dequant_consts = {p.name for p in real_dequant.params if p.is_constexpr} | {"num_warps"}
    rules = {
        "launch_fitting": lambda kernel, grid, args, stages, device, **consts: note(kernel, args, stages, consts),
        "inline_asm": lambda device: True,
        "dot_dtype": lambda dtype, device: {torch.float16: (tl.float16, False), torch.bfloat16: (tl.bfloat16, False),
                                            torch.float32: (tl.float32, True)}[dtype],
        "device_programs": lambda device: 264,
    }
    saved = {(m, name): getattr(m, name) for m in (tm, tmoe) for name in rules}
    saved[(tm, "_dequant_kernel")] = real_dequant
    try:
        for (module, name) in saved:
            setattr(module, name, rules.get(name) or Dequant())
        for (n, k), bits, group, shuffled in itertools.product(DENSE, bits_list, (32, 128, -1), (False, True)):
            qw, qz, sc, gi = _packed(n, k, bits, group, shuffled)
            for dtype in DTYPES:
                tm.dequantize_triton(qw, qz, sc, gi, bits, group, dtype, sorted_groups=not shuffled)
                for m in (1, 2, 5, 16, 33, 64):
                    tm.dequant_matmul_triton(torch.zeros(m, k, dtype=dtype), qw, qz, sc, gi, bits, group,
                                             sorted_groups=not shuffled)
        for (h, i), bits, group in itertools.product(MOE, bits_list, (32, 128, -1)):
            w13, w2 = _experts(8, 2 * i, h, bits, group), _experts(8, h, i, bits, group)
            for t, dtype in itertools.product((1, 2, 8, 32), DTYPES):
                ids = torch.stack([torch.arange(t) % 8, (torch.arange(t) + 1) % 8], 1)
                tmoe.fused_moe_triton(torch.zeros(t, h, dtype=dtype), ids, torch.full((t, 2), 0.5), w13, w2)
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
    return launches


def _packed(n: int, k: int, bits: int, group: int, shuffled: bool):
    g = -(-k // group) if group > 0 else 1
    g_idx = torch.arange(k, dtype=torch.int32) // (group if group > 0 else k)
    if shuffled:
        g_idx = g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(0))]
    return (torch.zeros(k * bits // 32, n, dtype=torch.int32), torch.zeros(g, n * bits // 32, dtype=torch.int32),
            torch.ones(g, n, dtype=torch.float16), g_idx)


def _experts(e: int, n: int, k: int, bits: int, group: int) -> PackedExperts:
    qw, qz, sc, gi = _packed(n, k, bits, group, False)
    return PackedExperts(qw.expand(e, *qw.shape), qz.expand(e, *qz.shape), sc.expand(e, *sc.shape), gi, bits,
                         group, sorted_groups=True)


def compile_launch(kernel, kinds: dict, stages: int, consts: dict, arch: int):
    """Compile one recorded launch (``kinds``: each runtime argument's kind by name, see :func:`_arg`)
    for ``sm_<arch>`` as the JIT would specialise it."""
    consts = dict(consts)
    warps = consts.pop("num_warps", 4)
    fn = kernel  # the JIT function: Triton's ahead-of-time compiler takes it as it is
    if "STAGES" in fn.arg_names and kernel is not tm._dequant_kernel:
        consts["STAGES"] = stages
    signature, attrs, constexprs = {}, {}, dict(consts)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        if name not in kinds:
            continue  # a defaulted argument
        kind = kinds[name]
        if kind[0] == "ptr":
            signature[name] = POINTER[kind[1]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind[1]:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if kind[2]:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_LIMIT))
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--kernel", default="", help="compile only launches of kernels whose name contains this")
    ap.add_argument("--limit", type=int, default=0, help="compile only the first N launches (0: all)")
    args = ap.parse_args(argv)
    launches = sorted(record_launches(args.bits).items(), key=lambda kv: repr(kv[0]))
    launches = [item for item in launches if args.kernel in item[0][0]]
    if args.limit:
        launches = launches[: args.limit]
    print(f"{len(launches)} distinct launches", flush=True)
    failures = 0
    for arch in args.arch:
        start, over = time.time(), 0
        for key, (kernel, kinds, stages, consts) in launches:
            label = f"sm_{arch} {key[0]} stages {stages} {dict(key[2])}"
            try:
                shared = compile_launch(kernel, kinds, stages, consts, arch).metadata.shared
                depth = stages
                while shared > SHARED_LIMIT[arch] and depth > 1:
                    depth -= 1
                    shared = compile_launch(kernel, kinds, depth, consts, arch).metadata.shared
            except Exception as exc:  # report every failure, then go on
                failures += 1
                print(f"FAILED {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                      flush=True)
                continue
            if depth != stages or shared > SHARED_LIMIT[arch]:
                over += 1
                fits = "fits" if shared <= SHARED_LIMIT[arch] else "DOES NOT FIT"
                print(f"shared {label}: {depth} stages, {shared // 1024} KB, {fits}", flush=True)
        print(f"sm_{arch}: {len(launches)} compiled, {over} over the shared-memory limit at their depth, "
              f"{time.time() - start:.0f} s", flush=True)
    print(f"{failures} failed to compile")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
