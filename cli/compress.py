"""``moequant compress``: a checkpoint in, a packed low-bit checkpoint out."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import filesize
from rich.table import Table

from moequant.compression import CalibSettings
from moequant.compression import compress as run_compress
from moequant_cli.common import RichProgress, out, print_engine_limits, print_readers
from moequant_cli.plan import CHOICES_HELP, KINDS_HELP, budget_of


def compress(
    model: str = typer.Argument(..., help="Checkpoint folder (config.json + safetensors) or hub id."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (must not exist unless --overwrite)."),
    recipe: str = typer.Option("a4e3", "--recipe", "-r", help="Built-in recipe name or YAML path."),
    method: str = typer.Option(None, "--method", help="Override the recipe's solver: gptq or rtn."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    calib: str = typer.Option("builtin", "--calib", help="Calibration data: builtin, wikitext2, c4 or a text file (random: random ids, for timing only)."),
    samples: int = typer.Option(128, "--samples", help="Calibration windows."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per window (capped at the model's positions)."),
    seed: int = typer.Option(0, "--seed", help="Seed for drawing calibration windows."),
    expert_batch: int = typer.Option(0, "--expert-batch", help="Experts solved together (0: all of a layer)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last layer."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickled .bin weights (trusted files only)."),
    output_format: str = typer.Option("gptq", "--format", help="gptq (qweight/qzeros/scales/g_idx) or compressed-tensors (pack-quantized; 2/4/8-bit)."),
    layout: str = typer.Option(None, "--layout", help="Module names written: vllm (the family's published names; default) or gptqmodel (transformers' names, for GPTQModel 7)."),
    bits: float = typer.Option(None, "--bits", help="Plan first: the recipe's modules average this many bits per weight, widths chosen by measurement."),
    size: str = typer.Option(None, "--size", help="Plan first: the output folder takes at most this, e.g. 12GB or 11.5GiB."),
    choices: str = typer.Option("2,3,4", "--choices", help=f"With --bits/--size: {CHOICES_HELP.lower()}"),
    kinds: str = typer.Option(None, "--kinds", help=f"With --bits/--size: {KINDS_HELP[0].lower()}{KINDS_HELP[1:]}"),
) -> None:
    """Quantise MODEL layer by layer and write packed safetensors (GPTQ or compressed-tensors)."""
    result = run_compress(
        model, output, recipe=recipe, method=method, device=device,
        calib=CalibSettings(source=calib, samples=samples, seqlen=seqlen, seed=seed),
        overwrite=overwrite, resume=resume, allow_pickle=allow_pickle, expert_batch=expert_batch,
        progress=RichProgress(), output_format=output_format, layout=layout,
        budget=budget_of(bits, size, choices, kinds),
    )
    if result.record:  # the other ranks of a torchrun leave the summary to rank 0
        render_summary(result.record, result.path)


def render_summary(record: dict, path: Path) -> None:
    totals = record["totals"]
    table = Table(title=f"moequant: {path}")
    for col in ("group", "modules", "parameters", "bits", "mean rel. error"):
        table.add_column(col, justify="right" if col != "group" else "left")
    for name, g in record["groups"].items():
        bits = ", ".join(f"{b}-bit x{n}" for b, n in sorted(g["bits"].items(), key=lambda kv: int(kv[0])))
        err = "-" if g["mean_error"] is None else f"{g['mean_error']:.4f}"
        table.add_row(name, str(g["modules"]), f"{g['parameters']:,}", bits, err)
    out.print(table)
    out.print(
        f"size {filesize.decimal(totals['source_bytes'])} -> {filesize.decimal(totals['bytes'])} "
        f"({totals['compression_ratio']:.2f}x), {totals['bits_per_weight']:.2f} bits per weight overall, "
        f"{totals['bits_per_weight_quantised']:.2f} in quantised modules, {record['timing']['total_s']:.1f} s",
        highlight=False,
    )
    starved = record.get("starved_experts") or []
    if starved:
        st = Table(title="experts with few calibration tokens")
        for col in ("layer", "expert", "tokens", "policy"):
            st.add_column(col)
        for s in starved:
            st.add_row(str(s["layer"]), str(s["expert"]), str(s["tokens"]), s["policy"])
        out.print(st)
    if record.get("plan"):
        p = record["plan"]
        widths = ", ".join(f"{n} at {b} bits" for b, n in p["widths"].items() if n)
        out.print(f"planned for {next(iter(p['budget'].values())):,} {next(iter(p['budget']))}: {p['modules']} "
                  f"modules, {widths} ({p['bits']:.4f} bits on average; plan in {p['file']})", highlight=False)
    print_readers(record)
    print_engine_limits(record.get("engine_limits") or [])
