"""GPTQ compression speed, measured against baselines in the same run.

1. solver: the batched expert solver against a plain loop over experts on the same inputs
   (ratio, and whether the results are equal), via ``evals/bench_gptq_solver.py``;
2. peer: ``moequant compress`` of the bundled model against llm-compressor's GPTQ with the same
   bits, group size, symmetry, act-order and calibration windows (needs ``--peer-python``, the
   interpreter of an environment with ``llmcompressor`` installed); target: at most half the peer's time;
3. layer: one decoder layer with Mixtral-8x7B's real shapes and random weights, calibrated on
   random token ids (``--layer-samples`` x 512; 128 on a GPU, fewer on a CPU): seconds and peak
   resident memory (target on a GPU: under 20 s per layer);
4. parallel: two layers of a Mixtral shape (``mixtral-quarter`` on a CPU: a quarter of its widths;
   ``mixtral-8x7b`` on GPUs) compressed by one process and by ``torchrun --nproc-per-node N``
   (``--procs``, default 2; gloo with one thread each on a CPU, NCCL on GPUs): the time of the
   experts' part (their Hessians, solve, packing and sharing) and of the whole command, their ratios (target for the
   experts' part on 2 processes: at most 0.6x), the bytes sent between ranks per layer, and whether
   the outputs are byte-identical.

Prints each part and writes ``evals/results/gptq-<device>.json``.

    python evals/bench_gptq.py [--parts solver,peer,layer] [--peer-python /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_solver(device: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "bench_gptq_solver.py"), "--device", device],
                         capture_output=True, text=True, check=True)
    print(out.stdout)
    return {"output": out.stdout.strip().splitlines()}


def _moequant_cli() -> str:
    return shutil.which("moequant") or str(Path(sys.executable).parent / "moequant")


def _timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed: {proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def part_peer(peer_python: str | None, recipe: str, samples: int, seqlen: int, device: str) -> dict:
    from moequant.builtin_data import bundled_model_path
    from moequant.calib import load_text, load_tokenizer, random_windows, tokenize
    from moequant.recipe import load_recipe

    if not peer_python:
        print("peer: skipped (pass --peer-python, an interpreter with llmcompressor installed)")
        return {"skipped": "no --peer-python"}
    model = bundled_model_path()
    rec = load_recipe(recipe)
    from moequant.arch.registry import adapter_for
    from moequant.checkpoint.reader import CheckpointReader
    from moequant.compression.plan import first_spec

    arch = adapter_for(CheckpointReader(model).config)
    attn, expert = first_spec(arch, rec, "attention"), first_spec(arch, rec, "expert")

    seqlen = min(seqlen, adapter_for(CheckpointReader(model).config).config.max_position_embeddings)
    tok = load_tokenizer(model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = random_windows(tokenize(tok, load_text("builtin", "calib")), samples, seqlen, 0)
        save_file({"ids": calib}, str(tmp / "calib.safetensors"))
        save_file({"ids": calib[:2]}, str(tmp / "eval.safetensors"))
        ours, _ = _timed([_moequant_cli(), "compress", str(model), "-o", str(tmp / "ours"), "--recipe", recipe,
                          "--samples", str(samples), "--seqlen", str(seqlen), "--device", device])
        peer_cmd = [peer_python, str(HERE / "peer_llmcompressor.py"), "--model", str(model), "--calib-ids",
                    str(tmp / "calib.safetensors"), "--eval-ids", str(tmp / "eval.safetensors"), "--attn-bits",
                    str(attn.bits), "--expert-bits", str(expert.bits), "--group-size", str(attn.group_size),
                    "--expert-group-size", str(expert.group_size), "--damp", str(rec.damp), "--skip-original"]
        if not rec.act_order:
            peer_cmd.append("--no-act-order")
        peer_wall, stdout = _timed(peer_cmd)
    peer = json.loads(stdout.strip().splitlines()[-1])
    result = {"recipe": recipe, "samples": samples, "seqlen": seqlen, "moequant_s": round(ours, 2),
              "peer_wall_s": round(peer_wall, 2), "peer_oneshot_s": round(peer["seconds"], 2),
              "ratio_moequant_over_peer_wall": round(ours / peer_wall, 3),
              "ratio_moequant_over_peer_oneshot": round(ours / peer["seconds"], 3), "target": "<= 0.5"}
    print(f"peer: moequant compress {ours:.1f} s (whole command) vs llm-compressor {peer_wall:.1f} s "
          f"(oneshot alone {peer['seconds']:.1f} s): ratio {ours / peer_wall:.2f} (target <= 0.5)")
    return result


def part_layer(samples: int, seqlen: int, device: str, expert_batch: int, workdir: Path, shape: str) -> dict:
    bench_memory = _load("bench_memory")
    src = workdir / f"{shape}-1l"
    if not (src / "config.json").is_file():
        bench_memory.build(src, shape, 1)
    out = workdir / "out"
    cmd = [_moequant_cli(), "compress", str(src), "-o", str(out), "--calib", "random", "--samples", str(samples),
           "--seqlen", str(seqlen), "--device", device, "--overwrite", "--expert-batch", str(expert_batch)]
    peak, seconds = bench_memory.peak_rss_of(cmd)
    record = json.loads((out / "moequant.json").read_text())
    layer_s = record["timing"]["layers_s"][0]
    phases = (record["timing"].get("layer_phases_s") or [None])[0]
    shutil.rmtree(out, ignore_errors=True)
    result = {"shape": shape, "samples": samples, "seqlen": seqlen, "tokens": samples * seqlen,
              "expert_batch": expert_batch,
              "layer_seconds": layer_s, "layer_phases_s": phases, "command_seconds": round(seconds, 1),
              "peak_rss_gib": round(peak / 2**30, 2)}
    if device.startswith("cuda"):
        result["target"] = "< 20 s per layer"
    print(f"layer: {samples}x{seqlen} tokens, one {shape} layer in {layer_s:.1f} s "
          f"(command {seconds:.0f} s), peak RSS {peak / 2**30:.2f} GiB; phases (s): {phases}")
    return result


def part_parallel(procs: int, samples: int, device: str, workdir: Path, shape: str) -> dict:
    bench_memory = _load("bench_memory")
    src = workdir / f"{shape}-2l"
    if not (src / "config.json").is_file():
        bench_memory.build(src, shape, 2)
    args = ["compress", str(src), "--calib", "random", "--samples", str(samples), "--seqlen", "512",
            "--device", device, "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, procs):
        out = workdir / f"out-{n}"
        launcher = [sys.executable, "-m", "moequant"] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "moequant"]
        t0 = time.perf_counter()
        done = subprocess.run([*launcher, *args, "-o", str(out)], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{n} processes failed:\n{done.stderr[-2000:]}")
        record = json.loads((out / "moequant.json").read_text())
        phases = record["timing"]["layer_phases_s"]
        runs[n] = {"command_s": round(time.perf_counter() - t0, 2),
                   "experts_s": round(sum(record["timing"]["layer_experts_s"]), 2),
                   "layer_phases_s": phases,
                   "shared_bytes_per_layer": [r.get("shared_bytes", 0) for r in record["layers"]],
                   "hashes": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.glob("*.safetensors")}}
    one, many = runs[1], runs[procs]
    result = {"shape": shape, "procs": procs, "samples": samples, "seqlen": 512, "device": device,
              "experts_ratio": round(many["experts_s"] / one["experts_s"], 3),
              "command_ratio": round(many["command_s"] / one["command_s"], 3),
              "identical": one["hashes"] == many["hashes"], "target": "experts_ratio <= 0.6 on 2 processes",
              **{f"procs_{n}": {k: v for k, v in r.items() if k != "hashes"} for n, r in runs.items()}}
    print(f"parallel: experts' part {one['experts_s']:.1f} s on 1 process, {many['experts_s']:.1f} s on {procs} "
          f"(ratio {result['experts_ratio']}), whole command ratio {result['command_ratio']}, "
          f"{many['shared_bytes_per_layer']} bytes shared per layer, identical output: {result['identical']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="solver,peer,layer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON"))
    ap.add_argument("--recipe", default="a4e3")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows for the peer comparison")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layer-samples", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    ap.add_argument("--expert-batch", type=int, default=0, help="default: 8 on CUDA, 2 on CPU")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "moequant-bench-gptq")
    ap.add_argument("--shape", default="mixtral-8x7b", help="layer shape: mixtral-8x7b or qwen3-30b-a3b")
    ap.add_argument("--procs", type=int, default=2, help="processes of the parallel part")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    parts = set(args.parts.split(","))
    report: dict = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                    "cpus": os.cpu_count(), "torch": torch.__version__}
    if "solver" in parts:
        report["solver"] = part_solver(args.device)
    if "peer" in parts:
        report["peer"] = part_peer(args.peer_python, args.recipe, args.samples, args.seqlen, args.device)
    if "layer" in parts:
        args.workdir.mkdir(parents=True, exist_ok=True)
        key = "layer" if args.shape == "mixtral-8x7b" else f"layer-{args.shape}"
        report[key] = part_layer(args.layer_samples or (128 if cuda else 8), 512, args.device,
                                 args.expert_batch or (8 if cuda else 2), args.workdir, args.shape)
        shutil.rmtree(args.workdir, ignore_errors=True)
    if "parallel" in parts:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report["parallel"] = part_parallel(args.procs, args.layer_samples or (128 if cuda else 16), args.device,
                                           args.workdir, "mixtral-8x7b" if cuda else "mixtral-quarter")
        shutil.rmtree(args.workdir, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    dest = RESULTS / f"gptq-{'cuda' if cuda else 'cpu'}.json"
    if dest.is_file():  # keep the parts not run this time
        report = {**json.loads(dest.read_text()), **report}
    dest.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
