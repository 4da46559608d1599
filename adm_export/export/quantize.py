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
import warnings
from pathlib import Path

from adm_export.artifacts import atomic_dir, check_same_model, manifest_digest, read_manifest, write_manifest
from adm_export.calibration.cache import CalibrationCache, load_cache
from adm_export.config import QuantizeConfig, to_dict
from adm_export.errors import require
from adm_export.export import recipes
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
    """Relative L2 error ``||a - b|| / ||b||`` (float64)."""
    a = a.detach().double()
    b = b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_denoiser(adapter, module, inputs: dict):
    """One denoiser call on named inputs (spec order), returning the output tensor."""
    import torch

    with torch.inference_mode():
        return adapter.export_module(module)(*inputs.values())


def quantize_denoiser(adapter, cache: CalibrationCache, cfg: QuantizeConfig):
    """Return a quantized copy of the adapter's denoiser, calibrated by replaying the cache."""
    mtq, _ = _mtq()
    model = copy.deepcopy(adapter.denoiser).eval()
    points = list(cache.points())

    def forward_loop(m):
        wrapped = adapter.export_module(m)
        for inputs in progress(points, desc="quantize: calibrating", unit="point"):
            wrapped(*inputs.values())

    import torch

    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(model, recipes.quant_config(cfg.precision), forward_loop)
    round_high_precision_weights(model)
    return model


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
        if type(module).__name__ != "TensorQuantizer" or not getattr(module, "is_enabled", False):
            continue
        kind = name.rsplit(".", 1)[-1].replace("_quantizer", "")
        counts[kind if kind in counts else "other"] += 1
    return counts


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

    # 2. Full-precision reference outputs on the cached points, for the quantization error.
    reference = [run_denoiser(adapter, adapter.denoiser, p) for p in cache.points()]

    # 3. Quantize a copy, calibrated on the cache.
    model = quantize_denoiser(adapter, cache, cfg)
    errors = [rel_l2(run_denoiser(adapter, model, p), ref) for p, ref in zip(cache.points(), reference)]
    counts = quantizer_counts(model)
    logger.info("quantized %s: %d weight and %d input quantizers; error vs full precision: mean %.4f, max %.4f",
                cfg.precision.value, counts["weight"], counts["input"], sum(errors) / len(errors), max(errors))

    # 4. Save the ModelOpt state with its weights.
    with atomic_dir(out, force=force) as tmp:
        with contextlib.redirect_stdout(io.StringIO()):
            mto.save(model, str(tmp / STATE_FILE))
        manifest = write_manifest(
            tmp, STAGE, adapter.identity(), to_dict(cfg),
            inputs={"calibration": manifest_digest(cal_manifest)},
            extra={
                "recipe": recipes.describe(cfg.precision),
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
