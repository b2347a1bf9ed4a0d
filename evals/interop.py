"""Do the readers users have load moequant's output? Measured with the readers themselves.

Builds (once) a separate virtual environment with GPTQModel 7.7 (its source package, on this
environment's torch build), compressed-tensors, optimum and transformers; compresses the bundled
model with every built-in recipe in each output form; loads each checkpoint with each reader that
should read it (`evals/interop_reader.py`, run in that environment) and compares its logits on
held-out text with `moequant.load` of the same checkpoint: relative error ``||a - b|| / ||b||``
and top-1 agreement. With a CUDA GPU and vLLM importable in the reader environment, the 4-bit
output is also served with vLLM and its greedy tokens compared with `moequant generate`.

    python evals/interop.py [--venv .interop-venv] [--windows 4] [--output evals/results/interop.json]

Results go to `evals/results/interop.json`; `evals/README.md` has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPTQMODEL = "gptqmodel==7.7.0"
COMPRESSED_TENSORS = "compressed-tensors==0.20.1"
OPTIMUM = "optimum==2.3.0"
RECIPES = ("a4e2", "a4e3", "a4e4", "a8e4")
# (format, layout) -> (reader, dtype) pairs; transformers on the GPTQ output measures its trap. GPTQModel's
# CPU kernel (and so transformers' GPTQ path through it) takes float16 or bfloat16 only.
FORMS = {
    ("gptq", "gptqmodel"): [("gptqmodel", "float16")],
    ("gptq", "vllm"): [("transformers", "float16")],
    ("compressed-tensors", "vllm"): [("compressed-tensors", "float32"), ("transformers", "float32")],
}
VLLM_RECIPES = ("a4e4", "a8e4")
CT_BITS = {"a4e2", "a4e4", "a8e4"}


def sh(*cmd: str | Path, env: dict | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def build_env(venv: Path) -> Path:
    """The reader environment: GPTQModel from source without letting anything replace this torch build."""
    python = venv / "bin" / "python"
    marker = venv / ".moequant-interop"
    if marker.is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    sh(sys.executable, "-m", "venv", venv)
    pip = [python, "-m", "pip", "install", "--quiet"]
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    constraints = venv / "constraints.txt"
    constraints.write_text(f"{torch_pin}\ntransformers=={__import__('transformers').__version__}\n")
    sh(*pip, torch_pin)
    src = venv / "src"
    sh(python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", GPTQMODEL, "-d", src)
    sdist = next(src.glob("gptqmodel-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/requirements.txt") and m.name.count("/") == 1)
        requirements = tar.extractfile(member).read().decode()
    # GPTQModel asks for a newer torch than it needs on the CPU; every other requirement is honoured
    wanted = [line for line in requirements.splitlines() if line.strip() and not re.match(r"torch\b", line)]
    (venv / "requirements.txt").write_text("\n".join(wanted) + "\n")
    sh(*pip, "-c", constraints, "-r", venv / "requirements.txt", COMPRESSED_TENSORS, OPTIMUM, "sentencepiece",
       "tiktoken", "setuptools", "wheel")
    sh(*pip, "--no-deps", "--no-build-isolation", sdist, env={**os.environ, "BUILD_CUDA_EXT": "0"})
    marker.write_text(sh(python, "-m", "pip", "freeze"))
    return python


def versions(python: Path) -> dict:
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "['torch', 'transformers', 'gptqmodel', 'compressed-tensors', 'optimum']}))")
    return json.loads(sh(python, "-c", code))


def held_out_ids(tokenizer_dir: Path, windows: int, seqlen: int) -> torch.Tensor:
    from moequant.builtin_data import builtin_text
    from moequant.calib import load_tokenizer, tokenize

    ids = tokenize(load_tokenizer(tokenizer_dir), builtin_text("eval"))
    return ids[: windows * seqlen].reshape(windows, seqlen)


def moequant_logits(path: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import moequant

    model = moequant.load(path, device="cpu", dtype=dtype, backend="torch")
    with torch.no_grad():
        return torch.cat([model(input_ids=ids[i:i + 1]).logits.float() for i in range(ids.shape[0])])


def moequant_greedy(path: Path, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    import moequant

    model = moequant.load(path, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        out = model.generate(ids.cuda(), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[:, ids.shape[1]:].cpu()


def run_reader(python: Path, reader: str, model: Path, ids: Path, out: Path, dtype: str) -> dict:
    """Run `interop_reader.py` in the reader environment: its JSON line, or the last line of its error."""
    t0 = time.perf_counter()
    done = subprocess.run([str(python), str(ROOT / "evals" / "interop_reader.py"), "--reader", reader, "--model",
                           str(model), "--ids", str(ids), "--out", str(out), "--dtype", dtype],
                          capture_output=True, text=True, cwd=out.parent)
    row: dict = {"seconds": round(time.perf_counter() - t0, 1)}
    if done.returncode:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        row["error"] = lines[-1][:500] if lines else f"exit {done.returncode}"
    else:
        row["version"] = json.loads(done.stdout.strip().splitlines()[-1])["version"]
    return row


def compare(theirs: torch.Tensor, ours: torch.Tensor) -> dict:
    if not bool(torch.isfinite(theirs).all()):
        return {"relative_error": None, "top1_agreement": None, "error": "the reader's logits are not finite"}
    return {"relative_error": float((theirs - ours).norm() / ours.norm()),
            "top1_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())}


def gptqmodel_output_read_by_moequant(python: Path, bundled: Path, ids: torch.Tensor, work: Path) -> list[dict]:
    """GPTQModel quantises the bundled model itself; `moequant.load` reads that checkpoint, against GPTQModel."""
    from moequant.builtin_data import builtin_text

    calib = work / "calib.txt"
    calib.write_text(builtin_text("calib"))
    rows = []
    for bits in (4, 8):
        out = work / f"gptqmodel-own-{bits}"
        done = subprocess.run([str(python), str(ROOT / "evals" / "interop_reader.py"), "--reader",
                               "gptqmodel-quantize", "--model", str(bundled), "--out", str(out), "--calib-text",
                               str(calib), "--bits", str(bits)], capture_output=True, text=True, cwd=work,
                              env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
        row = {"recipe": f"GPTQModel's own {bits}-bit output", "format": "gptq", "layout": "gptqmodel",
               "reader": "moequant", "dtype": "float16"}
        if done.returncode:
            row["error"] = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:500]
        else:
            logits = work / f"{out.name}.safetensors"
            row.update(run_reader(python, "gptqmodel", out, work / "ids.safetensors", logits, "float16"))
            if "error" not in row:
                row.update(compare(moequant_logits(out, ids, torch.float16), load_file(str(logits))["logits"]))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


FAMILIES = {  # random tiny models of the other families, shaped so every group divides its inputs
    "qwen3_moe": {"intermediate_size": 256, "moe_intermediate_size": 128, "mlp_only_layers": []},
    "qwen3_moe with a dense layer": {"intermediate_size": 256, "moe_intermediate_size": 128, "mlp_only_layers": [1]},
    "qwen2_moe": {"intermediate_size": 256, "moe_intermediate_size": 128, "shared_expert_intermediate_size": 128,
                  "decoder_sparse_step": 1},
    "olmoe": {"intermediate_size": 128},
    "deepseek_v3": {"intermediate_size": 256, "moe_intermediate_size": 128, "first_k_dense_replace": 0},
    "glm4_moe": {"intermediate_size": 256, "moe_intermediate_size": 128, "first_k_dense_replace": 0},
}


def family_rows(python: Path, work: Path) -> list[dict]:
    """Each family's a4e4 output read by GPTQModel (gptqmodel layout) and by transformers (compressed-tensors)."""
    from moequant.compression import CalibSettings, compress
    from tests.conftest import add_tokenizer, make_family

    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    save_file({"ids": ids}, str(work / "family-ids.safetensors"))
    rows = []
    for label, overrides in FAMILIES.items():
        family = label.split()[0]
        src = add_tokenizer(make_family(work / label.replace(" ", "-"), family, seed=1, **overrides))
        for fmt, layout, reader, dtype in (("gptq", "gptqmodel", "gptqmodel", "float16"),
                                           ("compressed-tensors", "vllm", "transformers", "float32")):
            out = work / f"{src.name}-{fmt}"
            compress(src, out, recipe="a4e4", output_format=fmt, layout=layout,
                     calib=CalibSettings(source="random", samples=16, seqlen=64))
            row = {"recipe": "a4e4", "family": label, "format": fmt, "layout": layout, "reader": reader,
                   "dtype": dtype}
            rows.append(read_and_compare(python, row, out, ids, work / "family-ids.safetensors"))
    return rows


