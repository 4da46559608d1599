"""The ``quantize`` stage: ModelOpt fake quantization of the denoiser, calibrated on the cache.

The denoiser is copied before quantization so the caller's full-precision model stays intact
(``build`` and ``eval`` need it as the baseline). The result is saved with ``mto.save`` (the
ModelOpt state and the weights) and restored onto a fresh copy of the same model with
:func:`load_quantized`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import warnings
from pathlib import Path

from adm_export.artifacts import atomic_dir, check_same_model, manifest_digest, read_manifest, write_manifest
from adm_export.calibration.cache import CalibrationCache, load_cache
from adm_export.config import QuantizeConfig, to_dict
from adm_export.devices import exact_float32
from adm_export.errors import InvalidInputError, require
from adm_export.export import recipes
from adm_export.export.policy import summary as pol_summary
from adm_export.progress import progress

logger = logging.getLogger(__name__)

STAGE = "quantized"
STATE_FILE = "unet.modelopt.pth"


def _mtq():
    with warnings.catch_warnings():
        # ModelOpt warns about untested transformers versions on import; not actionable here.
        warnings.simplefilter("ignore")
        require("modelopt.torch.opt", "nvidia-modelopt", "quantization")
        import modelopt.torch.opt as mto
        import modelopt.torch.quantization as mtq
    return mtq, mto


def rel_l2(a, b) -> float:
    """Relative L2 error ``||a - b|| / ||b||`` (float64, on the CPU: ``a`` and ``b`` may live on
    different devices, e.g. an ONNX Runtime output on the host against a torch output on the GPU)."""
    import torch

    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_denoiser(adapter, module, inputs: dict):
    """One denoiser call on named inputs (spec order), returning the output tensor.

    The inputs (typically cached on the CPU) are moved to the module's device and dtype first
    (:func:`adm_export.devices.to_module`); the output stays on the module's device.
    """
    import torch

    from adm_export.devices import to_module

    with torch.inference_mode():
        return adapter.export_module(module)(*to_module(inputs, module).values())


def quantize_denoiser(adapter, cache: CalibrationCache, cfg: QuantizeConfig, plans=None):
    """Return a quantized copy of the adapter's denoiser, calibrated by replaying the cache.

    Args:
        adapter: The model adapter.
        cache: Calibration cache.
        cfg: Quantization settings.
        plans: Per-layer plans (``policy.LayerPlan``); default: the preset's, resolved on the model.
    """
    if plans is None:
        plans, _, _ = plan_layers(cfg, adapter)
    return quantize_with_plans(adapter, list(cache.points()), plans, cfg.placement)


def output_quantized_layers(plans, placement) -> list[str]:
    """Layers whose output gets an INT8 quantizer: INT8 convolutions under ONNX Runtime placement.

    ONNX Runtime runs an integer convolution (QLinearConv) only for DQ -> Conv -> Q. Linear layers
    already run as MatMulIntegerToFloat without it, so only convolutions pay the extra rounding.
    """
    from adm_export.config import Placement

    if Placement(placement) != Placement.ONNXRUNTIME:
        return []
    return [p.name for p in plans if p.kind == "conv" and p.format == "int8"]


def quantize_with_plans(adapter, points: list[dict], plans, placement="tensorrt"):
    """Quantize a copy of the denoiser with explicit per-layer plans, calibrated on ``points``."""
    from adm_export.devices import to_module
    from adm_export.export import policy as pol

    mtq, _ = _mtq()
    model = copy.deepcopy(adapter.denoiser).eval()

    def forward_loop(m):
        wrapped = adapter.export_module(m)
        for inputs in progress(points, desc="quantize: calibrating", unit="point"):
            wrapped(*to_module(inputs, m).values())

    import torch

    qcfg = pol.compile_quant_cfg(plans, output_quantized_layers(plans, placement))
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(model, qcfg, forward_loop)
    round_high_precision_weights(model)
    check_realized(model, plans)
    return model


def check_realized(model, plans) -> None:
    """Fail loudly if ModelOpt's quantizers do not implement the plan (a compile bug, not user error)."""
    layers = dict(model.named_modules())
    for p in plans:
        m = layers[p.name]
        wq = getattr(m, "weight_quantizer", None)
        on = wq is not None and getattr(wq, "is_enabled", False)
        want = p.weight != "fp16"
        if on != want:
            raise RuntimeError(f"layer {p.name}: weight quantizer {'on' if on else 'off'}, plan says {p.weight}")
        if on:
            bits = {"int8": 8, "fp8": (4, 3), "int4": 4}[p.weight]
            got = tuple(wq.num_bits) if isinstance(wq.num_bits, (tuple, list)) else wq.num_bits
            if got != bits:
                raise RuntimeError(f"layer {p.name}: weight quantizer has {wq.num_bits} bits, plan says {p.weight}")


