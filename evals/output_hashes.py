"""Fingerprints of what moequant writes, to show that a change leaves its outputs as they were.

Compresses the bundled model with every built-in recipe, by GPTQ and by RTN, hashes every file of
each output (``moequant.json`` without its timings and paths), and evaluates each against the
original on the first windows of the held-out slice. ``--save FILE`` writes the fingerprints;
``--check FILE`` compares a new run with them and exits 1 on any difference.

    python evals/output_hashes.py --save /tmp/before.json
    ... change the code ...
    python evals/output_hashes.py --check /tmp/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from moequant.builtin_data import bundled_model_path
from moequant.compression import RECORD_FILE, CalibSettings, compress
from moequant.evals.run import evaluate
from moequant.recipe import builtin_names

_VOLATILE = ("timing", "source")  # moequant.json fields that differ between runs of the same code


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path (the record without volatile fields)."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == RECORD_FILE:
            record = {k: v for k, v in json.loads(data).items() if k not in _VOLATILE}
            data = json.dumps(record, sort_keys=True).encode()
        hashes[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return hashes


def fingerprints(samples: int, windows: int) -> dict:
    model = bundled_model_path()
    calib = CalibSettings(source="builtin", samples=samples, seqlen=128, seed=0)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in builtin_names():
            for method in ("gptq", "rtn"):
                label = f"{recipe}-{method}"
                out = compress(model, Path(tmp) / label, recipe=recipe, method=method, device="cpu",
                               calib=calib).path
                report = evaluate(out, baseline=model, dataset="builtin", seqlen=128, max_windows=windows,
                                  device="cpu")
                metrics = {k: report[k] for k in ("perplexity", "baseline_perplexity", "kl_divergence",
                                                  "top1_agreement", "router_agreement", "windows_hash")}
                result[label] = {"files": file_hashes(out), "eval": metrics}
                print(f"{label}: {len(result[label]['files'])} files", flush=True)
    return result


def differences(before: dict, after: dict) -> list[str]:
    """One line per output file or evaluation number that is not the same in both runs."""
    lines = []
    for label in sorted(set(before) | set(after)):
        if label not in before or label not in after:
            lines.append(f"{label}: only in {'the new run' if label in after else 'the saved run'}")
            continue
        b, a = before[label], after[label]
        for name in sorted(set(b["files"]) | set(a["files"])):
            if b["files"].get(name) != a["files"].get(name):
                lines.append(f"{label}: {name} differs")
        if b["eval"] != a["eval"]:
            lines.append(f"{label}: evaluation differs: {b['eval']} vs {a['eval']}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path, help="write the fingerprints here")
    group.add_argument("--check", type=Path, help="compare with fingerprints saved earlier")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of 128 tokens")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 128 tokens")
    args = parser.parse_args()
    now = fingerprints(args.samples, args.windows)
    if args.save:
        args.save.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"saved {len(now)} outputs to {args.save}")
        return 0
    diff = differences(json.loads(args.check.read_text()), now)
    for line in diff:
        print(line)
    print(f"{len(now)} outputs: {'all the same' if not diff else f'{len(diff)} differences'}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
