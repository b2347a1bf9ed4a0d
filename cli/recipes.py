"""``moequant recipes``: the built-in recipes and their size on a published model's shape."""

from __future__ import annotations

import typer
from rich.table import Table

from moequant.errors import MoequantError
from moequant.recipe import builtin_names, load_recipe
from moequant.sizes import MODELS, estimate_bits
from moequant_cli.common import out


def recipes(
    model: str = typer.Option("mixtral-8x7b", "--model", help=f"Shape to estimate for: {', '.join(MODELS)}."),
) -> None:
    """List built-in recipes with estimated bits per weight and size for a published model."""
    if model not in MODELS:
        raise MoequantError(f"unknown model {model!r}; sizes are estimated for {', '.join(MODELS)}")
    table = Table(title=f"built-in recipes (estimates for {model})")
    for col in ("name", "attention", "experts", "bits/weight", "size", "offloaded", "description"):
        table.add_column(col)
    for name in builtin_names():
        recipe = load_recipe(name)
        est = estimate_bits(recipe, MODELS[model])
        table.add_row(name, est["attention"], est["expert"], f"{est['bits_per_weight']:.2f}",
                      f"{est['bytes'] / 1e9:.1f} GB", f"{est['offloaded_bytes'] / 1e9:.1f} GB", recipe.description)
    out.print(table)
    out.print("offloaded: device memory with the experts in host memory and the top-k of every layer cached "
              "(moequant.load(..., offload='experts'))", highlight=False)
