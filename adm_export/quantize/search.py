"""The mixed-precision search of ``--precision mixed --size-budget F`` over the ``auto`` layers.

Measures every searched layer's (or block's) sensitivity per candidate format
(:mod:`adm_export.quantize.sensitivity`), reserves the bytes the layers outside the search and the
graph take, and lets the budget solver choose the formats; optionally runs ModelOpt's own
``auto_quantize`` side by side.
"""

from __future__ import annotations

import contextlib

from adm_export.calibration.cache import CalibrationCache, parity_points
from adm_export.config import QuantizeConfig
from adm_export.errors import InvalidInputError
from adm_export.formats import capabilities, policy as pol
from adm_export.quantize import sensitivity
from adm_export.quantize.modelopt import quantize_with_plans


def search_mixed(cfg: QuantizeConfig, adapter, cache: CalibrationCache, plans, policy, references_for,
                 compare_auto_quantize: bool = True, final_latents=None):
    """Sensitivity search for the ``auto`` layers; returns ``(plans, search_report)``.

    Args:
        cfg: Quantization settings (budget, granularity, trajectory check).
        adapter: The model adapter.
        cache: The calibration cache (points; prompts and sampler settings of the trajectory check).
        plans: Resolved layer plans; the ``auto`` ones are searched.
        policy: The policy the plans came from.
        references_for: ``references_for(points) -> full-precision outputs``.
        compare_auto_quantize: Also run ModelOpt's ``mtq.auto_quantize`` side by side.
        final_latents: ``final_latents(model) -> tensors`` for the trajectory check; default a short
            sampler run on the cache's first prompts (:func:`short_trajectory`).
    """
    modules = {n: m for n, _, m in pol.compute_layers(adapter.denoiser)}
    auto = [p for p in plans if p.format == "auto"]
    fixed = [p for p in plans if p.format != "auto"]
    candidates = {p.name: capabilities.allowed_formats(cfg.target, p.kind, p.candidates) or ["fp16"] for p in auto}
    groups = sensitivity.group_plans(auto, cfg.sensitivity_granularity)
    calib = list(cache.points())
    spec = adapter.denoiser_spec()
    full_points = parity_points(cache, cfg.sensitivity_points)
    # Trials on the first --sensitivity-frames frames (quantizer ranges still from the full points).
    eval_points = sensitivity.crop_frames(full_points, spec, cfg.sensitivity_frames)
    refs = references_for(eval_points)
    full_frames = _frames(full_points[0], spec)
    trial_frames = _frames(eval_points[0], spec)

    def quantize_fn(trial, pts):
        return quantize_with_plans(adapter, pts, [*fixed, *trial], "tensorrt")

    check, trajectory_settings = None, None
    if cfg.trajectory_check > 0:
        if final_latents is None:
            # The sampler run is as short as the trials' latents (same share of the cache's length).
            final_latents, trajectory_settings = short_trajectory(adapter, cache, trial_frames / max(full_frames, 1))
        check = sensitivity.TrajectoryCheck(final_latents, cfg.trajectory_check)
    table = sensitivity.measure(adapter, calib, eval_points, auto, candidates, quantize_fn, refs, policy.int4_convs,
                                groups, check)
    trajectory = check.results if check is not None else {}
    params = adapter.denoiser_parameter_count()
    fp32 = 4 * params
    # Bytes not owned by a searched layer: FP32 non-layer parameters (biases, norms) and the
    # fixed layers in their formats; the searched layers share what the budget leaves.
    layer_params = sum(p.params for p in plans)
    fixed_bytes = 4 * (params - layer_params) + sum(p.weight_bytes() for p in fixed)
    # What the file holds besides weights (nodes, names, Q/DQ scalars): measured ~1.4 kB per
    # conv/linear layer on the tiny U-Net after name shortening; reserve the larger of that
    # (with margin) and 1% of the budget.
    overhead = max(GRAPH_OVERHEAD * cfg.size_budget * fp32, GRAPH_BYTES_PER_LAYER * len(plans))
    budget = cfg.size_budget * fp32 - overhead - fixed_bytes
    if budget <= 0:
        raise InvalidInputError(
            f"--size-budget {cfg.size_budget} is infeasible: the layers outside the search already take "
            f"{fixed_bytes / fp32:.1%} of the FP32 size; raise --size-budget")
    chosen, ranking, solution = sensitivity.choose(auto, table, candidates, budget, modules, policy.int4_convs,
                                                   groups=groups, trajectory=trajectory)
    by_name = {p.name: p for p in chosen}
    plans = [by_name.get(p.name, p) for p in plans]
    predicted_bytes = 4 * (params - layer_params) + sum(p.weight_bytes() for p in plans)
    solution.update({"budget_fraction": cfg.size_budget, "fp32_bytes": fp32, "fixed_bytes": fixed_bytes,
                     "predicted_weight_bytes": predicted_bytes, "predicted_fraction": predicted_bytes / fp32,
                     "graph_overhead_reserved_bytes": overhead, "eval_points": len(eval_points),
                     "calibration_points": len(calib), "granularity": cfg.sensitivity_granularity,
                     "trial_frames": trial_frames, "point_frames": full_frames,
                     "trajectory_check": {"top_k": cfg.trajectory_check, **(trajectory_settings or {})},
                     "candidates": sorted({f for c in candidates.values() for f in c})})
    comparison = None
    if compare_auto_quantize:
        comparison = sensitivity.auto_quantize_comparison(adapter, calib, eval_points, refs, 32 * cfg.size_budget)
    return plans, {"ranking": ranking, "solution": solution, "modelopt_auto_quantize": comparison}


