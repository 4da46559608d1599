"""The ``engine`` stage: an ONNX Runtime engine always, a TensorRT / TensorRT-RTX plan when asked or available.

Layout of the engines folder::

    onnxruntime/unet.onnx        the served model: with --device cpu a copy of the export; with
                                 --device cuda the fused FP16 CUDA engine (+ unet.onnx.data)
    onnxruntime/layers.json      what each compute op runs in, the fused-op counts (``fusions``),
                                 and for CUDA the parity check and latency
    tensorrt-rtx/ or tensorrt/   unet.plan + layers.json (engine.tensorrt.build_engine), built from
                                 the FP16-typed Q/DQ graph for a quantized export (engines.fp16_qdq)
    manifest.json

:func:`served_graph` is the one place that decides whether an engines folder can be served with
given options (``generate`` and ``eval`` call it before loading anything).
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
from adm_export.errors import AdmExportError, ArtifactNotFoundError, InvalidInputError, MissingDependencyError

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
        cfg: Engine settings (``backend``: onnxruntime, tensorrt, tensorrt-rtx or none; ``device``:
            ``cuda`` builds the fused FP16 CUDA engine).
        onnx_dir: Folder written by the ``export`` stage (or ``export-baseline``).
        out: Engines folder.
        force: Overwrite ``out``.
        adapter: An already loaded model adapter (for the spec); loaded from the manifest otherwise.
        frames: Latent frames to time and check parity at, and to optimise the TensorRT profile
            for; default from the calibration length recorded in the export.

    Returns:
        The engines manifest.

    Raises:
        MissingDependencyError: ``--engine tensorrt|tensorrt-rtx`` without that package.
        EngineParityError: The CUDA engine's output is not within tolerance of its FP32 reference.
    """
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
            if cfg.device == "cuda":
                ort = _ort_cuda_engine(cfg, onnx_path, onnx_manifest, ort_dir, adapter, frames)
            else:
                ort = _ort_cpu_engine(cfg, onnx_path, onnx_manifest, ort_dir, spec, frames)
            write_json(ort_dir / "layers.json", ort)
            report["engines"]["onnxruntime"] = ort
            # 2. TensorRT / TensorRT-RTX: required when asked for, opportunistic otherwise.
            _tensorrt_engine(cfg, onnx_path, onnx_manifest, tmp, spec, frames, report)

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


def _ort_cpu_engine(cfg: EngineConfig, onnx_path: Path, onnx_manifest: dict, ort_dir: Path, spec,
                    frames: int) -> dict:
    """``--device cpu``: serve the export as it is; count what ONNX Runtime's CPU graph runs in.

    A quantized export's latency sample races the same model in FP32 on the same CPU
    (``vs_fp32``), so the user sees the speed-up the build gave.
    """
    shutil.copyfile(onnx_path, ort_dir / "unet.onnx")
    precisions = ort_layer_precisions(ort_dir / "unet.onnx", cfg.device, cfg.threads)
    ort = {"graph": "export", **precisions, "device": cfg.device}
    if onnx_manifest.get("precision") not in (None, "fp16", "fp32"):
        ort["vs_fp32"] = _compare_with_fp32(ort_dir / "unet.onnx", spec, frames, cfg.threads)
        ort["latency"] = {**ort["vs_fp32"]["engine"], "batch": 2, "frames": frames, "device": cfg.device,
                          "threads": ort["vs_fp32"]["threads"]}
    else:
        ort["latency"] = time_ort(ort_dir / "unet.onnx", spec, frames, 2, cfg.device, cfg.threads)
    logger.info("onnxruntime engine: %s; %.1f ms per denoiser call (batch 2, %d frames, %s)",
                precisions["layer_precisions"], ort["latency"]["median_ms"], frames, cfg.device)
    return ort


class EngineParityError(AdmExportError):
    """The CUDA engine's output is not within tolerance of its FP32 reference."""


