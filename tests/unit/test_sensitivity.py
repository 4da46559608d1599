"""The mixed-precision budget solver (multiple-choice knapsack) against brute force."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from adm_export.errors import InvalidInputError
from adm_export.quantize.sensitivity import solve_budget


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
    from adm_export.formats import policy as pol
    from adm_export.numerics import rel_l2, run_denoiser
    from adm_export.quantize import sensitivity
    from adm_export.quantize.modelopt import quantize_with_plans

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


def test_block_names_group_layers_by_unet_block():
    from adm_export.quantize.sensitivity import block_of

    assert block_of("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == "down_blocks.1.attentions.0"
    assert block_of("up_blocks.2.resnets.1.conv_shortcut") == "up_blocks.2.resnets.1"
    assert block_of("up_blocks.0.upsamplers.0.conv") == "up_blocks.0.upsamplers.0"
    assert block_of("mid_block.resnets.1.conv2") == "mid_block.resnets.1"
    assert block_of("time_embedding.linear_1") == "time_embedding"
    assert block_of("conv_in") == "conv_in"
    # Make-An-Audio's LDM names.
    assert block_of("input_blocks.4.1.proj_in") == "input_blocks.4.1"
    assert block_of("middle_block.1.transformer_blocks.0.ff.net.2") == "middle_block.1"


def test_block_granularity_on_the_embedded_unet(tiny_adapter):
    from adm_export.formats import policy as pol
    from adm_export.quantize.sensitivity import group_plans

    plans = pol.resolve(pol.preset("mixed"), tiny_adapter.denoiser)
    layers = group_plans(plans, "layer")
    blocks = group_plans(plans, "block")
    assert len(layers) == len(plans) and all(len(v) == 1 for v in layers.values())
    # Every layer in exactly one block, far fewer items than layers.
    assert sorted(n for v in blocks.values() for n in v) == sorted(p.name for p in plans)
    assert len(blocks) < len(plans) / 2
    with pytest.raises(InvalidInputError, match="--sensitivity-granularity"):
        group_plans(plans, "channel")


@pytest.fixture(scope="module")
def small_search():
    """Sensitivity of the small net, per layer and with conv+proj as one block."""
    import torch

    pytest.importorskip("modelopt.torch.quantization")
    from adm_export.formats import policy as pol
    from adm_export.numerics import run_denoiser
    from adm_export.quantize import sensitivity
    from adm_export.quantize.modelopt import quantize_with_plans

    adapter = _Adapter()
    g = torch.Generator().manual_seed(2)
    points = [{"x": torch.randn(2, 32, 6, 6, generator=g)} for _ in range(2)]
    plans = pol.resolve(pol.preset("mixed"), adapter.denoiser)
    cands = {p.name: list(p.candidates) for p in plans}
    refs = [run_denoiser(adapter, adapter.denoiser, p) for p in points]

    def qfn(trial, pts):
        return quantize_with_plans(adapter, pts, trial)

    groups = {"front": ["conv", "proj"], "out": ["out"]}
    block_table = sensitivity.measure(adapter, points, points, plans, cands, qfn, refs, True, groups)
    return adapter, points, plans, cands, refs, qfn, groups, block_table


def test_block_search_gives_each_block_one_format(small_search):
    from adm_export.quantize import sensitivity

    adapter, points, plans, cands, refs, qfn, groups, table = small_search
    assert set(table) == {"front", "out"}
    layer_table = sensitivity.measure(adapter, points, points, plans, cands, qfn, refs, True)
    # Quantizing two layers at once hurts more than either alone (errors add in power).
    for fmt in ("int8", "w4a8"):
        assert table["front"][fmt] > max(layer_table["conv"][fmt], layer_table["proj"][fmt])
    modules = dict(adapter.denoiser.named_modules())
    fp16 = sum(p.params * 2 for p in plans)
    chosen, ranking, sol = sensitivity.choose(plans, table, cands, 0.4 * fp16, modules, True, groups=groups)
    fmt = {p.name: p.format for p in chosen}
    assert fmt["conv"] == fmt["proj"]
    assert sum(p.weight_bytes() for p in chosen) <= 0.4 * fp16
    assert sol["items"] == 2 and {r["layer"] for r in ranking} == {"front", "out"}
    assert next(r for r in ranking if r["layer"] == "front")["layers"] == 2


def test_trajectory_check_measures_the_most_sensitive_items(small_search):
    import math

    from adm_export.numerics import run_denoiser
    from adm_export.quantize import sensitivity

    adapter, points, plans, cands, refs, qfn, groups, table = small_search

    # A "trajectory" of one U-Net call on the points: its error must equal the one-call sensitivity.
    def final_latents(model):
        return [run_denoiser(adapter, model if model is not None else adapter.denoiser, p) for p in points]

    check = sensitivity.TrajectoryCheck(final_latents, top_k=1)
    again = sensitivity.measure(adapter, points, points, plans, cands, qfn, refs, True, groups, check)
    assert again == table  # the check does not change the measurement
    for fmt in ("int8", "fp8", "w4a8"):
        worst = max(table, key=lambda i: table[i][fmt])
        assert {k for k, v in check.results.items() if fmt in v} == {worst}
        assert check.results[worst][fmt] == pytest.approx(math.sqrt(table[worst][fmt]), rel=1e-4)


def test_crop_frames_keeps_a_frame_multiple_of_the_latent(tiny_adapter):
    from adm_export.quantize.sensitivity import crop_frames

    spec = tiny_adapter.denoiser_spec()
    point = spec.dummy_inputs(batch=2, frames=8 * spec.frame_multiple)
    (cropped,) = crop_frames([point], spec, 3 * spec.frame_multiple + 1)
    assert cropped["sample"].shape[2] == 3 * spec.frame_multiple
    assert (cropped["sample"] == point["sample"][:, :, : 3 * spec.frame_multiple]).all()
    # Inputs without a frames axis are untouched; 0 means full length.
    assert all(cropped[k] is point[k] for k in point if k != "sample")
    assert crop_frames([point], spec, 0)[0] is point