# The trajectory check's sampler run: few steps on the cache's first prompts (its own seeds).
TRAJECTORY_STEPS = 4
TRAJECTORY_PROMPTS = 2


def _frames(point: dict, spec) -> int:
    """Latent frames of a cached point (its first input with a ``frames`` axis)."""
    for name, dims in spec.dynamic_axes().items():
        for axis, dim in dims.items():
            if dim == "frames" and name in point:
                return int(point[name].shape[axis])
    return 0


def short_trajectory(adapter, cache: CalibrationCache, length_share: float = 1.0):
    """A ``final_latents(model)`` function for the trajectory check, and its settings.

    Runs the sampler (``TRAJECTORY_STEPS`` steps, ``length_share`` of the cache's audio length,
    its guidance) on the cache's first prompts with ``model`` as the denoiser and returns what
    reaches the VAE decoder: the final latents. Pipelines without a ``vae.decoder`` fall back to
    the waveforms.
    """
    import torch

    calib_cfg = cache.manifest["config"]
    prompts = list(cache.prompts)[:TRAJECTORY_PROMPTS]
    seeds = [int(calib_cfg.get("seed", 0)) + i for i in range(len(prompts))]
    seconds = float(calib_cfg["audio_seconds"]) * min(max(length_share, 0.0), 1.0)
    decoder = getattr(getattr(adapter.pipeline, "vae", None), "decoder", None)
    settings = {"steps": TRAJECTORY_STEPS, "prompts": len(prompts), "audio_seconds": round(seconds, 3),
                "compared": "final latents (VAE decoder input)" if decoder is not None else "waveforms"}

    def final_latents(model):
        seen: list = []
        handle = None
        if decoder is not None:
            handle = decoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float().cpu()))
        try:
            with contextlib.ExitStack() as stack:
                if model is not None:
                    stack.enter_context(adapter.using_denoiser(model))
                audio = adapter.generate(prompts, seeds, TRAJECTORY_STEPS, seconds, calib_cfg["guidance_scale"])
        finally:
            if handle is not None:
                handle.remove()
        return seen if seen else [torch.as_tensor(a) for a in audio]

    return final_latents, settings


# Share of the budget kept free for what the ONNX file holds besides weights (graph, shapes, names).
GRAPH_OVERHEAD = 0.01
GRAPH_BYTES_PER_LAYER = 2000
