"""The ``moequant`` command: wiring only; each command lives in its own module."""

from __future__ import annotations

import typer

from moequant_cli import compare, compress, demo, eval_cmd, generate, inspect, plan, recipes
from moequant_cli.common import UserErrors

app = typer.Typer(
    name="moequant",
    cls=UserErrors,
    help="Compress Mixture-of-Experts language models to low bits with GPTQ, and measure what it cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("compress")(compress.compress)
app.command("plan")(plan.plan)
app.command("inspect")(inspect.inspect)
app.command("recipes")(recipes.recipes)
for _module in (eval_cmd, compare, generate, demo):
    _module.register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
