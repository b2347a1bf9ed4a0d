"""``moequant compare``: evaluation reports side by side."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box, filesize
from rich.markup import escape
from rich.table import Table

from moequant.errors import MoequantError
from moequant.evals.report import load_report
from moequant_cli.common import console, out

SAME_DATA = ("dataset", "seqlen", "windows", "windows_hash")


def check_same_data(reports: list[dict], names: list[str]) -> list[str]:
    """The fields (of :data:`SAME_DATA`) in which the reports differ; first report as reference."""
    first = reports[0]
    return [f"{key} ({names[0]}: {_short(first[key])}, {names[i]}: {_short(r[key])})"
            for key in SAME_DATA for i, r in enumerate(reports[1:], 1) if r[key] != first[key]]


def _short(value) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 else text


def chart_path(path: Path) -> Path:
    """``path`` for a PNG chart, its folder created (as ``eval --output`` creates the report's)."""
    path = path.expanduser()
    if path.suffix.lower() != ".png":
        raise MoequantError(f"--plot {path} should end in .png (the chart is a PNG image)")
    if path.is_dir():
        raise MoequantError(f"--plot {path} is a folder; give a file name ending in .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoequantError(f"cannot create the folder of --plot {path} ({exc.strerror or exc})") from exc
    return path


def plot_size_perplexity(reports: list[dict], path: Path) -> bool:
    """Perplexity against size in bytes, one point per report (and per distinct baseline)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    bases = {}
    for r in reports:
        ax.scatter(r["size_bytes"] / 1e9, r["perplexity"], color="tab:blue")
        ax.annotate(Path(r["model"]).name, (r["size_bytes"] / 1e9, r["perplexity"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
        if r.get("baseline") and r.get("baseline_perplexity") is not None:
            bases[r["baseline"]] = (r["baseline_size_bytes"] / 1e9, r["baseline_perplexity"])
    for name, (size, ppl) in bases.items():
        ax.scatter(size, ppl, color="tab:gray", marker="s")
        ax.annotate(f"{Path(name).name} (baseline)", (size, ppl), fontsize=8, textcoords="offset points",
                    xytext=(4, 4))
    ax.set_xlabel("size (GB)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise MoequantError(f"cannot write the chart {path} ({exc.strerror or exc})") from exc
    finally:
        plt.close(fig)
    return True


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def compare(
    reports: list[Path] = typer.Argument(..., help="Report JSON files written by moequant eval."),
    plot: Path = typer.Option(None, "--plot", help="Write a chart of perplexity against size (PNG)."),
    force: bool = typer.Option(False, "--force", help="Compare even if the reports used different data."),
) -> None:
    """Show evaluation reports side by side; refuses reports scored on different windows."""
    loaded = [load_report(p) for p in reports]
    names = [p.name for p in reports]
    differ = check_same_data(loaded, names)
    if differ:
        if not force:
            raise MoequantError(f"reports were scored on different data: {differ[0]}; re-evaluate with the same "
                                "--dataset/--seqlen/--max-windows or pass --force")
        console.print(f"[yellow]warning:[/] reports were scored on different data: {escape('; '.join(differ))}",
                      highlight=False)
    chart = chart_path(plot) if plot is not None else None
    first = loaded[0]
    table = Table(title=f"{Path(first['dataset']).name}, {first['windows']} x {first['seqlen']} tokens; "
                        "ppl = perplexity, Δ ppl vs its baseline", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    models = [Path(r["model"]).name for r in loaded]
    label = "report" if len(set(models)) < len(models) else "model"
    table.add_column(label, justify="left", overflow="fold")
    for col in ("size", "bits/w", "ppl", "Δ ppl", "KL mean", "top-1", "router"):
        table.add_column(col, justify="right", no_wrap=True)
    for path, r in zip(reports, loaded, strict=True):
        change = r.get("perplexity_change_pct")
        if change is None and r.get("baseline_perplexity"):
            change = 100.0 * (r["perplexity"] / r["baseline_perplexity"] - 1.0)
        kl = r.get("kl_divergence") or {}
        table.add_row(escape(path.stem if label == "report" else Path(r["model"]).name), filesize.decimal(r["size_bytes"]),
                      _num(r["bits_per_weight"], ".2f"), _num(r["perplexity"], ".4f"),
                      "-" if change is None else f"{change:+.2f}%", _num(kl.get("mean"), ".5f"),
                      _num(r.get("top1_agreement"), ".4f"), _num(r.get("router_agreement"), ".4f"))
    out.print(table)
    if chart is not None:
        if plot_size_perplexity(loaded, chart):
            console.print(f"chart: {chart}", markup=False, highlight=False)
        else:
            console.print("no chart: matplotlib is not installed (pip install 'moequant[plot]')", markup=False)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