def _ort_cuda_engine(cfg: EngineConfig, onnx_path: Path, onnx_manifest: dict, ort_dir: Path, adapter,
                     frames: int) -> dict:
    """``--device cuda``: the fused FP16 engine, checked against its FP32 reference (see engines.onnxruntime.cuda)."""
    from adm_export.engines.onnxruntime import cuda as ort_cuda
    from adm_export.engines.onnxruntime.sessions import OrtOptions, make_session

    spec = adapter.denoiser_spec()
    check = ort_cuda.CudaEngineSpec(fusions=cfg.cuda_fusions, tolerance=cfg.parity_tolerance, frames=frames)
    full_precision = onnx_manifest.get("precision") in ("fp16", "fp32")
    with tempfile.TemporaryDirectory(prefix="adm-cuda-engine-") as work:
        reference_path = Path(work) / "fp32.onnx"
        layers = ort_cuda.build_cuda_graph(onnx_path, ort_dir / ort_cuda.SERVED, cfg.cuda_fusions, reference_path)
        logger.info("onnxruntime CUDA engine (%s): %s; built in %.1f s", layers["graph"], layers["summary"],
                    layers["build_seconds"])
        if ort_cuda.cuda_available():
            if full_precision:
                reference, label = _torch_reference(adapter), "torch FP32 denoiser"
            else:
                session = make_session(reference_path, options=OrtOptions(provider="cpu", threads=cfg.threads))
                reference = _session_reference(session)
                label = "weight-dequantized FP32 graph (quantized weights, activations unquantized), CPU provider"
            parity = ort_cuda.check_on_cuda(ort_dir / ort_cuda.SERVED, spec, reference, OrtOptions.serving("cuda"),
                                            check)
            parity["reference"] = label
            layers["latency"] = parity.pop("latency")
        else:
            parity = ort_cuda.check_on_cpu(reference_path, spec, check)
            parity["reference"] = "canonical FP32 graph (dequantized weights), CPU provider"
            layers["latency"] = {"median_ms": None, "reason": parity["reason"]}
            logger.warning("CUDA engine built without a GPU: %s (checked instead: %s, max %.2e)", parity["reason"],
                           parity["checked"], parity["max"])
    layers["parity"] = parity
    if not parity["passed"]:
        hint = "rebuild with --no-cuda-fusions to serve the unfused FP16 graph" if cfg.cuda_fusions else \
            "the export itself may be at fault: check its parity in onnx/manifest.json"
        raise EngineParityError(
            f"CUDA engine parity failed: relative L2 {parity['max']:.3g} against the {parity['reference']} exceeds "
            f"--parity-tolerance {parity['tolerance']:.3g} ({parity['device']}); {hint}"
        )
    logger.info("CUDA engine parity: max relative L2 %.2e vs %s (tolerance %.1e, %s)", parity["max"],
                parity["reference"], parity["tolerance"], parity["device"])
    return layers


def _torch_reference(adapter):
    """``inputs -> numpy``: the adapter's FP32 denoiser on its own device, in IEEE FP32.

    A true FP32 reference: no TF32 in cuDNN convolutions or cuBLAS matmuls on the GPU
    (:func:`adm_export.devices.exact_float32`); the inputs follow the denoiser (``run_denoiser``).
    """
    from adm_export.devices import exact_float32
    from adm_export.numerics import run_denoiser

    def run(inputs: dict):
        with exact_float32():
            return run_denoiser(adapter, adapter.denoiser, inputs).float().cpu().numpy()

    return run


def _session_reference(session):
    from adm_export.engines.onnxruntime.sessions import OrtRunner

    runner = OrtRunner(session)
    return lambda inputs: runner(inputs)


def _tensorrt_engine(cfg: EngineConfig, onnx_path: Path, onnx_manifest: dict, tmp: Path, spec, frames: int,
                     report: dict) -> None:
    """A TensorRT / TensorRT-RTX plan: required when asked for, opportunistic otherwise (into ``report``).

    A quantized export is built from its FP16-typed Q/DQ graph (``engines.fp16_qdq``): strongly
    typed networks run each layer in the graph's type, so the FP32-typed export gave FP32 layers.
    """
    from adm_export.engines import tensorrt as trt_engine

    flavor = {EngineBackend.TENSORRT: "tensorrt", EngineBackend.TENSORRT_RTX: "tensorrt-rtx"}.get(cfg.backend)
    try:
        trt_engine.import_nvinfer(flavor or "tensorrt-rtx")
    except MissingDependencyError as exc:
        if flavor is not None:
            raise
        report["engines"]["tensorrt"] = {"built": False, "reason": str(exc)}
        logger.info("no TensorRT-RTX plan: %s", exc)
        return
    profile = trt_engine.EngineProfile(1, 2, 8, spec.frame_multiple, frames, max(frames, 4 * frames))
    trt_dir = tmp / (flavor or "tensorrt-rtx")
    graph_note = None
    with tempfile.TemporaryDirectory(prefix="adm-trt-") as work:
        # The ONNX Runtime placement's UINT8 activations as signed INT8 first (TensorRT parses signed Q/DQ only).
        source, source_note = tensorrt_source(onnx_path, onnx_manifest, Path(work))
        if onnx_manifest.get("precision") not in ("fp16", "fp32"):
            source, graph_note = _fp16_typed_source(source, Path(work))
        try:
            trt_report = trt_engine.build_engine(source, trt_dir, spec, profile, flavor=flavor or "tensorrt-rtx")
        except trt_engine.EngineBuildError as exc:
            if flavor is not None:
                raise
            # Not asked for: a graph TensorRT-RTX cannot build (e.g. INT4 convolutions)
            # must not cost the user the ONNX Runtime engine; the report says why.
            report["engines"]["tensorrt-rtx"] = {"built": False, "reason": str(exc)}
            logger.warning("no TensorRT-RTX plan: %s", exc)
            return
    # Paths inside the temporary folder mean nothing after the rename: keep names only.
    for key in ("plan", "layers_json"):
        if trt_report.get(key):
            trt_report[key] = f"{trt_dir.name}/{Path(trt_report[key]).name}"
    if graph_note is not None:
        trt_report["graph"] = graph_note
    if source_note is not None:
        trt_report["source_graph"] = source_note
    report["engines"][trt_dir.name] = {"built": True, **trt_report}


