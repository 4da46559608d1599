"""The ``engine`` stage: an ONNX Runtime engine always, a TensorRT / TensorRT-RTX plan when asked or available.

Layout of the engines folder::

    onnxruntime/unet.onnx        the served model (a copy of the export)
    onnxruntime/layers.json      which compute ops ONNX Runtime runs with integer kernels
    tensorrt-rtx/ or tensorrt/   unet.plan + layers.json (engine.tensorrt.build_engine)
    manifest.json
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from adm_export.artifacts import atomic_dir, manifest_digest, read_manifest, write_json, write_manifest
from adm_export.config import EngineBackend, EngineConfig, to_dict
from adm_export.errors import MissingDependencyError

logger = logging.getLogger(__name__)

STAGE = "engine"
ORT_DIR = "onnxruntime"

# ONNX Runtime op types by the precision they compute in (CPU and CUDA providers).
_INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul", "QGemm", "QAttention", "QLinearAdd", "QLinearMul"}
_FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "NhwcConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"}


def ort_layer_precisions(onnx_path: Path, device: str, threads: int) -> dict:
    """What ONNX Runtime actually runs: its optimised graph's compute ops, by precision.

    ONNX Runtime rewrites DQ -> Conv -> Q into QLinearConv (an integer kernel) only when the op's
    output is quantized too; with TensorRT-style Q/DQ (inputs and weights only) the convolutions
    stay in float after dequantization. Counting the optimised graph says which happened.
    """
    import onnx

    from adm_export.engines.onnxruntime import make_session

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        make_session(onnx_path, device, threads, optimized_path=optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    # Float compute runs in the graph's float type: FP16 for an FP16 export, FP32 otherwise.
    float_name = "fp16" if graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "fp32"
    precisions = {
        "int8": sum(v for k, v in ops.items() if k in _INTEGER_OPS),
        float_name: sum(v for k, v in ops.items() if k in _FLOAT_COMPUTE_OPS),
    }
    return {
        "layer_precisions": precisions,
        "compute_ops": {k: v for k, v in sorted(ops.items()) if k in _INTEGER_OPS | _FLOAT_COMPUTE_OPS},
        "qdq_left": {k: ops.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear")},
        "source": "onnxruntime_optimized_graph",
    }


def time_ort(onnx_path: Path, spec, frames: int, batch: int, device: str, threads: int, runs: int = 3) -> dict:
    """Median latency of one denoiser call (batch ``batch``, ``frames`` latent frames), after a warm-up."""
    from adm_export.engines.onnxruntime import OrtRunner, make_session

    runner = OrtRunner(make_session(onnx_path, device, threads))
    inputs = spec.dummy_inputs(batch, frames)
    runner(inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(inputs)
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": round(statistics.median(times), 3), "runs": runs, "batch": batch, "frames": frames,
            "device": device, "threads": threads or os.cpu_count()}


def build_engines(cfg: EngineConfig, onnx_dir: str | Path, out: str | Path, force: bool = False,
                  adapter=None, frames: int | None = None) -> dict:
    """Run the ``engine`` stage.

    Args:
        cfg: Engine settings (``backend``: onnxruntime, tensorrt, tensorrt-rtx or none).
        onnx_dir: Folder written by the ``export`` stage.
        out: Engines folder.
        force: Overwrite ``out``.
        adapter: An already loaded model adapter (for the spec); loaded from the manifest otherwise.
        frames: Latent frames to time and to optimise the TensorRT profile for; default from the
            calibration length recorded in the export.

    Returns:
        The engines manifest.

    Raises:
        MissingDependencyError: ``--engine tensorrt|tensorrt-rtx`` without that package.
    """
    from adm_export.engines import tensorrt as trt_engine
    from adm_export.models import load_model

    onnx_manifest = read_manifest(onnx_dir, "onnx", "--onnx")
    if adapter is None:
        adapter = load_model(onnx_manifest["model"]["id"])
    spec = adapter.denoiser_spec()
    frames = frames or int(onnx_manifest.get("frames") or spec.frames_for_seconds(2.56))
    onnx_path = Path(onnx_dir) / "unet.onnx"
    report: dict = {"backend": cfg.backend.value, "engines": {}}

    with atomic_dir(out, force=force) as tmp:
        if cfg.backend != EngineBackend.NONE:
            # 1. ONNX Runtime: always (it is how `generate` and `eval` serve the model).
            ort_dir = tmp / ORT_DIR
            ort_dir.mkdir()
            shutil.copyfile(onnx_path, ort_dir / "unet.onnx")
            precisions = ort_layer_precisions(ort_dir / "unet.onnx", cfg.device, cfg.threads)
            write_json(ort_dir / "layers.json", precisions)
            ort_report = {**precisions, "device": cfg.device}
            if cfg.device == "cpu" and onnx_manifest.get("precision") not in (None, "fp16", "fp32"):
                # The latency sample races the FP32 model on the same CPU: the user sees the speed-up.
                ort_report["vs_fp32"] = _compare_with_fp32(ort_dir / "unet.onnx", spec, frames, cfg.threads)
                ort_report["latency"] = {**ort_report["vs_fp32"]["engine"], "batch": 2, "frames": frames,
                                         "device": cfg.device, "threads": ort_report["vs_fp32"]["threads"]}
            else:
                ort_report["latency"] = time_ort(ort_dir / "unet.onnx", spec, frames, 2, cfg.device, cfg.threads)
            report["engines"]["onnxruntime"] = ort_report
            logger.info("onnxruntime engine: %s; %.1f ms per denoiser call (batch 2, %d frames, %s)",
                        precisions["layer_precisions"], ort_report["latency"]["median_ms"], frames, cfg.device)

            # 2. TensorRT / TensorRT-RTX: required when asked for, opportunistic otherwise.
            flavor = {EngineBackend.TENSORRT: "tensorrt", EngineBackend.TENSORRT_RTX: "tensorrt-rtx"}.get(cfg.backend)
            try:
                trt_engine.import_nvinfer(flavor or "tensorrt-rtx")
                available = True
            except MissingDependencyError as exc:
                if flavor is not None:
                    raise
                available = False
                report["engines"]["tensorrt"] = {"built": False, "reason": str(exc)}
                logger.info("no TensorRT-RTX plan: %s", exc)
            if available:
                profile = trt_engine.EngineProfile(1, 2, 8, spec.frame_multiple, frames, max(frames, 4 * frames))
                trt_dir = tmp / (flavor or "tensorrt-rtx")
                try:
                    with tempfile.TemporaryDirectory(prefix="adm-trt-") as work:
                        source, source_note = tensorrt_source(onnx_path, onnx_manifest, Path(work))
                        trt_report = trt_engine.build_engine(source, trt_dir, spec, profile,
                                                             flavor=flavor or "tensorrt-rtx")
                    if source_note:
                        trt_report["source_graph"] = source_note
                except trt_engine.EngineBuildError as exc:
                    if flavor is not None:
                        raise
                    # Not asked for: a graph TensorRT-RTX cannot build (e.g. INT4 convolutions)
                    # must not cost the user the ONNX Runtime engine; the report says why.
                    report["engines"]["tensorrt-rtx"] = {"built": False, "reason": str(exc)}
                    logger.warning("no TensorRT-RTX plan: %s", exc)
                    trt_report = None
                if trt_report is not None:
                    # Paths inside the temporary folder mean nothing after the rename: keep names only.
                    for key in ("plan", "layers_json"):
                        if trt_report.get(key):
                            trt_report[key] = f"{trt_dir.name}/{Path(trt_report[key]).name}"
                    report["engines"][trt_dir.name] = {"built": True, **trt_report}

        primary = report["engines"].get(cfg.backend.value) or report["engines"].get("onnxruntime") or {}
        report["layer_precisions"] = primary.get("layer_precisions", {})
        manifest = write_manifest(
            tmp, STAGE, adapter.identity(), to_dict(cfg),
            inputs={"onnx": manifest_digest(onnx_manifest)},
            extra={"report": report, "spec": onnx_manifest["spec"], "precision": onnx_manifest["precision"]},
        )
    return manifest


def _compare_with_fp32(engine_path: Path, spec, frames: int, threads: int) -> dict:
    from adm_export.engines.speedup import compare_with_fp32

    with tempfile.TemporaryDirectory(prefix="adm-fp32-ref-") as work:
        return compare_with_fp32(engine_path, spec, frames, threads, Path(work))


def tensorrt_source(onnx_path: Path, onnx_manifest: dict, work: Path) -> tuple[Path, str | None]:
    """The graph TensorRT builds from: the export, or its signed-Q/DQ form for an ONNX-Runtime placement.

    The ONNX Runtime placement stores activations as UINT8 (zero point 128), which TensorRT
    refuses; :func:`~adm_export.export.onnx_graph.activations_to_int8` gives back the same values
    as signed symmetric INT8, so one export feeds both engines (its extra output Q/DQ after
    convolutions TensorRT fuses as INT8 outputs).

    Returns:
        ``(path, note)``; ``note`` says what was changed (``None``: the export as it is).
    """
    from adm_export.formats.capabilities import PLACEMENTS, Placement

    placement = Placement(onnx_manifest.get("placement") or Placement.TENSORRT.value)
    if not PLACEMENTS[placement].unsigned_activations:
        return onnx_path, None
    import onnx

    from adm_export.export import onnx_graph
    from adm_export.export.onnx import save_onnx

    model = onnx.load(str(onnx_path))
    changed = onnx_graph.activations_to_int8(model)
    path = work / "unet.int8_qdq.onnx"
    save_onnx(model, path)
    note = (f"the {placement.value}-placement export with its {changed} UINT8 activation Q/DQ nodes written as "
            f"signed INT8 (same values; TensorRT parses signed Q/DQ only)")
    logger.info("TensorRT input: %s", note)
    return path, note


def load_ort_denoiser(engines_dir: str | Path, adapter, device: str = "cpu", threads: int = 0, options=None):
    """The ONNX Runtime denoiser of an engines folder, ready for ``adapter.using_denoiser``.

    ``options`` (an ``engines.onnxruntime.OrtOptions``: provider, IO binding, CUDA graphs) wins
    over ``device`` and ``threads``.
    """
    from adm_export.artifacts import check_same_model
    from adm_export.engines.onnxruntime import OrtEngine, OrtOptions, make_ort_denoiser

    manifest = read_manifest(engines_dir, STAGE, "--engine")
    check_same_model(manifest, adapter.identity(), "--engine")
    path = Path(engines_dir) / ORT_DIR / "unet.onnx"
    if not path.is_file():
        from adm_export.errors import ArtifactNotFoundError

        raise ArtifactNotFoundError(
            f"--engine {str(engines_dir)!r} has no ONNX Runtime engine (built with --engine none?); "
            f"rebuild it with --engine onnxruntime"
        )
    options = options or OrtOptions.for_device(device, threads)
    return make_ort_denoiser(adapter, OrtEngine(path, adapter.denoiser_spec(), options)), manifest
