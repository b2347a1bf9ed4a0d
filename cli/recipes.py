"""``moequant recipes``: the built-in recipes and their size on Mixtral-8x7B."""

from __future__ import annotations

from rich.table import Table

from moequant.recipe import builtin_names, load_recipe
from moequant.sizes import MIXTRAL_8X7B, estimate_bits
from moequant_cli.common import out


def recipes() -> None:
    """List built-in recipes with estimated bits per weight and size for Mixtral-8x7B."""
    table = Table(title="built-in recipes (estimates for Mixtral-8x7B)")
    for col in ("name", "attention", "experts", "bits/weight", "size", "description"):
        table.add_column(col)
    for name in builtin_names():
        recipe = load_recipe(name)
        est = estimate_bits(recipe, MIXTRAL_8X7B)
        table.add_row(name, est["attention"], est["expert"], f"{est['bits_per_weight']:.2f}",
                      f"{est['bytes'] / 1e9:.1f} GB", recipe.description)
    out.print(table)
