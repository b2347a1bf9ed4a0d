"""The demo: compress the bundled model, evaluate it against the original, report both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moequant.builtin_data import bundled_model_path
from moequant.compression import CalibSettings, CompressResult, compress
from moequant.evals.report import write_report
from moequant.evals.run import evaluate
from moequant.progress import Progress


@dataclass
class DemoRun:
    """One compressed variant of the bundled model and its evaluation report."""

    label: str
    compressed: CompressResult
    report: dict
    report_path: Path


def run_demo(workdir: str | Path, recipe: str = "a4e3", with_rtn: bool = True,
             calib: CalibSettings | None = None, seqlen: int = 2048,
             progress_factory=Progress) -> list[DemoRun]:
    """Compress the bundled model with ``recipe`` (GPTQ, and RTN for contrast) and evaluate each.

    Calibration is the bundled calibration slice (``builtin``); evaluation is its held-out slice,
    in consecutive windows of ``seqlen`` tokens (capped at the model's positions), against the original on the same windows.
    Everything is written under ``workdir``, which is replaced if it holds an earlier demo.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = bundled_model_path()
    calib = calib or CalibSettings(source="builtin", samples=128, seqlen=seqlen, seed=0)
    runs = []
    methods = ["gptq", "rtn"] if with_rtn else ["gptq"]
    for method in methods:
        label = f"{recipe}-{method}"
        compressed = compress(model, workdir / label, recipe=recipe, method=method, device="cpu", calib=calib,
                              overwrite=True, progress=progress_factory())
        report = evaluate(compressed.path, baseline=model, dataset="builtin", seqlen=seqlen, device="cpu",
                          progress=progress_factory())
        path = workdir / f"report-{label}.json"
        write_report(report, path)
        runs.append(DemoRun(label, compressed, report, path))
    return runs
