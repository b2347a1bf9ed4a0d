"""``moequant inspect``: what an original or compressed checkpoint holds."""

from __future__ import annotations

import json

import typer
from rich import filesize
from rich.markup import escape
from rich.table import Table

from moequant.errors import MoequantError
from moequant.inspection import describe
from moequant_cli.common import console, out, print_engine_limits, print_readers

MAX_SHOWN = 20


def inspect(
    path: str = typer.Argument(..., help="Checkpoint folder (original or compressed) or hub id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickled .bin weights."),
) -> None:
    """Show architecture, layers, experts, parameters, bits per module group and size."""
    info = describe(path, allow_pickle=allow_pickle)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        render(info)
    problems = info["problems"]
    for line in problems[1:MAX_SHOWN]:
        console.print(f"[yellow]problem:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if len(problems) > MAX_SHOWN:
        console.print(f"[yellow]problem:[/] {len(problems) - MAX_SHOWN} more (all under 'problems' in --json)",
                      highlight=False)
    if not info["loadable"]:
        more = f" ({len(problems) - 1} more problems above)" if len(problems) > 1 else ""
        raise MoequantError(f"{info['path']} does not load as it is: {problems[0]}{more}")


def render(info: dict) -> None:
    """The description as a headline and a table of module groups."""
    state = f"compressed ({info.get('recipe') or 'gptq'})" if info["compressed"] else "original"
    out.print(f"[bold]{info['path']}[/]: {info['architecture']}, {state}", highlight=False)
    out.print(
        f"{info['layers']} layers, {info['experts']} experts (top-{info['experts_per_token']}), hidden "
        f"{info['hidden_size']}, intermediate {info['intermediate_size']}, heads {info['attention_heads']}/"
        f"{info['kv_heads']}; {info['parameters']:,} parameters, {filesize.decimal(info['size_bytes'])}, "
        f"{info['bits_per_weight']:.2f} bits per weight",
        highlight=False,
    )
    table = Table()
    for col in ("group", "modules", "parameters", "bits", "stored"):
        table.add_column(col)
    for name, g in info["groups"].items():
        bits = ", ".join(f"{b}-bit x{n}" for b, n in g["bits"].items())
        table.add_row(name, str(g["modules"]), f"{g['parameters']:,}", bits, filesize.decimal(g["stored_bytes"]))
    out.print(table)
    mem = info.get("device_memory")
    if mem:
        out.print(f"device memory for the weights: {filesize.decimal(mem['full'])} fully loaded; with offloaded "
                  f"experts {filesize.decimal(mem['offloaded'])} plus {filesize.decimal(mem['per_cached_expert'])} "
                  f"per cached expert and layer ({filesize.decimal(mem['offloaded_top_k_cached'])} with "
                  f"{info['experts_per_token']} per layer)", highlight=False)
    print_readers(info)
    print_engine_limits(info.get("engine_limits") or [])