def plan_layers(cfg: QuantizeConfig, adapter):
    """Resolve the policy (preset or ``--policy``) on the denoiser and check it against ``--target``.

    Returns:
        ``(plans, policy, capability_report)``; ``auto`` layers are left for the search.
    """
    from adm_export.export import capabilities, policy as pol

    policy = pol.load_policy(cfg.policy) if cfg.policy else pol.preset(cfg.precision.value)
    if policy.searched and cfg.size_budget is None:
        raise InvalidInputError(f"policy {policy.name!r} leaves formats to the search ('auto'); give --size-budget F")
    plans = pol.resolve(policy, adapter.denoiser)
    modules = {n: m for n, _, m in pol.compute_layers(adapter.denoiser)}
    fixed = [p for p in plans if p.format != "auto"]
    flag = "--policy" if cfg.policy else f"--precision {cfg.precision.value}"
    checked, report = capabilities.check_plans(fixed, cfg.target, cfg.allow_adjust, modules, policy.int4_convs, flag)
    by_name = {p.name: p for p in checked}
    plans = [by_name.get(p.name, p) for p in plans]
    changed = {c["layer"] for c in report["changes"]}
    groups: dict = {}
    for p in plans:
        if p.format not in (p.requested, "auto") and p.name not in changed:
            g = groups.setdefault((p.requested, p.format, p.kind), {"requested": p.requested, "format": p.format,
                                                                     "kind": p.kind, "layers": 0, "example": p.name,
                                                                     "why": p.why})
            g["layers"] += 1
    report["fallbacks"] = list(groups.values())
    return plans, policy, report


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
    from adm_export.export import capabilities, policy as pol, sensitivity

    modules = {n: m for n, _, m in pol.compute_layers(adapter.denoiser)}
    auto = [p for p in plans if p.format == "auto"]
    fixed = [p for p in plans if p.format != "auto"]
    candidates = {p.name: capabilities.allowed_formats(cfg.target, p.kind, p.candidates) or ["fp16"] for p in auto}
    groups = sensitivity.group_plans(auto, cfg.sensitivity_granularity)
    calib = list(cache.points())
    from adm_export.export.onnx import parity_points

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


def round_high_precision_weights(model) -> int:
    """Round the weights of conv/linear layers that stay unquantized to FP16 precision.

    Those layers are "kept in FP16": the engines run them in FP16 and the export stores them in
    FP16. Rounding them here makes the torch fake-quant model compute exactly what is exported,
    so parity compares like with like and the measured quantization error includes it.

    Returns:
        The number of layers rounded.
    """
    import torch

    n = 0
    for module in model.modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        wq = getattr(module, "weight_quantizer", None)
        if wq is not None and getattr(wq, "is_enabled", False):
            continue
        with torch.no_grad():
            module.weight.copy_(module.weight.half().float())
        n += 1
    return n


def quantizer_counts(model) -> dict:
    """Enabled weight/input/output quantizers, and the layers that carry a weight quantizer."""
    counts = {"weight": 0, "input": 0, "output": 0, "other": 0}
    for name, module in model.named_modules():
        # TensorQuantizer and its subclasses (StaticBlockScaleQuantizer for INT4 blocks).
        if not type(module).__name__.endswith("Quantizer") or not getattr(module, "is_enabled", False):
            continue
        kind = name.rsplit(".", 1)[-1].replace("_quantizer", "")
        counts[kind if kind in counts else "other"] += 1
    return counts


