"""``adm-export build``: every stage in order, each writing its artifact under the output folder.

The runner (:func:`adm_export.stages.api.build`) hands :func:`build_into` the build's ``.partial``
folder (the same one on every rank) and renames it to ``--out`` when the build succeeds; the shard
area of every stage is ``<out's parent>/.<out's name>.shards`` (resumable).
"""

from __future__ import annotations

import logging
from pathlib import Path

from adm_export.config import BuildConfig
from adm_export.progress import timed_stage

logger = logging.getLogger(__name__)


def validate(cfg: BuildConfig) -> None:
    """Check the settings that only a later stage would otherwise reject."""
    from adm_export.config import EngineBackend
    from adm_export.errors import InvalidInputError
    from adm_export.formats import recipes

    recipes.quant_config(cfg.quantize.precision)
    if cfg.quantize.policy:
        from adm_export.formats.policy import load_policy

        load_policy(cfg.quantize.policy)
    from adm_export.formats.capabilities import placement_for

    placement = placement_for(cfg.quantize.target, cfg.quantize.placement)["value"]
    if cfg.export.placement is not None and cfg.export.placement.value != placement:
        raise InvalidInputError(
            f"--placement {cfg.export.placement.value!r} differs between the quantize ({placement!r}) and export "
            f"settings"
        )
    if cfg.engine.backend in (EngineBackend.TENSORRT, EngineBackend.TENSORRT_RTX):
        from adm_export.engines.tensorrt import import_nvinfer

        import_nvinfer(cfg.engine.backend.value)
    if cfg.eval is not None:
        from adm_export.eval.embedders import get_embedder
        from adm_export.models import model_defaults

        get_embedder(cfg.eval.embedder or model_defaults(cfg.model)["embedder"], checkpoint=cfg.eval.embedder_checkpoint,
                     device=cfg.eval.device)


def _searched(cfg: BuildConfig) -> bool:
    """Whether the quantize stage runs the (rank-split) sensitivity search."""
    from adm_export.formats import policy as pol

    return (pol.load_policy(cfg.quantize.policy) if cfg.quantize.policy else pol.preset(cfg.quantize.precision.value)).searched


def build_into(cfg: BuildConfig, out: Path, adapter=None) -> dict | None:
    """Run calibrate -> quantize -> export -> engine -> eval into ``out`` and write the report.

    Under torchrun every rank runs the sharded loops (calibration, sensitivity search, eval); rank 0
    alone writes artifacts and runs export and engine.

    Args:
        cfg: Build settings (every stage's config).
        out: The folder to write (the runner's ``.partial`` folder of ``cfg.out``).
        adapter: An already loaded model.

    Returns:
        The report (also written to ``out/report.json`` and ``out/report.md``) on rank 0, ``None`` on
        the other ranks.
    """
    from adm_export import distributed as dist
    from adm_export.calibration.latents import calibrate
    from adm_export.engines.stage import build_engines
    from adm_export.eval.harness import evaluate
    from adm_export.eval.report import make_report, write_report
    from adm_export.export.onnx import export_onnx
    from adm_export.models import load_model
    from adm_export.quantize.stage import quantize

    timings: dict[str, float] = {}
    # Its start at debug level: a --model that does not load is then the one line on the console.
    with timed_stage("load model", logger, timings, start_level=logging.DEBUG):
        adapter = adapter or load_model(cfg.model, cfg.calibration.device)
    # 1. Calibration cache.
    with timed_stage("calibrate", logger, timings):
        calib = calibrate(cfg.calibration, out / "calibration", adapter=adapter)
    # 2. Quantized model (a copy; the adapter keeps its full-precision denoiser for eval).
    #    Other ranks take part only when a sensitivity search (split over ranks) runs.
    if dist.is_main() or _searched(cfg):
        with timed_stage("quantize", logger, timings), dist.main_output(out / "quantized") as quant_out:
            quant = quantize(cfg.quantize, out / "calibration", quant_out, adapter=adapter)
    if not dist.is_main():
        # Export and engine are rank 0's; the others wait for the engines, then share the eval.
        dist.barrier()
        if cfg.eval is not None and cfg.engine.backend.value != "none":
            evaluate(cfg.eval, out / "engines", out / "eval", adapter=adapter)
        return None
    # 3. ONNX with Q/DQ and integer weights.
    with timed_stage("export", logger, timings):
        onnx_manifest = export_onnx(cfg.export, out / "quantized", out / "onnx", out / "calibration", adapter=adapter)
    # 4. Engines.
    frames = adapter.denoiser_spec().frames_for_seconds(cfg.calibration.audio_seconds)
    with timed_stage("engine", logger, timings):
        engine = build_engines(cfg.engine, out / "onnx", out / "engines", adapter=adapter, frames=frames)
    dist.barrier()
    # 5. Evaluation against the full-precision baseline.
    result = None
    if cfg.eval is not None and cfg.engine.backend.value != "none":
        with timed_stage("eval", logger, timings):
            result = evaluate(cfg.eval, out / "engines", out / "eval", adapter=adapter)
    report = make_report(adapter.identity(), cfg.quantize.precision.value, cfg.calibration.device, timings,
                         onnx_manifest, engine, result, quant, calib)
    if report.get("quantization") is not None:
        # Mixed precision and policies: what each layer got, what the target made us change, and
        # the search's ranking / predicted vs measured error (quantize stage manifest).
        report["quantization"].update({k: quant.get(k) for k in ("formats", "capability", "search")})
        # Which Q/DQ placement the export got and why (--target's, or --placement's).
        report["quantization"]["placement"] = quant.get("placement_choice") or {"value": quant.get("placement")}
    write_report(out, report)
    return report
