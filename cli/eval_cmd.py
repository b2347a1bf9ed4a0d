"""``moequant eval``: perplexity of a model and, against its baseline, what compression changed."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import filesize
from rich.markup import escape
from rich.table import Table

from moequant.evals.report import write_report
from moequant.evals.run import evaluate
from moequant_cli.common import RichProgress, console, out


class EvalProgress(RichProgress):
    """Layer bar (``layer k of n``, with the model and stage), then a scoring bar."""

    def stage(self, step: int, name: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, stage=name)

    def advance(self, step: int, info: dict | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, stage="")


def eval_command(
    model: str = typer.Argument(..., help="Checkpoint folder (original or compressed) or hub id."),
    baseline: str = typer.Option(None, "--baseline", "-b", help="The original checkpoint to compare against."),
    dataset: str = typer.Option("builtin", "--dataset", "-d", help="builtin, wikitext2, c4 or a text file."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per window (capped at the model's positions)."),
    max_windows: int = typer.Option(None, "--max-windows", help="Score only the first N windows."),
    output: Path = typer.Option(None, "--output", "-o",
                                help="Report JSON, default eval-<model>.json here; .md and .png go beside it."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch: int = typer.Option(0, "--batch", help="Windows per forward chunk (0: automatic)."),
    engine: str = typer.Option("streamed", "--engine", help="streamed (one layer at a time) or memory."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute dtype: float32, bfloat16 or float16."),
    expert_slots: int = typer.Option(None, "--expert-slots", help="With --engine memory: offload the experts "
                                                                  "behind a cache of this many per layer."),
) -> None:
    """Score MODEL on held-out text; with --baseline also KL, top-1 and router agreement.

    Protocol: the whole text is tokenised once, without special tokens,
    and cut into consecutive non-overlapping windows of --seqlen tokens
    (the remainder is dropped); each window is scored on its own;
    perplexity = exp(mean NLL of every predicted token).
    """
    report = evaluate(model, baseline=baseline, dataset=dataset, seqlen=seqlen, max_windows=max_windows,
                      device=device, batch=batch, engine=engine, dtype=dtype, progress=EvalProgress(),
                      expert_slots=expert_slots)
    target = output or Path(f"eval-{Path(report['model']).name}.json")
    paths = write_report(report, target)
    render_summary(report)
    written = ", ".join(str(p) for p in paths.values() if p is not None)
    console.print(f"report: {written}", markup=False, highlight=False)
    if paths["png"] is None and report.get("router_agreement_per_layer"):
        console.print("no chart: matplotlib is not installed (pip install 'moequant[plot]')", markup=False)


def render_summary(report: dict) -> None:
    """Print the report's headline numbers as a table."""
    table = Table(title=f"{escape(Path(report['model']).name)} on {escape(Path(report['dataset']).name)} "
                        f"({report['windows']} x {report['seqlen']} tokens)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    stderr = report["perplexity_stderr"]
    table.add_row("perplexity", f"{report['perplexity']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    table.add_row("size", f"{filesize.decimal(report['size_bytes'])} ({report['bits_per_weight']:.2f} bits/weight)")
    if report.get("baseline") is not None:
        kl = report["kl_divergence"]
        table.add_row("baseline perplexity", f"{report['baseline_perplexity']:.4f}")
        table.add_row("perplexity change", f"{report['perplexity_change_pct']:+.2f} %")
        table.add_row("baseline size", filesize.decimal(report["baseline_size_bytes"]))
        table.add_row("KL mean / median / p99", f"{kl['mean']:.5f} / {kl['median']:.5f} / {kl['p99']:.5f}")
        table.add_row("top-1 agreement", f"{report['top1_agreement']:.4f}")
        table.add_row("router agreement", f"{report['router_agreement']:.4f}")
    table.add_row("time", f"{report['time_s']:.1f} s ({report['tokens_per_s']:.0f} tokens/s, {report['engine']})")
    cache = report.get("expert_cache")
    if cache:
        table.add_row("expert cache", f"{cache['slots']} per layer: {cache['hit_rate']:.1%} hits, prefetch accuracy "
                                      f"{cache['prefetch_accuracy']:.1%}")
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
