"""The public stages: one function per stage, each taking its config and returning a typed result.

These are what ``import adm_export`` exposes (lazily) and what the CLI calls. Every function runs
its stage once through :func:`adm_export.stages.runner.run_stage` (output checks, lock, shards
and ranks, signals, atomic output), so a Python caller under torchrun behaves as the CLI does.

Inputs from an earlier stage are given as a folder or as that stage's result (anything with an
``out`` attribute). ``adapter`` (optional, every stage that loads the model) is an already loaded
model (:func:`adm_export.models.load_model`), to share one model between stages in one process.
Names: ``quantize_model`` and ``export_onnx`` because ``adm_export.quantize`` and
``adm_export.export`` are subpackages (a root attribute of the same name would be replaced by the
subpackage as soon as anything imports it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Union

from adm_export.config import (BuildConfig, BundleConfig, CalibrationConfig, EngineConfig, EvalConfig, ExportConfig,
                               FullPrecisionExportConfig, QuantizeConfig)
from adm_export.serving.config import RayServeConfig, ServeConfig
from adm_export.stages.generate import GenerateConfig
from adm_export.stages.results import (BuildResult, BundleResult, CalibrateResult, EngineResult, EvalResult,
                                       ExportResult, GenerateResult, QuantizeResult)
from adm_export.stages.runner import StageRun, elapsed, run_stage

#: A folder written by an earlier stage, or that stage's result.
Input = Union[str, os.PathLike, Any]


def _folder(value: Input) -> Path:
    return Path(getattr(value, "out", value))


def calibrate(config: CalibrationConfig, out: str | os.PathLike, *, force: bool = False,
              adapter=None) -> CalibrateResult:
    """Run the sampler on the prompt set and write the calibration cache to ``out``.

    Args:
        config: Calibration settings (model, prompts, steps, points, selection, length).
        out: Cache folder (refused if non-empty unless ``force``).
        force: Replace a non-empty ``out``.
        adapter: An already loaded model.
    """
    from adm_export.calibration.latents import calibrate as work

    start, out = time.perf_counter(), Path(out)
    manifest = run_stage(StageRun("calibrate", out, force, lower=("--seconds", "--num-prompts")),
                         lambda folder: work(config, folder, force=force, adapter=adapter))
    return CalibrateResult.from_manifest(out, elapsed(start), manifest)


def quantize_model(config: QuantizeConfig, calibration: Input, out: str | os.PathLike, *, force: bool = False,
                   model: str | None = None, adapter=None) -> QuantizeResult:
    """Quantize the denoiser with ModelOpt, calibrated on a calibration cache.

    Args:
        config: Precision, policy, target, placement and mixed-search settings.
        calibration: The calibration cache (folder or :class:`CalibrateResult`).
        out: Folder for the quantized model.
        force: Replace a non-empty ``out``.
        model: The model the cache must have been made from (default: the cache's).
        adapter: An already loaded model.
    """
    from adm_export.quantize.stage import quantize as work

    start, out = time.perf_counter(), Path(out)
    manifest = run_stage(StageRun("quantize", out, force, lower=("--sensitivity-frames", "--sensitivity-points")),
                         lambda folder: work(config, _folder(calibration), folder, force=force, adapter=adapter,
                                             model_id=model))
    return QuantizeResult.from_manifest(out, elapsed(start), manifest)


def export_onnx(config: ExportConfig, quantized: Input, calibration: Input, out: str | os.PathLike, *,
                force: bool = False, adapter=None) -> ExportResult:
    """Export the quantized denoiser to ONNX (Q/DQ, low-bit weights) and check parity in ONNX Runtime.

    Args:
        config: Opset, placement, parity points.
        quantized: The quantized model (folder or :class:`QuantizeResult`).
        calibration: The calibration cache whose points are the parity inputs.
        out: Folder for ``unet.onnx``.
        force: Replace a non-empty ``out``.
        adapter: An already loaded model.
    """
    from adm_export.export.onnx import export_onnx as work

    start, out = time.perf_counter(), Path(out)
    manifest = run_stage(StageRun("export", out, force, all_ranks=False, lower=("--parity-points",)),
                         lambda folder: work(config, _folder(quantized), folder, _folder(calibration), force=force,
                                             adapter=adapter))
    return ExportResult.from_manifest(out, elapsed(start), manifest)


def export_baseline(config: FullPrecisionExportConfig, out: str | os.PathLike, *, force: bool = False,
                    adapter=None) -> ExportResult:
    """Export the unquantized denoiser (FP16 or FP32) to ONNX: the baseline engine to serve and race.

    Args:
        config: Model, dtype, opset, device.
        out: Folder for ``unet.onnx``.
        force: Replace a non-empty ``out``.
        adapter: An already loaded model.
    """
    from adm_export.export.fp16 import export_full_precision as work

    start, out = time.perf_counter(), Path(out)
    manifest = run_stage(StageRun("export-baseline", out, force, all_ranks=False, lower=("--seconds",)),
                         lambda folder: work(config, folder, adapter=adapter, force=force))
    return ExportResult.from_manifest(out, elapsed(start), manifest)


def build_engines(config: EngineConfig, onnx: Input, out: str | os.PathLike, *, force: bool = False,
                  adapter=None) -> EngineResult:
    """Build engines from an export: ONNX Runtime always, TensorRT / TensorRT-RTX when asked or installed.

    Args:
        config: Backend, device, threads.
        onnx: The export (folder or :class:`ExportResult`).
        out: Engines folder.
        force: Replace a non-empty ``out``.
        adapter: An already loaded model.
    """
    from adm_export.engines.stage import build_engines as work

    start, out = time.perf_counter(), Path(out)
    manifest = run_stage(StageRun("engine", out, force, all_ranks=False),
                         lambda folder: work(config, _folder(onnx), folder, force=force, adapter=adapter))
    return EngineResult.from_manifest(out, elapsed(start), manifest)


def evaluate(config: EvalConfig, engine: Input, out: str | os.PathLike | None = None, *, force: bool = False,
             model: str | None = None, adapter=None) -> EvalResult:
    """Same prompts and seeds through the full-precision pipeline and the engine; FD and the quality gate.

    Args:
        config: Clips, steps, length, embedder, gate thresholds.
        engine: The engines folder (or :class:`EngineResult`).
        out: Folder for ``eval.json``, ``report.json``/``report.md``, figures and clips (``None``: none).
        force: Replace a non-empty ``out``.
        model: The model the engine must have been made from (default: the engine's).
        adapter: An already loaded model (its denoiser must be the full-precision one).

    Returns:
        The result; ``gate_passed`` is the quality gate's verdict (the CLI exits 2 when False).
    """
    from adm_export.eval.harness import evaluate as work

    start, out = time.perf_counter(), (Path(out) if out is not None else None)
    result = run_stage(StageRun("eval", out, force, lower=("--eval-seconds", "--num-clips")),
                       lambda folder: work(config, _folder(engine), folder, force=force, adapter=adapter,
                                           model_id=model))
    return EvalResult.from_result(out, elapsed(start), result)


def build(config: BuildConfig, *, adapter=None) -> BuildResult:
    """Run every stage (calibrate, quantize, export, engine, eval) into ``config.out``; write the report.

    The build folder appears only when complete; a rerun after a failure or an interruption resumes
    from the finished shards (``<out's parent>/.<out's name>.shards``).

    Args:
        config: The output folder and every stage's config.
        adapter: An already loaded model (else ``config.calibration.model`` is loaded).
    """
    from adm_export.stages.build import build_into, validate

    start = time.perf_counter()
    validate(config)  # what only a later stage would reject, refused before any work
    report = run_stage(StageRun("build", config.out, config.force, atomic=True,
                                lower=("--seconds", "--eval-seconds", "--num-clips")),
                       lambda folder: build_into(config, folder, adapter=adapter))
    return BuildResult(Path(config.out), elapsed(start), report)


def generate(config: GenerateConfig, out: str | os.PathLike, *, force: bool = False,
             adapter=None) -> GenerateResult:
    """Generate one WAV per prompt into ``out``, the denoiser served by an engine (or full precision).

    Args:
        config: Prompts, length, steps, guidance, seed, engine and ONNX Runtime settings.
        out: Output folder.
        force: Replace a non-empty ``out``.
        adapter: An already loaded model.
    """
    import json

    from adm_export.stages.generate import generate as work

    start, out = time.perf_counter(), Path(out)
    files = run_stage(StageRun("generate", out, force, all_ranks=False, lower=("--seconds", "--batch-size")),
                      lambda folder: work(config, folder, force=force, adapter=adapter))
    record = json.loads((out / "generate.json").read_text())
    return GenerateResult(out, elapsed(start), tuple(files), record)


def bundle(config: BundleConfig, *, adapter=None) -> BundleResult:
    """Bundle a build for the torch-free runtime: engine, text encoder(s), VAE decoder, vocoder as ONNX.

    Args:
        config: The build (or engines) folder, the bundle folder, and its settings.
        adapter: An already loaded model (must have the engine's weights).
    """
    from adm_export.stages.bundle import bundle as work

    out = Path(config.out)
    return run_stage(StageRun("bundle", out, config.force, all_ranks=False), lambda folder: work(config, adapter))


def serve(config: ServeConfig | RayServeConfig, *, ray_address: str | None = None, runtime=None) -> None:
    """Serve a bundle over HTTP (``POST /v1/generate``, ``/health``, ``/metrics``) until SIGTERM.

    The first SIGTERM drains: new requests get 503 while accepted ones finish, then this returns.
    Not a stage of the runner (it writes no folder and handles its own signals).

    Args:
        config: The service settings; a :class:`RayServeConfig` deploys them under Ray Serve (one
            runtime per replica; needs ``pip install 'adm-export[ray]'``).
        ray_address: With Ray: a running cluster (default: a local Ray instance).
        runtime: An already loaded bundle runtime (plain HTTP only; default: loaded from ``config.bundle``).
    """
    if isinstance(config, RayServeConfig):
        from adm_export.serving.ray_app import run_ray

        run_ray(config, address=ray_address)
        return
    from adm_export.serving.server import serve as run

    run(config, runtime=runtime)
