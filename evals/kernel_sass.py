"""Compile moequant's Triton kernels for a GPU target without a GPU and report what the compiler made.

For each kernel variant (bits, tile sizes, warps): registers per thread, local-memory spill bytes,
shared memory, the programs one SM holds at once (by registers, shared memory and warps) and the
packed codes they keep in flight (stages - 1 tiles each when pipelined, one tile otherwise), and the
instruction mix of its main K loop, with the loop's instructions per weight per thread (fewer is
better: decode is bound by bytes only when this is small). Uses Triton's ahead-of-time compiler and
the ``cuobjdump`` bundled with Triton.

    python evals/kernel_sass.py [--arch 90] [--kernels gemv,dot,wleft,wleft1,moe_gemv,moe_dot] [--bits 2 3 4 8]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

POINTER_TYPES = {
    "x_ptr": "*bf16",
    "s_ptr": "*fp16",
    "out_ptr": "*fp32",
    "weight_ptr": "*fp32",
}
# Triton's JIT compiles a separate kernel for integer arguments equal to 1 and marks pointers and
# integers divisible by 16; a launch on contiguous tensors with Mixtral's sizes gets both.
UNIT_STRIDES = {"stride_xk", "stride_qn", "stride_zn", "stride_sn", "stride_on"}
UNALIGNED_INTS = {"M", "num_slots", "top_k", "stride_ge", "splits"}


# Per-SM limits by compute capability: registers, shared memory (bytes), resident blocks, warps.
SM_LIMITS = {80: (65536, 167936, 32, 64), 86: (65536, 102400, 16, 48), 89: (65536, 102400, 24, 48),
             90: (65536, 233472, 32, 64)}
SHARED_RESERVED_PER_BLOCK = 1024


def resident_programs(regs: int, shared: int, warps: int, arch: int) -> int:
    """Programs one SM holds at once, as registers (allocated in steps of 8 per thread), shared
    memory, and the block and warp limits allow."""
    max_regs, max_shared, max_blocks, max_warps = SM_LIMITS.get(arch, SM_LIMITS[90])
    by_regs = max_regs // (-(-regs // 8) * 8 * 32 * warps)
    by_shared = max_shared // (shared + SHARED_RESERVED_PER_BLOCK) if shared else max_blocks
    return max(0, min(by_regs, by_shared, max_blocks, max_warps // warps))


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _instructions(sass: str) -> list[tuple[int, str]]:
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def _opcode(text: str) -> str:
    parts = text.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def main_loop(sass: str) -> tuple[int, collections.Counter] | None:
    """Length and opcode counts of the longest backward-branch loop in a SASS listing."""
    ins = _instructions(sass)
    best = None
    for addr, text in ins:
        m = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if best is None or len(body) > best[0]:
                best = (len(body), collections.Counter(_opcode(t) for t in body))
    return best


def compile_variant(fn, constexprs: dict, num_warps: int, num_stages: int, arch: int) -> dict:
    """Compile ``fn`` for ``sm_<arch>``; registers, spills, shared memory and the main loop."""
    constexprs = {**{name: 1 for name in UNIT_STRIDES if name in fn.arg_names}, **constexprs}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = POINTER_TYPES.get(name, "*i32") if name.endswith("_ptr") else "i32"
        if name not in UNALIGNED_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    loop = main_loop(sass)
    return {
        "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
        "local": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
        "shared": kernel.metadata.shared,
        "loop": loop[0] if loop else 0,
        "ops": loop[1] if loop else collections.Counter(),
    }


def variants(kernels: set[str], bits_list: list[int]):
    """``(label, fn, constexprs, warps, stages, weights per loop iteration)`` to compile."""
    from moequant.kernels import triton_matmul as tm
    from moequant.kernels import triton_moe as tmoe
    from moequant.kernels.triton_launch import pipeline_depth

    for bits in bits_list:
        forms = {  # the dense kernel's forms and their (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
            "gemv": [(1, 128, 128, 4, 3), (1, 128, 128, 4, 1), (1, 64, 128, 4, 3), (1, 32, 128, 2, 3)],
            "dot": [(16, 64, 128, 4, 4), (64, 128, 64, 4, 3)],
            "wleft": [(16, 128, 128, 4, 3), (16, 128, 128, 4, 1), (32, 128, 128, 4, 3), (64, 128, 128, 4, 3)],
            # one activation row: unpipelined, 3 stages, pick_config's depth, 5 stages
            "wleft1": [(16, 128, 128, 4, st) for st in sorted({1, 3, pipeline_depth(bits, 128, 128), 5})],
        }
        for form, tiles in forms.items():
            if form not in kernels:
                continue
            for bm, bn, bk, warps, stages in tiles:
                yield (
                    f"{form} {bits}-bit m{bm} n{bn} k{bk} w{warps} s{stages}",
                    tm._dequant_matmul_kernel,
                    dict(
                        BITS=bits,
                        GROUP_MODE=0,
                        BLOCK_M=bm,
                        BLOCK_N=bn,
                        BLOCK_K=bk,
                        SPLIT_K=True,
                        DOT_DTYPE=tl.bfloat16,
                        IEEE_FP32=False,
                        WEIGHTS_LEFT=form.startswith("wleft"),
                        ONE_ROW=form == "wleft1",
                        STAGES=stages,
                        ASM=True,
                        GEMV=form == "gemv",
                        EVEN=True,
                    ),
                    warps,
                    stages,
                    bn * bk,
                )
        if "moe_gemv" in kernels:
            for name, fn in [
                ("gate_up", tmoe._moe_gemv_gate_up_kernel),
                ("down", tmoe._moe_gemv_down_kernel),
            ]:
                for left, bn in [(False, 64), (True, 128)]:
                    stages = pipeline_depth(bits, bn, 128) if left else 3  # as pick_moe_config sets them
                    yield (
                        f"moe {name}{' wleft' if left else ''} {bits}-bit n{bn} k128 w4 s{stages}",
                        fn,
                        dict(
                            BITS=bits,
                            GROUP_MODE=0,
                            BLOCK_N=bn,
                            BLOCK_K=128,
                            ASM=True,
                            EVEN=True,
                            STAGES=stages,
                            WEIGHTS_LEFT=left,
                            DOT_DTYPE=tl.bfloat16,
                        ),
                        4,
                        stages,
                        # gate and up: two loops in the GEMV form, one in the weights-left form
                        bn * 128 * (2 if left and name == "gate_up" else 1),
                    )
        if "moe_dot" in kernels:
            for name, fn in [("gate_up", tmoe._moe_gate_up_kernel), ("down", tmoe._moe_down_kernel)]:
                for left, bn in [(False, 64), (True, 128)]:
                    consts = dict(
                        BITS=bits,
                        GROUP_MODE=0,
                        BLOCK_M=16,
                        BLOCK_N=bn,
                        BLOCK_K=128,
                        DOT_DTYPE=tl.bfloat16,
                        IEEE_FP32=False,
                        WEIGHTS_LEFT=left,
                        STAGES=3,
                        ASM=True,
                        EVEN=True,
                    )
                    if name == "down":
                        consts["ATOMIC_ADD"] = True
                    yield (
                        f"moe {name} dot{' wleft' if left else ''} {bits}-bit m16 n{bn} k128 w4",
                        fn,
                        consts,
                        4,
                        3,
                        bn * 128 * (2 if name == "gate_up" else 1),
                    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    ap.add_argument("--kernels", default="gemv,dot,wleft,wleft1,moe_gemv,moe_dot")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    args = ap.parse_args(argv)
    failures = 0
    for label, fn, consts, warps, stages, weights in variants(set(args.kernels.split(",")), args.bits):
        try:
            r = compile_variant(fn, consts, warps, stages, args.arch)
        except Exception as exc:  # noqa: BLE001 - report every variant that does not compile
            failures += 1
            print(f"{label:40s} FAILED: {str(exc).splitlines()[0][:200]}")
            continue
        per_weight = r["loop"] * 32 * warps / weights
        top = " ".join(f"{op}:{n}" for op, n in r["ops"].most_common(6))
        programs = resident_programs(r["regs"], r["shared"], warps, args.arch)
        in_flight = programs * max(stages - 1, 1) * weights * consts["BITS"] / 8 / 1024
        print(
            f"{label:40s} regs {r['regs']:3d} spill {r['local']:4d} B shared {r['shared']:6d} B  "
            f"{programs:2d}/SM {in_flight:5.1f} KB codes in flight/SM  "
            f"loop {r['loop']:5d} instr = {per_weight:5.2f}/weight/thread  {top}",
            flush=True,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