def _fp16_typed_source(onnx_path: Path, work: Path) -> tuple[Path, dict]:
    """Write the FP16-typed Q/DQ graph of a quantized export into ``work``; returns it and what changed."""
    import onnx

    from adm_export.engines.fp16_qdq import to_fp16_typed_qdq
    from adm_export.export.onnx import save_onnx

    model = onnx.load(str(onnx_path))
    note = to_fp16_typed_qdq(model)
    path = work / "unet.fp16_qdq.onnx"
    save_onnx(model, path)
    note = {"kind": "fp16-typed q/dq", "opset": note["opset"], "fp32_kept": note["fp32_kept"],
            "compute_activation_types": note["compute"]["layer_precisions"]}
    logger.info("TensorRT input: FP16-typed Q/DQ graph (opset %d; compute ops by activation type %s)",
                note["opset"], note["compute_activation_types"])
    return path, note


def served_graph(engines_dir: str | Path, options, manifest: dict | None = None) -> Path:
    """The ONNX file an engines folder serves, after checking that ``options`` can serve it.

    Reads only the manifest and the graph's header, so ``generate`` and ``eval`` refuse a
    combination with one line before loading a model:

    * a CPU-built engine (the export as it is: Q/DQ, which ONNX Runtime's CUDA provider runs
      in FP32) on the CUDA provider: build the CUDA engine with ``adm-export engine --device cuda``
      (or serve this one with ``--ort-provider cpu``);
    * a CUDA engine (fused ops that only the CUDA provider has) on the CPU provider;
    * ``--ort-provider tensorrt`` where TensorRT's libraries do not load;
    * ``--prefer-nhwc`` on a Q/DQ graph (ONNX Runtime's NHWC transform breaks quantized convolutions).

    Args:
        engines_dir: Folder written by the ``engine`` stage.
        options: The serving ``engines.onnxruntime.OrtOptions``.
        manifest: The folder's manifest, if already read.

    Raises:
        ArtifactNotFoundError: No ONNX Runtime engine in the folder.
        InvalidInputError: The options cannot serve this engine.
    """
    from adm_export.engines.onnxruntime.sessions import check_graph_serves, graph_info, tensorrt_provider_problem

    manifest = manifest or read_manifest(engines_dir, STAGE, "--engine")
    path = Path(engines_dir) / ORT_DIR / "unet.onnx"
    ort = ((manifest.get("report") or {}).get("engines") or {}).get("onnxruntime")
    if ort is None or not path.is_file():
        raise ArtifactNotFoundError(
            f"--engine {str(engines_dir)!r} has no ONNX Runtime engine (built with --engine none?); "
            f"rebuild it with --engine onnxruntime"
        )
    # Folders from before the CUDA engine existed served a copy of the export on every device.
    kind = ort.get("graph", "export")
    if kind == "export" and options.provider == "cuda":
        raise InvalidInputError(
            f"--engine {str(engines_dir)!r} was not built for CUDA (it serves the export as it is, which ONNX Runtime's "
            "CUDA provider runs in FP32); build the CUDA engine with `adm-export engine --onnx ONNX_DIR --out DIR "
            "--device cuda`, or serve this one with --ort-provider cpu"
        )
    if kind != "export" and not options.on_gpu:
        raise InvalidInputError(
            f"--engine {str(engines_dir)!r} holds a CUDA engine ({kind}: its fused ops run only on ONNX Runtime's CUDA "
            "provider); serve it with --device cuda, or build a CPU engine with `adm-export engine --device cpu`"
        )
    if options.provider == "tensorrt":
        problem = tensorrt_provider_problem()
        if problem:
            raise InvalidInputError(f"--ort-provider tensorrt cannot run here: {problem}; use --ort-provider cuda")
    check_graph_serves(graph_info(path), options, f"--engine {str(engines_dir)!r}")
    return path


def load_ort_denoiser(engines_dir: str | Path, adapter, device: str = "cpu", threads: int = 0, options=None):
    """The ONNX Runtime denoiser of an engines folder, ready for ``adapter.using_denoiser``.

    ``options`` (an ``engines.onnxruntime.OrtOptions``: provider, IO binding, CUDA graphs) wins
    over ``device`` and ``threads``; without it the plain options of ``device`` are used.

    Raises:
        InvalidInputError: The options cannot serve this engine (see :func:`served_graph`).
    """
    from adm_export.artifacts import check_same_model
    from adm_export.engines.onnxruntime import OrtEngine, OrtOptions, make_ort_denoiser

    manifest = read_manifest(engines_dir, STAGE, "--engine")
    check_same_model(manifest, adapter.identity(), "--engine")
    options = options or OrtOptions.for_device(device, threads)
    path = served_graph(engines_dir, options, manifest)
    return make_ort_denoiser(adapter, OrtEngine(path, adapter.denoiser_spec(), options)), manifest
