"""The multiple-choice knapsack: one option per item, the total size within a budget, the least total cost.

Item ``i`` has options ``(s_ij, c_ij)``; a solution picks one ``j(i)`` per item with
``sum_i s_ij(i) <= B`` and ``C = sum_i c_ij(i)`` as small as it can. The solver walks the lower
convex hull of each item's options from its smallest one: each hull step buys ``-dc`` of cost for
``ds`` of size, at efficiency ``e = -dc / ds``. Taking the steps of all items in order of falling
efficiency while they fit solves the linear relaxation, whose optimum ``C_LP`` (the first step
that does not fit taken fractionally) bounds every integer solution from below:
``C_LP <= C_opt <= C``. The steps after it that still fit are taken too. ``C - C_LP`` is at most
the cost of the one fractional step, which is small beside ``C`` when there are many items.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Solution:
    """The chosen option index of every item, the total ``size`` and ``cost``, and ``bound``: the least cost
    any choice within the budget can have is at least this."""

    choice: list[int]
    size: int
    cost: float
    bound: float

    @property
    def gap(self) -> float:
        """How far ``cost`` may be from the optimum, relative to it (0: proven optimal)."""
        return 0.0 if self.cost <= self.bound else (self.cost - self.bound) / max(self.cost, 1e-300)


def smallest(items: Sequence[Sequence[tuple[int, float]]]) -> int:
    """The least total size any choice has: every item at its smallest option."""
    return sum(min(size for size, _ in options) for options in items)


def largest(items: Sequence[Sequence[tuple[int, float]]]) -> int:
    """The total size of every item at its largest option."""
    return sum(max(size for size, _ in options) for options in items)


def solve(items: Sequence[Sequence[tuple[int, float]]], budget: int) -> Solution:
    """One option per item (``items[i]`` lists ``(size, cost)``), total size ``<= budget``, least cost.

    Deterministic: ties in efficiency are taken in item order. Raises ``ValueError`` when even the
    smallest options exceed ``budget``.
    """
    hulls = [_hull(options) for options in items]
    choice = [hull[0] for hull in hulls]
    size = sum(items[i][j][0] for i, j in enumerate(choice))
    cost = sum(items[i][j][1] for i, j in enumerate(choice))
    if size > budget:
        raise ValueError(f"the smallest options take {size}, over the budget {budget}")
    steps = []
    for i, hull in enumerate(hulls):
        for n, (a, b) in enumerate(itertools.pairwise(hull)):
            ds, dc = items[i][b][0] - items[i][a][0], items[i][b][1] - items[i][a][1]
            steps.append((-dc / ds, i, n, b, ds, dc))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    bound: float | None = None
    blocked: set[int] = set()
    for efficiency, i, _, to, ds, dc in steps:
        if i in blocked:
            continue
        if size + ds <= budget:
            choice[i], size, cost = to, size + ds, cost + dc
            continue
        if bound is None:
            bound = cost - efficiency * (budget - size)
        blocked.add(i)
    return Solution(choice, size, cost, cost if bound is None else bound)


def _hull(options: Sequence[tuple[int, float]]) -> list[int]:
    """Indices of the options on the lower convex hull of (size, cost), from the smallest size on, cost
    falling and each step less efficient than the one before."""
    order = sorted(range(len(options)), key=lambda j: (options[j][0], options[j][1], j))
    hull: list[int] = []
    for j in order:
        s, c = options[j]
        if hull and (s == options[hull[-1]][0] or c >= options[hull[-1]][1]):
            continue
        while len(hull) >= 2:
            (s0, c0), (s1, c1) = options[hull[-2]], options[hull[-1]]
            if (c0 - c1) * (s - s0) <= (c0 - c) * (s1 - s0):  # the middle point lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(j)
    return hull