@exact_float32()  # quantization errors and sensitivities are ~1e-2: no TF32 noise in them
def quantize(cfg: QuantizeConfig, calibration: str | Path, out: str | Path, force: bool = False,
             adapter=None, model_id: str | None = None) -> dict:
    """Run the ``quantize`` stage.

    Args:
        cfg: Quantization settings.
        calibration: Calibration cache folder.
        out: Output folder (refused if non-empty unless ``force``).
        force: Overwrite ``out``.
        adapter: An already loaded model adapter; loaded from the cache's model id otherwise.
        model_id: ``--model`` given by the user; must match the cache's model.

    Returns:
        The manifest of the quantized artifact.
    """
    from adm_export.models import load_model

    # 1. The cache and the model it was made from.
    cal_manifest = read_manifest(calibration, "calibration", "--calibration")
    if adapter is None:
        adapter = load_model(model_id or cal_manifest["model"]["id"], cfg.device)
    cache = load_cache(calibration, adapter.identity())
    _, mto = _mtq()

    # 2. The per-layer plan: policy (preset or --policy) checked against --target.
    plans, policy, capability = plan_layers(cfg, adapter)

    # 3. Full-precision reference outputs on the cached points, for the quantization error.
    reference = [run_denoiser(adapter, adapter.denoiser, p) for p in cache.points()]

    # 4. Mixed precision: sensitivity per layer and the budget solver choose the 'auto' layers.
    search = None
    if policy.searched:
        plans, search = search_mixed(cfg, adapter, cache, plans, policy,
                                     lambda pts: [run_denoiser(adapter, adapter.denoiser, p) for p in pts])

    # 5. Quantize a copy with the final plan, calibrated on the cache.
    model = quantize_with_plans(adapter, list(cache.points()), plans, cfg.placement)
    errors = [rel_l2(run_denoiser(adapter, model, p), ref) for p, ref in zip(cache.points(), reference)]
    counts = quantizer_counts(model)
    logger.info("quantized %s: %d weight and %d input quantizers; error vs full precision: mean %.4f, max %.4f",
                cfg.precision.value, counts["weight"], counts["input"], sum(errors) / len(errors), max(errors))
    if search is not None:
        from adm_export.export.onnx import parity_indices

        # The search's points (full length), whose errors step 5 has already measured.
        measured = [errors[i] for i in parity_indices(len(cache), cfg.sensitivity_points)]
        search["solution"]["measured_rel_l2"] = math.sqrt(sum(e * e for e in measured) / len(measured))
        logger.info("mixed: predicted error %.4f, measured %.4f; weights %.1f%% of FP32 (budget %.0f%%)",
                    search["solution"]["predicted_rel_l2"], search["solution"]["measured_rel_l2"],
                    100 * search["solution"]["predicted_fraction"], 100 * cfg.size_budget)

    # 6. Save the ModelOpt state with its weights.
    with atomic_dir(out, force=force) as tmp:
        with contextlib.redirect_stdout(io.StringIO()):
            mto.save(model, str(tmp / STATE_FILE))
        manifest = write_manifest(
            tmp, STAGE, adapter.identity(), to_dict(cfg),
            inputs={"calibration": manifest_digest(cal_manifest)},
            extra={
                "recipe": recipes.describe(cfg.precision, policy),
                "layers": [p.to_dict() for p in plans],
                "formats": pol_summary(plans),
                "capability": capability,
                "search": search,
                "placement": cfg.placement.value,
                "output_quantized": output_quantized_layers(plans, cfg.placement),
                "quantizers": counts,
                "quant_error_rel_l2": {"per_point": errors, "mean": sum(errors) / len(errors), "max": max(errors)},
                "calibration_points": len(cache),
                "spec": cal_manifest["spec"],
            },
        )
    return manifest


def load_quantized(folder: str | Path, adapter, flag: str = "--quantized"):
    """Restore a quantized denoiser saved by :func:`quantize` onto a copy of the adapter's denoiser.

    Returns:
        ``(module, manifest)``.
    """
    manifest = read_manifest(folder, STAGE, flag)
    check_same_model(manifest, adapter.identity(), flag)
    _, mto = _mtq()
    model = copy.deepcopy(adapter.denoiser).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        model = mto.restore(model, str(Path(folder) / STATE_FILE))
    return model, manifest
