"""``moequant plan``: the width of every module chosen by measurement to fit a size budget, as a recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from moequant.arch.base import QUANTISABLE_KINDS
from moequant.budget import Budget, Plan, parse_size, parse_widths, plan_model
from moequant.checkpoint.writer import write_text_atomic
from moequant.compression import CalibSettings
from moequant.errors import MoequantError
from moequant_cli.common import RichProgress, out

KINDS_HELP = f"Kinds of module whose widths are planned, from {','.join(QUANTISABLE_KINDS)} (default: all)."
CHOICES_HELP = "Candidate widths of every planned module."


def budget_of(bits: float | None, size: str | None, choices: str, kinds: str | None) -> Budget | None:
    """The budget the options ``--bits``/``--size``, ``--choices`` and ``--kinds`` give (``None``: neither)."""
    if bits is None and size is None:
        return None
    planned = tuple(k.strip() for k in kinds.split(",") if k.strip()) if kinds else QUANTISABLE_KINDS
    return Budget(bits=bits, size=None if size is None else parse_size(size), choices=parse_widths(choices),
                  kinds=planned)


def plan(
    model: str = typer.Argument(..., help="Checkpoint folder (config.json + safetensors) or hub id."),
    output: Path = typer.Option(..., "--output", "-o", help="The plan: a recipe YAML file to write."),
    bits: float = typer.Option(None, "--bits", help="Average bits per weight of the planned modules, e.g. 2.5."),
    size: str = typer.Option(None, "--size", help="Most bytes of the output folder, e.g. 12GB or 11.5GiB."),
    recipe: str = typer.Option("a4e3", "--recipe", "-r", help="Base recipe: settings, and the modules it quantises."),
    choices: str = typer.Option("2,3,4", "--choices", help=CHOICES_HELP),
    kinds: str = typer.Option(None, "--kinds", help=KINDS_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    calib: str = typer.Option("builtin", "--calib", help="Calibration data: builtin, wikitext2, c4 or a text file."),
    samples: int = typer.Option(128, "--samples", help="Calibration windows."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per window (capped at the model's positions)."),
    seed: int = typer.Option(0, "--seed", help="Seed for drawing calibration windows."),
    output_format: str = typer.Option("gptq", "--format", help="The format whose sizes --size counts: gptq or compressed-tensors."),
    layout: str = typer.Option(None, "--layout", help="The layout whose names --size counts (see compress)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickled .bin weights (trusted files only)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing plan file."),
) -> None:
    """Measure what each width costs each module and write the recipe that fits --bits or --size best."""
    budget = budget_of(bits, size, choices, kinds)
    if budget is None:
        raise MoequantError("give a budget: --bits (average bits per weight) or --size (bytes of the output)")
    if output.exists() and not overwrite:
        raise MoequantError(f"{output} exists; pass --overwrite to replace it")
    result = plan_model(model, budget, recipe=recipe, device=device,
                        calib=CalibSettings(source=calib, samples=samples, seqlen=seqlen, seed=seed),
                        output_format=output_format, layout=layout, allow_pickle=allow_pickle,
                        progress=RichProgress())
    write_text_atomic(output, result.text)
    print_plan(result)
    out.print(f"wrote {output}; compress with: moequant compress {model} --recipe {output} -o OUT", highlight=False)


def print_plan(result: Plan) -> None:
    """What a plan chose, in two lines."""
    s = result.summary
    widths = ", ".join(f"{n} at {b} bits" for b, n in s["widths"].items() if n)
    size = f", the output at most {s['bytes_at_most']:,} bytes" if "bytes_at_most" in s else ""
    out.print(f"planned {s['modules']} modules ({', '.join(s['kinds'])}): {widths}; {s['bits']:.4f} bits on "
              f"average{size}", highlight=False)
    gap = 0.0 if s["cost"] <= s["lower_bound"] else 1 - s["lower_bound"] / s["cost"]
    out.print(f"estimated cost {s['cost']:.4g}, within {gap:.2%} of the least any choice in the budget can have; "
              f"planning took {s['plan_s']:.1f} s", highlight=False)
