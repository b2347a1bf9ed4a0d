"""``moequant demo``: the whole job on the bundled model, offline, in a few minutes."""

from __future__ import annotations

from pathlib import Path

import typer

from moequant.demo import run_demo
from moequant_cli.common import RichProgress, console
from moequant_cli.compare import compare
from moequant_cli.compress import render_summary


def demo(
    workdir: Path = typer.Option(Path("moequant-demo"), "--workdir", "-w", help="Where outputs and reports go."),
    recipe: str = typer.Option("a4e3", "--recipe", "-r", help="Built-in recipe name or YAML path."),
    rtn: bool = typer.Option(True, "--rtn/--no-rtn", help="Also compress with round-to-nearest for contrast."),
) -> None:
    """Compress the bundled model, evaluate it against the original on held-out text, and compare."""
    console.print(f"moequant demo: compressing the bundled model with {recipe}, outputs in {workdir}/",
                  highlight=False)
    runs = run_demo(workdir, recipe=recipe, with_rtn=rtn, progress_factory=RichProgress)
    render_summary(runs[0].compressed.record, runs[0].compressed.path)
    compare(reports=[r.report_path for r in runs], plot=workdir / "size-vs-perplexity.png", force=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
