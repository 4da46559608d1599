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


class _Adapter:
    """The slice of a model adapter the search uses, around a small conv + linear network."""

    def __init__(self):
        import torch

        torch.manual_seed(0)

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(32, 64, 3, padding=1)
                self.proj = torch.nn.Linear(64, 128)
                self.out = torch.nn.Linear(128, 64)

            def forward(self, x):
                h = torch.nn.functional.silu(self.conv(x)).flatten(2).transpose(1, 2)
                return self.out(torch.nn.functional.gelu(self.proj(h)))

        self.denoiser = Net().eval()

    def export_module(self, m=None):
        return m if m is not None else self.denoiser


def test_sensitivity_search_fits_budget_and_predicts_error():
    import math

    import torch

    pytest.importorskip("modelopt.torch.quantization")
    from adm_export.export import policy as pol, sensitivity
    from adm_export.export.quantize import quantize_with_plans, rel_l2, run_denoiser

    adapter = _Adapter()
    g = torch.Generator().manual_seed(1)
    points = [{"x": torch.randn(2, 32, 6, 6, generator=g)} for _ in range(3)]
    plans = pol.resolve(pol.preset("mixed"), adapter.denoiser)
    assert all(p.format == "auto" for p in plans)
    cands = {p.name: list(p.candidates) for p in plans}
    refs = [run_denoiser(adapter, adapter.denoiser, p) for p in points]
    table = sensitivity.measure(adapter, points, points, plans, cands,
                                lambda trial, pts: quantize_with_plans(adapter, pts, trial), refs, True)
    # Every layer measured in every candidate; INT4 hurts more than INT8 on every layer.
    assert all(set(table[p.name]) == {"fp16", "int8", "fp8", "w4a8"} for p in plans)
    assert all(table[n]["w4a8"] > table[n]["int8"] > 0 for n in table)
    modules = dict(adapter.denoiser.named_modules())
    fp16 = sum(p.params * 2 for p in plans)
    budget = 0.35 * fp16  # forces INT4 somewhere (INT8 everywhere is ~0.5 of FP16)
    chosen, ranking, sol = sensitivity.choose(plans, table, cands, budget, modules, True)
    assert sum(p.weight_bytes() for p in chosen) <= budget
    assert any(p.weight == "int4" for p in chosen)
    assert [r["layer"] for r in ranking][0] in table
    model = quantize_with_plans(adapter, points, chosen)
    measured = math.sqrt(sum(rel_l2(run_denoiser(adapter, model, p), r) ** 2 for p, r in zip(points, refs)) / 3)
    # Additive-noise prediction within a factor of 2 of the measured error on this small net.
    assert 0.5 < sol["predicted_rel_l2"] / measured < 2.0