def read_and_compare(python: Path, row: dict, out: Path, ids: torch.Tensor, ids_file: Path) -> dict:
    """``row`` (its reader and dtype) with what the reader made of ``out`` on ``ids`` against moequant's logits."""
    logits = out.parent / f"{out.name}-{row['reader']}.safetensors"
    row.update(run_reader(python, row["reader"], out, ids_file, logits, row["dtype"]))
    if "error" not in row:
        row.update(compare(load_file(str(logits))["logits"], moequant_logits(out, ids, getattr(torch, row["dtype"]))))
    print(json.dumps(row), flush=True)
    return row


def plan_rows(python: Path, bundled: Path, ids: torch.Tensor, work: Path) -> list[dict]:
    """A plan's output, experts of one layer at 2 and 4 bits, read by GPTQModel and by compressed-tensors."""
    from moequant.budget import Budget, plan_model
    from moequant.compression import CalibSettings, compress

    calib = CalibSettings(samples=32, seqlen=ids.shape[1])
    plan = plan_model(bundled, Budget(bits=3.0, choices=(2, 4), kinds=("expert",)), calib=calib, device="cpu")
    rows = []
    for (fmt, layout), readers in FORMS.items():
        if layout == "vllm" and fmt == "gptq":
            continue
        out = work / f"plan-{fmt}-{layout}"
        compress(bundled, out, recipe=plan.recipe, output_format=fmt, layout=layout, calib=calib)
        for reader, dtype in readers:
            row = {"recipe": "plan --bits 3 --choices 2,4 --kinds expert", "format": fmt, "layout": layout,
                   "reader": reader, "dtype": dtype}
            rows.append(read_and_compare(python, row, out, ids, work / "ids.safetensors"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", type=Path, default=ROOT / ".interop-venv")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--output", type=Path, default=ROOT / "evals" / "results" / "interop.json")
    ap.add_argument("--vllm-python", type=Path, default=None,
                    help="python of an environment with vLLM (CUDA): serve the 4- and 8-bit outputs with it")
    ap.add_argument("--only-vllm", action="store_true", help="skip the CPU readers (with --vllm-python)")
    ap.add_argument("--only-families", action="store_true",
                    help="only the other families' tiny models (merged into an existing --output)")
    ap.add_argument("--only-plans", action="store_true",
                    help="only a size plan's output, experts at mixed widths (merged into an existing --output)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from moequant.builtin_data import bundled_model_path
    from moequant.compression import CalibSettings, compress

    python = args.venv / "bin" / "python" if args.only_vllm else build_env(args.venv)
    bundled = bundled_model_path()
    ids = held_out_ids(bundled, args.windows, args.seqlen)
    work = Path(tempfile.mkdtemp(prefix="moequant-interop-"))
    save_file({"ids": ids.contiguous()}, str(work / "ids.safetensors"))
    if args.only_families or args.only_plans:
        rows = family_rows(python, work) if args.only_families else plan_rows(python, bundled, ids, work)
        report = json.loads(args.output.read_text()) if args.output.is_file() else {"results": []}
        replaced = "family" if args.only_families else "plan"
        report["results"] = [r for r in report["results"] if not _is(r, replaced)] + rows
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)
        return
    results = []
    for recipe in RECIPES:
        for (fmt, layout), readers in FORMS.items():
            if (fmt == "compressed-tensors" and recipe not in CT_BITS) or (args.only_vllm and (
                    layout != "vllm" or recipe not in VLLM_RECIPES)):
                continue
            out = work / f"{recipe}-{fmt}-{layout}"
            compress(bundled, out, recipe=recipe, method=args.method, output_format=fmt, layout=layout,
                     calib=CalibSettings(samples=32, seqlen=args.seqlen))
            for reader, dtype in [] if args.only_vllm else readers:
                row = {"recipe": recipe, "format": fmt, "layout": layout, "reader": reader, "dtype": dtype}
                logits_file = work / f"{out.name}-{reader}.safetensors"
                row.update(run_reader(python, reader, out, work / "ids.safetensors", logits_file, dtype))
                if "error" not in row:
                    theirs = load_file(str(logits_file))["logits"]
                    row.update(compare(theirs, moequant_logits(out, ids, getattr(torch, dtype))))
                print(json.dumps(row), flush=True)
                results.append(row)
            if args.vllm_python and torch.cuda.is_available() and layout == "vllm" and recipe in VLLM_RECIPES:
                row = {"recipe": recipe, "format": fmt, "layout": layout, "reader": "vllm", "dtype": "float16"}
                tokens_file = work / f"{out.name}-vllm.safetensors"
                row.update(run_reader(args.vllm_python, "vllm", out, work / "ids.safetensors", tokens_file,
                                      "float16"))
                if "error" not in row:
                    theirs = load_file(str(tokens_file))["tokens"]
                    row["greedy_token_agreement"] = float((theirs == moequant_greedy(out, ids, theirs.shape[1]))
                                                          .float().mean())
                print(json.dumps(row), flush=True)
                results.append(row)
    if not args.only_vllm:
        results += gptqmodel_output_read_by_moequant(python, bundled, ids, work)
        results += family_rows(python, work)
        results += plan_rows(python, bundled, ids, work)
    report = {"versions": versions(python) if python.exists() else {}, "method": args.method, "windows": args.windows,
              "seqlen": args.seqlen, "results": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def _is(row: dict, kind: str) -> bool:
    return "family" in row if kind == "family" else row["recipe"].startswith("plan")


if __name__ == "__main__":
    main()
