"""The mixed-precision budget solver (multiple-choice knapsack) against brute force."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from adm_export.errors import InvalidInputError
from adm_export.export.sensitivity import solve_budget


def _brute(options, budget):
    best = None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        b = sum(options[i][j][0] for i, j in enumerate(combo))
        c = sum(options[i][j][1] for i, j in enumerate(combo))
        if b <= budget and (best is None or c < best[1] - 1e-12):
            best = (combo, c)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_solver_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    options = []
    for _ in range(n):
        params = rng.randint(100, 5000)
        # fp16 (big, exact), int8, int4: bytes fall as the error rises, like real layers.
        options.append([(2.0 * params, 0.0), (1.0 * params, rng.random() * 1e-3), (0.53 * params, rng.random() * 1e-2)])
    lo = sum(min(b for b, _ in o) for o in options)
    hi = sum(max(b for b, _ in o) for o in options)
    budget = lo + rng.random() * (hi - lo)
    res = 2000
    picked, total_b, total_c = solve_budget(options, budget, resolution=res)
    assert total_b <= budget
    # Exactly optimal for the problem with bytes rounded up to budget/res units ...
    unit = budget / res
    rounded = [[(math.ceil(b / unit - 1e-9) * unit, c) for b, c in o] for o in options]
    _, best_rounded = _brute(rounded, res * unit + 1e-6)
    assert total_c == pytest.approx(best_rounded, abs=1e-15)
    # ... hence never worse than the true optimum of a budget smaller by the rounding slack.
    slack = _brute(options, budget - len(options) * unit)
    if slack is not None:
        assert total_c <= slack[1] + 1e-15


def test_solver_prefers_compressing_insensitive_layers():
    # Two equal layers; compressing A costs little error, B a lot: with room for one INT4, pick A.
    options = [[(2000, 0.0), (530, 1e-6)], [(2000, 0.0), (530, 1e-2)]]
    picked, b, c = solve_budget(options, 2600)
    assert picked == [1, 0] and b == 2530 and c == pytest.approx(1e-6)
    # Whole budget: no compression needed.
    assert solve_budget(options, 4000)[0] == [0, 0]


def test_infeasible_budget_is_a_user_error():
    with pytest.raises(InvalidInputError, match="--size-budget"):
        solve_budget([[(100, 0.0), (60, 1.0)]], 50)
