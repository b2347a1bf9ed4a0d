import itertools
import random

import pytest

from moequant.budget import knapsack


def brute_force(items, budget):
    best = None
    for choice in itertools.product(*(range(len(options)) for options in items)):
        size = sum(items[i][j][0] for i, j in enumerate(choice))
        cost = sum(items[i][j][1] for i, j in enumerate(choice))
        if size <= budget and (best is None or cost < best):
            best = cost
    return best


def random_items(rng, n_items, widths=(2, 3, 4)):
    items = []
    for _ in range(n_items):
        numel = rng.choice([1, 2, 3, 5])
        scale = rng.lognormvariate(0, 2)
        items.append([(numel * b, scale * 4.0 ** -b * rng.uniform(0.5, 2.0)) for b in widths])
    return items


@pytest.mark.parametrize("seed", range(40))
def test_within_budget_and_between_bound_and_optimum(seed):
    rng = random.Random(seed)
    items = random_items(rng, rng.randint(1, 7))
    low, high = knapsack.smallest(items), knapsack.largest(items)
    budget = rng.randint(low, high)
    sol = knapsack.solve(items, budget)
    best = brute_force(items, budget)
    assert sol.size <= budget
    assert sol.size == sum(items[i][j][0] for i, j in enumerate(sol.choice))
    assert sol.cost == pytest.approx(sum(items[i][j][1] for i, j in enumerate(sol.choice)))
    assert sol.bound <= best + 1e-9 <= sol.cost + 2e-9


def test_many_items_are_near_optimal():
    rng = random.Random(7)
    items = random_items(rng, 400)
    budget = (knapsack.smallest(items) + knapsack.largest(items)) // 2
    sol = knapsack.solve(items, budget)
    assert sol.size <= budget
    assert sol.gap < 0.01
    assert budget - sol.size < 5  # the slack left is below the smallest step


def test_non_convex_and_dominated_options():
    # option 1 costs more than option 0 though larger: never worth it; option 2 beats the chord
    items = [[(2, 10.0), (3, 11.0), (4, 1.0)], [(2, 5.0), (3, 4.0), (4, 3.9)]]
    sol = knapsack.solve(items, 6)
    assert sol.choice == [2, 0]
    assert sol.cost == pytest.approx(6.0)
    assert sol.cost == pytest.approx(brute_force(items, 6))


def test_all_at_the_largest_when_the_budget_allows():
    items = [[(2, 3.0), (4, 1.0)], [(2, 2.0), (4, 0.5)]]
    sol = knapsack.solve(items, 8)
    assert sol.choice == [1, 1] and sol.gap == 0.0


def test_budget_below_the_smallest_options_is_refused():
    with pytest.raises(ValueError, match="smallest options"):
        knapsack.solve([[(2, 1.0), (3, 0.5)]], 1)


def test_deterministic_on_ties():
    items = [[(1, 2.0), (2, 1.0)] for _ in range(6)]
    first = knapsack.solve(items, 9)
    assert all(knapsack.solve(items, 9).choice == first.choice for _ in range(3))
    assert first.choice == [1, 1, 1, 0, 0, 0]
