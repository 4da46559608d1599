"""Sensitivity search for ``--precision mixed --size-budget F``.

1. Sensitivity: for every candidate format, quantize the whole denoiser once in that format
   (calibrating every quantizer on the cache), then switch all quantizers off and turn on one
   layer's quantizers at a time: the layer's sensitivity to the format is the mean squared
   relative L2 error of the U-Net output against full precision over the measurement points.
   ``fp16`` is taken as 0 (FP16 rounding of one layer is far below INT8/FP8 noise).
2. Budget: the exported U-Net must weigh at most ``F`` x its FP32 bytes. Bytes not owned by a
   searched layer (biases, norms, embeddings' own parameters, stay FP32) are fixed; each layer's
   options cost the bytes its weight is stored in (``policy.weight_bytes``: codes plus FP32 scales).
3. Choice: minimise the total sensitivity (errors of independent layers add in power) subject to
   the byte budget: a multiple-choice knapsack solved exactly by dynamic programming over bytes
   rounded *up* to ``budget / resolution`` units (so a found choice is always within budget).
4. Prediction: ``sqrt(sum of the chosen sensitivities)`` is the predicted relative error of the
   mixed model; the quantize stage then measures the real one and reports both.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Callable, Sequence

from adm_export.errors import InvalidInputError
from adm_export.progress import progress

logger = logging.getLogger(__name__)


def solve_budget(options: Sequence[Sequence[tuple[float, float]]], budget: float,
                 resolution: int = 4000) -> tuple[list[int], float, float]:
    """Pick one option per item minimising total cost with total bytes within ``budget``.

    Args:
        options: Per item, ``(bytes, cost)`` of each option.
        budget: Byte budget for the items together.
        resolution: Number of byte units the budget is divided into (bytes round up, so the
            result is always feasible; it is optimal up to that rounding).

    Returns:
        ``(choice, bytes, cost)``: the chosen option index per item and their totals.

    Raises:
        InvalidInputError: Even the smallest option of every item exceeds ``budget``.
    """
    import numpy as np

    min_bytes = sum(min(b for b, _ in opts) for opts in options)
    if min_bytes > budget:
        raise InvalidInputError(
            f"--size-budget is infeasible: the smallest formats need {min_bytes / 1e6:.2f} MB for the searched "
            f"layers, the budget leaves {budget / 1e6:.2f} MB; raise --size-budget")
    unit = max(budget / resolution, 1e-9)
    cap = int(math.floor(budget / unit + 1e-9))
    inf = float("inf")
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    choices = np.zeros((len(options), cap + 1), dtype=np.int16)
    for i, opts in enumerate(options):
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j, (b, c) in enumerate(opts):
            w = int(math.ceil(b / unit - 1e-9))
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = dp[: cap + 1 - w] + c
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        dp, choices[i] = new, pick
    end = int(np.argmin(dp))
    if not np.isfinite(dp[end]):  # pragma: no cover - excluded by the min_bytes check up to rounding
        raise InvalidInputError("--size-budget is infeasible after rounding; raise --size-budget slightly")
    # Backtrack: the capacity used after item i is end; step back by the chosen option's weight.
    picked = [0] * len(options)
    c = end
    for i in range(len(options) - 1, -1, -1):
        j = int(choices[i, c])
        picked[i] = j
        c -= int(math.ceil(options[i][j][0] / unit - 1e-9))
    total_b = sum(options[i][j][0] for i, j in enumerate(picked))
    total_c = sum(options[i][j][1] for i, j in enumerate(picked))
    return picked, total_b, total_c


def _quantizers(module):
    return [getattr(module, n) for n in ("weight_quantizer", "input_quantizer", "output_quantizer")
            if getattr(getattr(module, n, None), "is_enabled", False)]


def measure(adapter, calib_points: list[dict], eval_points: list[dict], plans, candidates: dict[str, list[str]],
            quantize_fn: Callable, references: list, int4_convs: bool = True) -> dict[str, dict[str, float]]:
    """Per-layer sensitivity: ``{layer: {format: mean squared rel-L2 output error}}``.

    Args:
        adapter: The model adapter.
        calib_points: Points the quantizers are calibrated on.
        eval_points: Points the error is measured on.
        plans: The resolved (``auto``) layer plans.
        candidates: ``{layer: [formats the target can run]}``.
        quantize_fn: ``quantize_fn(plans) -> model`` quantizing a copy of the denoiser.
        references: Full-precision outputs on ``eval_points``.
        int4_convs: The policy's INT4-convolution switch.
    """
    import torch

    from adm_export.export.policy import with_format
    from adm_export.export.quantize import rel_l2, run_denoiser

    modules = dict((n, m) for n, m in adapter.denoiser.named_modules())
    formats = sorted({f for fs in candidates.values() for f in fs if f != "fp16"})
    table: dict[str, dict[str, float]] = {p.name: {"fp16": 0.0} for p in plans}
    for fmt in formats:
        # Every layer that can take this format gets it; the others stay in FP16.
        trial = [with_format(p, fmt if fmt in candidates[p.name] else "fp16", modules[p.name], int4_convs)
                 for p in plans]
        model = quantize_fn(trial, calib_points)
        layers = dict(model.named_modules())
        saved = {}
        for p in trial:
            qs = _quantizers(layers[p.name])
            saved[p.name] = qs
            for q in qs:
                q.disable()
        for p in progress(trial, desc=f"sensitivity {fmt}", unit="layer"):
            if p.format != fmt:
                continue  # fell back (no INT4 block fits) or not a candidate here: measured as its own format
            for q in saved[p.name]:
                q.enable()
            with torch.no_grad():
                errs = [rel_l2(run_denoiser(adapter, model, x), ref) ** 2 for x, ref in zip(eval_points, references)]
            table[p.name][fmt] = sum(errs) / len(errs)
            for q in saved[p.name]:
                q.disable()
        del model
    return table


def choose(plans, table: dict[str, dict[str, float]], candidates: dict[str, list[str]], budget_bytes: float,
           modules: dict, int4_convs: bool, resolution: int = 4000):
    """Solve the budget and return ``(plans, ranking, solution)``.

    ``ranking`` lists layers from most to least sensitive (by their error in the most compressed
    format measured); ``solution`` has the byte and sensitivity totals and the predicted error.
    """
    from adm_export.export.policy import with_format

    options, labels = [], []
    for p in plans:
        opts, labs = [], []
        for fmt in candidates[p.name]:
            if fmt not in table[p.name]:
                continue
            realized = with_format(p, fmt, modules[p.name], int4_convs)
            if realized.format != fmt:
                continue
            opts.append((realized.weight_bytes(), table[p.name][fmt]))
            labs.append(fmt)
        options.append(opts)
        labels.append(labs)
    picked, total_b, total_c = solve_budget(options, budget_bytes, resolution)
    chosen = [with_format(p, labels[i][j], modules[p.name], int4_convs, "chosen by the sensitivity search")
              for i, (p, j) in enumerate(zip(plans, picked))]

    def worst(name):
        errs = [v for k, v in table[name].items() if k != "fp16"]
        return max(errs) if errs else 0.0

    ranking = sorted(({"layer": p.name, "kind": p.kind, "params": p.params,
                       "sensitivity": {k: v for k, v in table[p.name].items()}, "chosen": c.format}
                      for p, c in zip(plans, chosen)), key=lambda r: -worst(r["layer"]))
    return chosen, ranking, {"searched_bytes": total_b, "searched_budget_bytes": budget_bytes,
                             "total_sensitivity": total_c, "predicted_rel_l2": math.sqrt(max(total_c, 0.0))}


def auto_quantize_comparison(adapter, points: list[dict], eval_points: list[dict], references: list,
                             effective_bits: float) -> dict:
    """ModelOpt's own ``mtq.auto_quantize`` on the denoiser, side by side with our search.

    Its gradient-based per-layer scores use the loss ``MSE(output, full-precision output)`` on
    the calibration points; its formats are ModelOpt's INT8, FP8 and INT4-blockwise (weight-only)
    presets under an ``effective_bits`` constraint (``size_budget x 32`` bits per weight). Note
    that its INT4 preset blocks along a weight's last axis, which for a 3x3 convolution is the
    3-wide kernel axis; it only scores weights, not our exported byte count.

    Returns:
        ``{"ran": True, "effective_bits", "recipes" (format -> layer count), "measured_rel_l2"}``,
        or ``{"ran": False, "reason"}``.
    """
    import collections
    import copy

    import torch

    from adm_export.export.quantize import _mtq, rel_l2, run_denoiser

    mtq, _ = _mtq()
    model = copy.deepcopy(adapter.denoiser).eval()
    with torch.no_grad():
        refs = [run_denoiser(adapter, adapter.denoiser, p) for p in points]
    batches = [{"inputs": p, "ref": r} for p, r in zip(points, refs)]

    def forward_step(m, batch):
        return adapter.export_module(m)(*batch["inputs"].values())

    def loss_func(output, batch):
        return torch.nn.functional.mse_loss(output.float(), batch["ref"].float())

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model, state = mtq.auto_quantize(
                model, constraints={"effective_bits": effective_bits},
                quantization_formats=["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"],
                data_loader=batches, forward_step=forward_step, loss_func=loss_func,
                num_calib_steps=len(batches), num_score_steps=len(batches), verbose=False)
    except Exception as exc:  # noqa: BLE001 - a comparison must not break the build
        return {"ran": False, "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    best = (state or {}).get("best", {})
    recipes = collections.Counter(str(v).split("(")[0] for v in (best.get("recipe") or {}).values())
    with torch.no_grad():
        errs = [rel_l2(run_denoiser(adapter, model, p), r) for p, r in zip(eval_points, references)]
    return {"ran": True, "effective_bits": effective_bits,
            "achieved_effective_bits": (best.get("constraints") or {}).get("effective_bits"),
            "recipes": dict(recipes), "measured_rel_l2": math.sqrt(sum(e * e for e in errs) / len(errs))}
