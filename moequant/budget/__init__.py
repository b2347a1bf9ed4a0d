"""Size budgets: the width of every module chosen by measured cost so the model fits ``--bits`` or ``--size``.

``costs`` measures what each candidate width would cost each module; ``knapsack`` chooses one
width per module within the budget; ``sizes`` says what the output folder will weigh; ``plan``
puts them together into a recipe.
"""

from moequant.budget.plan import PLAN_FILE, Budget, Plan, make_plan, parse_widths, plan_model
from moequant.numeric import parse_size

__all__ = ["PLAN_FILE", "Budget", "Plan", "make_plan", "parse_size", "parse_widths", "plan_model"]
