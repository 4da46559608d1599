"""The ``quantize`` stage: ModelOpt fake quantization of the denoiser, calibrated on the cache.

Resolves the per-layer plan (preset or ``--policy``, checked against ``--target``), runs the
mixed-precision search for ``auto`` layers, quantizes a copy of the denoiser
(:mod:`adm_export.quantize.modelopt`) and saves it with ``mto.save``; restore it with
:func:`adm_export.quantize.modelopt.load_quantized`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path

from adm_export.artifacts import atomic_dir, manifest_digest, read_manifest, write_manifest
from adm_export.calibration.cache import load_cache, parity_indices
from adm_export.config import QuantizeConfig, to_dict
from adm_export.devices import exact_float32
from adm_export.formats import recipes
from adm_export.formats.policy import summary as pol_summary
from adm_export.numerics import import_modelopt, rel_l2, run_denoiser
from adm_export.quantize.modelopt import (STAGE, STATE_FILE, output_quantized_layers, plan_layers,
                                          quantize_with_plans, quantizer_counts, resolve_placement)
from adm_export.quantize.search import search_mixed

logger = logging.getLogger(__name__)


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
    _, mto = import_modelopt()

    # 2. The per-layer plan: policy (preset or --policy) checked against --target.
    plans, policy, capability = plan_layers(cfg, adapter)

    # 3. Full-precision reference outputs on the cached points, for the quantization error.
    reference = [run_denoiser(adapter, adapter.denoiser, p) for p in cache.points()]

    # 4. Mixed precision: sensitivity per layer and the budget solver choose the 'auto' layers.
    search = None
    if policy.searched:
        plans, search = search_mixed(cfg, adapter, cache, plans, policy,
                                     lambda pts: [run_denoiser(adapter, adapter.denoiser, p) for p in pts])

    # 5. Quantize a copy with the final plan, calibrated on the cache, with the Q/DQ placement the
    #    serving target needs (or --placement).
    placement = resolve_placement(cfg, adapter.family)
    logger.info("placement %s (%s)", placement["value"], placement["reason"])
    model = quantize_with_plans(adapter, list(cache.points()), plans, placement["value"])
    errors = [rel_l2(run_denoiser(adapter, model, p), ref) for p, ref in zip(cache.points(), reference)]
    counts = quantizer_counts(model)
    logger.info("quantized %s: %d weight and %d input quantizers; error vs full precision: mean %.4f, max %.4f",
                cfg.precision.value, counts["weight"], counts["input"], sum(errors) / len(errors), max(errors))
    if search is not None:
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
                "placement": placement["value"],
                "placement_choice": placement,
                "output_quantized": output_quantized_layers(plans, placement["value"]),
                "quantizers": counts,
                "quant_error_rel_l2": {"per_point": errors, "mean": sum(errors) / len(errors), "max": max(errors)},
                "calibration_points": len(cache),
                "spec": cal_manifest["spec"],
            },
        )
    return manifest
