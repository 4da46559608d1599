"""TensorRT and TensorRT-RTX engines from the exported (Q/DQ) ONNX denoiser.

TensorRT >= 10 (``import tensorrt``) and TensorRT-RTX (``import tensorrt_rtx``) share the nvinfer
Python API (Builder, OnnxParser, BuilderConfig, optimization profiles, engine inspector), so one
code path serves both; :func:`import_nvinfer` picks the module at run time. Neither is imported
when this module is imported.

Where the two differ (checked against TensorRT-RTX 1.7):

* TensorRT-RTX has no precision builder flags (``FP16``, ``INT8``, ``FP8``) and no INT8
  calibrator: precision comes from the graph (explicit Q/DQ, casts). TensorRT 11 went the same
  way. Quantized graphs are therefore built as strongly typed networks
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, the only creation flag TensorRT-RTX has).
* TensorRT-RTX builds ahead of time on a CPU-only machine, for compute capabilities 8.0, 8.6,
  8.9 and 12.x by default; its kernels are compiled on the target GPU at run time. Its timing
  cache calls are documented no-ops since 1.2, and on a machine without a GPU, loading a saved
  cache makes it probe CUDA and log errors, so the timing cache is used with full TensorRT only.
* Deserializing an engine (and so the engine inspector) needs a CUDA device with either backend.

The layer report says which evidence it rests on (``"source"``):

``engine_inspector``
    ``ICudaEngine.create_engine_inspector()`` JSON, when the engine deserializes here (a GPU).
``engine_plan``
    TensorRT-RTX only: its plan embeds a readable listing of the compiled program (op kind, the
    ONNX layers each kernel implements, every tensor's data type). It is undocumented, so it is
    read on a best-effort basis and used only where it names the network's convolutions/GEMMs.
``network_definition``
    The parsed, strongly typed network: each convolution/matmul is reported in the data type its
    inputs are dequantized from (INT8, FP8, ...) or, if not quantized, their own type. This is
    what the graph asks for, not proof of the kernel chosen; standalone Q/DQ are then unknown.

Whichever engine source covers more of the network's convolutions/matmuls is used; layers it does
not cover fall back to the network definition (``precision_from`` in ``layers.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from adm_export.errors import (
    AdmExportError,
    ArtifactNotFoundError,
    InvalidInputError,
    MissingDependencyError,
)

logger = logging.getLogger(__name__)

PLAN_NAME = "unet.plan"
LAYERS_NAME = "layers.json"
FLAVORS = ("auto", "tensorrt", "tensorrt-rtx")

# Import names per flavor: the meta package's module first, then the standalone bindings wheel
# (``tensorrt-rtx-cu13-bindings`` installs ``tensorrt_rtx_bindings``).
_MODULES = {
    "tensorrt": ("tensorrt", "tensorrt_bindings"),
    "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings"),
}
_LABELS = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
_INSTALL_HINT = (
    "install TensorRT-RTX with: pip install 'adm-export[tensorrt-rtx]' (builds on any machine, engines "
    "run on RTX-class GPUs), or build in the GPU image docker/Dockerfile.gpu (NGC TensorRT base) for "
    "full TensorRT"
)

# Warnings that say nothing to act on, logged at DEBUG: TensorRT-RTX widens the FP16 Q/DQ scales
# of an FP16-typed graph (engines.fp16_qdq) to FP32 inside each convolution, once per layer.
_BENIGN_WARNINGS = ("Converting conv activation scales to fp32.", "Converting conv weight scales to fp32.")
_COMPUTE_TYPES = {"CONVOLUTION", "DECONVOLUTION", "MATRIX_MULTIPLY"}
_QDQ_TYPES = {"QUANTIZE", "DEQUANTIZE", "DYNAMIC_QUANTIZE"}
_PASS_THROUGH_TYPES = {"SHUFFLE", "SQUEEZE", "UNSQUEEZE"}  # move data without changing its type
_NON_NUMERIC = {"bool", "int32", "int64", None}
_COMPUTE_HINT = re.compile(r"conv|corrltn|gemm|matrix|matmul|fully|fc|deconv|xmma|fprop|mma", re.I)
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]\n]+)\]")

# nvinfer DataType names -> report names.
_TRT_DTYPES = {
    "FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "INT8": "int8", "UINT8": "uint8", "FP8": "fp8",
    "INT4": "int4", "FP4": "fp4", "INT32": "int32", "INT64": "int64", "BOOL": "bool", "E8M0": "e8m0",
}
# TensorRT-RTX plan listing type names -> report names.
_PLAN_DTYPES = {
    "float": "fp32", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16", "int8": "int8",
    "uint8": "uint8", "int4": "int4", "int32": "int32", "int64": "int64", "bool": "bool",
}


class EngineBuildError(AdmExportError):
    """TensorRT could not parse the ONNX model or build an engine from it."""


# -- backend ------------------------------------------------------------------------------------
def import_nvinfer(flavor: str = "auto") -> tuple[Any, str]:
    """Import the nvinfer Python module of TensorRT >= 10 or TensorRT-RTX.

    Args:
        flavor: ``"tensorrt"``, ``"tensorrt-rtx"``, or ``"auto"`` (full TensorRT >= 10 if
            importable, else TensorRT-RTX).

    Returns:
        ``(module, flavor_name)`` with ``flavor_name`` ``"tensorrt"`` or ``"tensorrt-rtx"``.

    Raises:
        InvalidInputError: ``flavor`` is not one of :data:`FLAVORS`.
        MissingDependencyError: no suitable module can be imported.
    """
    if flavor not in FLAVORS:
        raise InvalidInputError(
            f"unknown TensorRT flavor {flavor!r}; choose one of {', '.join(FLAVORS)}"
        )
    order = ("tensorrt", "tensorrt-rtx") if flavor == "auto" else (flavor,)
    reasons = []
    for name in order:
        for module_name in _MODULES[name]:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # ImportError, or OSError/RuntimeError from missing CUDA libs
                reasons.append(f"{module_name}: {_one_line(exc) or type(exc).__name__}")
                continue
            if not hasattr(module, "Builder"):  # e.g. the PyPI placeholder package
                reasons.append(f"{module_name}: not the nvinfer API")
                continue
            version = str(getattr(module, "__version__", "0"))
            if name == "tensorrt" and _major(version) < 10:
                reasons.append(f"{module_name} {version} is older than 10")
                continue
            logger.debug("Using %s %s (module %s)", _LABELS[name], version, module_name)
            return module, name
    wanted = "TensorRT >= 10 or TensorRT-RTX" if flavor == "auto" else _LABELS[flavor]
    raise MissingDependencyError(
        f"building engines needs {wanted}, which could not be imported ({'; '.join(reasons)}); "
        f"{_INSTALL_HINT}"
    )


def _major(version: str) -> int:
    match = re.match(r"(\d+)", version)
    return int(match.group(1)) if match else 0


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def _make_logger(trt: Any, backend: str):
    """An ``ILogger`` forwarding TensorRT's messages to this module's Python logger."""
    severity = trt.ILogger.Severity
    error_levels = {int(severity.INTERNAL_ERROR), int(severity.ERROR)}
    tag = _LABELS[backend]

    class _PythonLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.quiet = False  # while probing (e.g. deserializing without a GPU), errors are expected
            self.errors: list[str] = []

        def log(self, sev, msg):
            sev = int(sev)
            text = str(msg).strip()
            if sev in error_levels:
                if not self.quiet:
                    self.errors.append(_one_line(text))
                level = logging.DEBUG if self.quiet else logging.ERROR
            elif sev == int(severity.WARNING):
                level = logging.DEBUG if self.quiet or text.endswith(_BENIGN_WARNINGS) else logging.WARNING
            elif sev == int(severity.INFO):
                level = logging.DEBUG
            else:  # VERBOSE: very chatty, never forwarded
                return
            if logger.isEnabledFor(level):
                logger.log(level, "[%s] %s", tag, text)

    return _PythonLogger()


# -- profiles -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EngineProfile:
    """Batch and latent-length ranges of an engine's optimization profile.

    The spec's named dynamic axes (``batch``, ``frames``) map to these ranges, so ONNX dynamic axes
    and TensorRT profiles both come from one :class:`~adm_export.models.base.DenoiserSpec`.
    """

    min_batch: int
    opt_batch: int
    max_batch: int
    min_frames: int
    opt_frames: int
    max_frames: int

    def __post_init__(self):
        for axis in ("batch", "frames"):
            lo, opt, hi = (getattr(self, f"{k}_{axis}") for k in ("min", "opt", "max"))
            given = f"{axis} range {lo}/{opt}/{hi} (min/opt/max)"
            if not all(isinstance(v, int) and v >= 1 for v in (lo, opt, hi)):
                raise InvalidInputError(f"{given} must be positive integers")
            if not lo <= opt <= hi:
                raise InvalidInputError(f"{given} must satisfy min <= opt <= max")

    @classmethod
    def from_seconds(cls, spec, batch: Sequence[int], seconds: Sequence[float]) -> "EngineProfile":
        """Profile for audio lengths in seconds (rounded up to the spec's frame multiple).

        Args:
            spec: The denoiser spec.
            batch: ``(min, opt, max)`` batch sizes (classifier-free guidance doubles the batch).
            seconds: ``(min, opt, max)`` audio lengths.
        """
        frames = [spec.frames_for_seconds(s) for s in seconds]
        return cls(*batch, *frames)

    def axis_ranges(self) -> dict[str, tuple[int, int, int]]:
        return {
            "batch": (self.min_batch, self.opt_batch, self.max_batch),
            "frames": (self.min_frames, self.opt_frames, self.max_frames),
        }

    def shapes(self, spec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """``{input name: (min_shape, opt_shape, max_shape)}`` for every input of ``spec``.

        Raises:
            InvalidInputError: a frame count is not a multiple of ``spec.frame_multiple``.
        """
        multiple = getattr(spec, "frame_multiple", 1) or 1
        bad = [f for f in self.axis_ranges()["frames"] if f % multiple]
        if bad:
            fixed = [-(-f // multiple) * multiple for f in bad]
            raise InvalidInputError(
                f"latent frame counts {bad} are not multiples of {multiple} (the U-Net downsamples by "
                f"{multiple}); use {fixed}"
            )
        ranges = self.axis_ranges()
        out = {}
        for tensor in spec.inputs:
            unknown = [d for d in tensor.shape if isinstance(d, str) and d not in ranges]
            if unknown:
                raise ValueError(
                    f"input {tensor.name!r} has dynamic axes {unknown}; known: {list(ranges)}"
                )
            out[tensor.name] = tuple(
                tuple(ranges[d][k] if isinstance(d, str) else int(d) for d in tensor.shape)
                for k in range(3)
            )
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- build --------------------------------------------------------------------------------------
def build_engine(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec,
    profile: EngineProfile,
    flavor: str = "auto",
    timing_cache: str | os.PathLike | None = None,
    opt_level: int = 3,
    strongly_typed: bool = True,
    refittable: bool = False,
    compute_capabilities: Sequence[str] | None = None,
) -> dict:
    """Build a TensorRT / TensorRT-RTX engine and write ``unet.plan`` and ``layers.json``.

    Args:
        onnx_path: The exported ONNX model (external data beside it is found by the parser).
        out_dir: Folder for ``unet.plan`` and ``layers.json`` (created; files are replaced atomically).
        spec: The denoiser spec whose named dynamic axes give the profile's shapes.
        profile: Batch and frame ranges.
        flavor: ``"auto"``, ``"tensorrt"`` or ``"tensorrt-rtx"`` (see :func:`import_nvinfer`).
        timing_cache: Timing cache file shared between builds (full TensorRT; created if missing,
            merged under a file lock so concurrent builds do not lose entries).
        opt_level: Builder optimization level, 0 (fast build) to 5 (slow build, fastest engine).
        strongly_typed: Build a strongly typed network: tensor types follow the ONNX graph, as
            quantized (Q/DQ) graphs need. If False (TensorRT 10 only), FP16 and INT8 builder flags
            let TensorRT choose precisions instead.
        refittable: Allow refitting the engine's weights later.
        compute_capabilities: TensorRT-RTX only: target GPUs, e.g. ``["SM89"]`` (default: the
            library's portable set).

    Returns:
        The build report (see the module docstring for ``source``).

    Raises:
        ArtifactNotFoundError: ``onnx_path`` does not exist.
        InvalidInputError: an option is out of range.
        MissingDependencyError: neither TensorRT nor TensorRT-RTX is installed.
        EngineBuildError: parsing or building failed.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise ArtifactNotFoundError(
            f"ONNX model {str(onnx_path)!r} does not exist; run the export stage first"
        )
    if not isinstance(opt_level, int) or not 0 <= opt_level <= 5:
        raise InvalidInputError(f"builder optimization level {opt_level!r} is out of range; use 0 to 5")
    all_shapes = profile.shapes(spec)
    trt, backend = import_nvinfer(flavor)
    label, version = _LABELS[backend], str(trt.__version__)
    if compute_capabilities and backend != "tensorrt-rtx":
        raise InvalidInputError(
            "compute capabilities can be chosen with TensorRT-RTX only; drop them for TensorRT"
        )
    trt_logger = _make_logger(trt, backend)
    notes: list[str] = []
    logger.info(
        "Building %s %s engine from %s (optimization level %d)", label, version, onnx_path, opt_level
    )
    started = time.perf_counter()

    # 1. Parse the ONNX model into a (strongly typed) network.
    builder = trt.Builder(trt_logger)
    network, typed = _create_network(trt, builder, strongly_typed, label, notes)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(_parser_message(parser, onnx_path, label))
    shapes = _check_inputs(network, all_shapes, onnx_path)

    # 2. Builder config: profile from the spec, optimization level, detailed layer information.
    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        opt_profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(opt_profile) < 0:
        raise EngineBuildError(
            f"{label} rejected the optimization profile {_profile_dict(shapes)}: "
            f"{_last_errors(trt_logger)}"
        )
    config.builder_optimization_level = opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if not typed:
        _enable_weak_precisions(trt, config, network, notes)
    if compute_capabilities:
        _set_compute_capabilities(trt, config, compute_capabilities)

    # 3. Timing cache (full TensorRT; TensorRT-RTX ignores it).
    cache_report = _attach_timing_cache(config, timing_cache, backend, notes)

    # 4. Build.
    build_started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - build_started
    if serialized is None:
        hint = ""
        if refittable and backend == "tensorrt-rtx" and any("CUDA" in e for e in trt_logger.errors):
            # Seen with TensorRT-RTX 1.7: plain builds need no GPU, refittable ones compile with CUDA.
            hint = (
                "; TensorRT-RTX builds refittable engines only on a machine with a supported GPU: "
                "build without refit here"
            )
        raise EngineBuildError(
            f"{label} could not build an engine from {onnx_path}: {_last_errors(trt_logger)}{hint}"
        )
    plan = bytes(memoryview(serialized))
    del serialized
    if cache_report["used"]:
        cache_report["saved_bytes"] = _save_timing_cache(config, Path(timing_cache))

    # 5. Which precision does each convolution/matmul run in, and which Q/DQ stayed standalone?
    net = _network_info(network)
    candidates = []
    info = _engine_information(trt, trt_logger, plan, shapes)
    if info is not None:
        candidates.append(("engine_inspector", _layers_from_inspector(info)))
    elif backend == "tensorrt-rtx":
        notes.append("the engine could not be deserialized here (no supported GPU?): no engine inspector")
    if backend == "tensorrt-rtx":
        candidates.append(("engine_plan", _layers_from_plan(plan)))
    source, engine_layers, compute = _choose_source(net, candidates)
    unfused = None
    if engine_layers is not None:
        # A kernel that implements nothing but Q/DQ layers: they were not fused into a neighbour.
        unfused = sorted({
            name
            for layer in engine_layers
            if layer["onnx_layers"] and all(n in net["qdq"] for n in layer["onnx_layers"])
            for name in layer["onnx_layers"]
        })
    precisions: dict[str, int] = {}
    for row in compute:
        precisions[row["precision"]] = precisions.get(row["precision"], 0) + 1

    # 6. Write the plan and the layer report atomically.
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path, layers_path = out_dir / PLAN_NAME, out_dir / LAYERS_NAME
    _atomic_write(plan_path, plan)
    report = {
        "backend": backend,
        "version": version,
        "source": source,
        "build_seconds": round(build_seconds, 3),
        "total_seconds": None,
        "plan": str(plan_path),
        "plan_bytes": len(plan),
        "layers_json": str(layers_path),
        "layer_precisions": dict(sorted(precisions.items())),
        "unfused_qdq": unfused,
        "num_layers": len(engine_layers) if engine_layers is not None else len(net["layers"]),
        "num_network_layers": len(net["layers"]),
        "profile": _profile_dict(shapes),
        "strongly_typed": typed,
        "opt_level": opt_level,
        "refittable": bool(refittable),
        "compute_capabilities": list(compute_capabilities) if compute_capabilities else None,
        "timing_cache": cache_report,
        "notes": notes,
    }
    layers_doc = {
        "backend": backend,
        "version": version,
        "source": source,
        "compute_layers": compute,
        "unfused_qdq": unfused,
        "engine_layers": engine_layers,
        "network_layers": net["layers"],
        "engine_information": info,
    }
    _atomic_write(layers_path, (json.dumps(layers_doc, indent=1) + "\n").encode())
    report["total_seconds"] = round(time.perf_counter() - started, 3)
    logger.info(
        "Built %s engine in %.2f s (%.2f s total): %s, %.2f MB, %d layers, precisions %s (from %s)",
        label, build_seconds, report["total_seconds"], plan_path, len(plan) / 1e6, report["num_layers"],
        report["layer_precisions"], source,
    )
    return report


def _create_network(trt, builder, strongly_typed: bool, label: str, notes: list[str]):
    flags = 0
    typed = False
    if strongly_typed:
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if flag is None:
            notes.append(f"{label} has no STRONGLY_TYPED network flag; built a weakly typed network")
        else:
            flags |= 1 << int(flag)
            typed = True
    network = builder.create_network(flags)
    if network is None:
        raise EngineBuildError(f"{label} could not create a network definition (flags {flags})")
    return network, typed


def _enable_weak_precisions(trt, config, network, notes: list[str]) -> None:
    """Weakly typed build: let TensorRT pick FP16/INT8 (and FP8 where the graph has FP8)."""
    wanted = ["FP16", "INT8"]
    if any(t.get("dtype") == "fp8" for l in _network_info(network)["layers"] for t in l["outputs"] if t):
        wanted.append("FP8")
    missing = []
    for name in wanted:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            missing.append(name)
        else:
            config.set_flag(flag)
    if missing:
        notes.append(
            f"builder flags {missing} do not exist in this backend: "
            "precisions follow the ONNX graph's types"
        )


def _set_compute_capabilities(trt, config, names: Sequence[str]) -> None:
    known = [n for n in trt.ComputeCapability.__members__ if n not in ("NONE",)]
    values = []
    for name in names:
        key = str(name).upper().replace(".", "")
        key = key if key.startswith("SM") or key == "CURRENT" else f"SM{key}"
        if key not in known:
            raise InvalidInputError(
                f"compute capability {name!r} is not supported; choose from {', '.join(known)}"
            )
        values.append(getattr(trt.ComputeCapability, key))
    config.num_compute_capabilities = len(values)
    for index, value in enumerate(values):
        if not config.set_compute_capability(value, index):
            raise InvalidInputError(
                f"compute capabilities {list(names)} were rejected (CURRENT must be alone)"
            )


def _parser_message(parser, onnx_path: Path, label: str) -> str:
    count = parser.num_errors
    if count == 0:
        return f"{label} could not parse {onnx_path} (the parser reported no error)"
    err = parser.get_error(0)
    desc = _one_line(err.desc())
    node_name = _call(err, "node_name")
    operator = _call(err, "node_operator")
    index = _call(err, "node")
    if node_name or operator:
        where = f"node {node_name!r} ({operator})"
    elif isinstance(index, int) and index >= 0:
        where = f"node #{index}"
    else:
        where = "the model file"
    more = f" (+{count - 1} more parser errors)" if count > 1 else ""
    return f"{label} could not parse {onnx_path}: {where}: {desc}{more}"


def _call(obj, name: str):
    fn = getattr(obj, name, None)
    try:
        return fn() if callable(fn) else None
    except Exception:  # older bindings: method missing or failing
        return None


def _last_errors(trt_logger) -> str:
    errors = " | ".join(trt_logger.errors[-3:])
    return errors or "no error message from the builder (enable debug logging)"


def _check_inputs(network, shapes: dict, onnx_path: Path) -> dict:
    """Match the network's inputs to the spec's; keep the shapes of the inputs the graph has."""
    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = tuple(int(d) for d in tensor.shape)
    unknown = [n for n in inputs if n not in shapes]
    if unknown:
        raise EngineBuildError(
            f"ONNX inputs {unknown} of {onnx_path} are not in the denoiser spec "
            f"(spec inputs: {list(shapes)}); "
            "export the ONNX with the same model adapter"
        )
    unused = [n for n in shapes if n not in inputs]
    if unused:
        logger.warning(
            "Spec inputs %s are not inputs of %s (unused by the graph?); no profile for them",
            unused, onnx_path,
        )
    for name, dims in inputs.items():
        lo, opt, hi = shapes[name]
        if len(dims) != len(lo):
            raise EngineBuildError(
                f"ONNX input {name!r} has rank {len(dims)} but the spec gives shape {lo}"
            )
        for axis, d in enumerate(dims):
            if d >= 0 and not lo[axis] == opt[axis] == hi[axis] == d:
                raise EngineBuildError(
                    f"ONNX input {name!r} has fixed size {d} on axis {axis} but the profile asks for "
                    f"{lo[axis]}..{hi[axis]}; export the ONNX and build the engine from the same spec"
                )
    return {n: shapes[n] for n in inputs}


def _profile_dict(shapes: dict) -> dict:
    return {
        n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in shapes.items()
    }


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- timing cache -------------------------------------------------------------------------------
@contextlib.contextmanager
def _file_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """Advisory lock on ``<path>.lock`` (a separate file, since ``path`` itself gets replaced)."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; writes stay atomic through os.replace
        fcntl = None
    with open(lock_path, "a+b") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _attach_timing_cache(config, timing_cache, backend: str, notes: list[str]) -> dict:
    report = {
        "path": str(timing_cache) if timing_cache else None,
        "used": False,
        "loaded_bytes": 0,
        "saved_bytes": 0,
    }
    if not timing_cache:
        return report
    if backend == "tensorrt-rtx":
        report["reason"] = (
            "TensorRT-RTX ignores timing caches (kernels are compiled on the GPU at run time)"
        )
        notes.append(report["reason"])
        logger.info("Not using timing cache %s: %s", timing_cache, report["reason"])
        return report
    report["loaded_bytes"] = _load_timing_cache(config, Path(timing_cache))
    report["used"] = True
    return report


def _load_timing_cache(config, path: Path) -> int:
    """Attach the cache stored at ``path`` (or an empty one) to ``config``; return the bytes read."""
    data = b""
    if path.is_file():
        with _file_lock(path, exclusive=False):
            data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cache = config.create_timing_cache(data)
        if cache is None or not config.set_timing_cache(cache, False):
            logger.warning(
                "Timing cache %s does not fit this TensorRT version or GPU; starting an empty one", path
            )
            data = b""
            config.set_timing_cache(config.create_timing_cache(b""), False)
    logger.debug("Timing cache %s: loaded %d bytes", path, len(data))
    return len(data)


def _save_timing_cache(config, path: Path) -> int:
    """Merge this build's timing cache with the file's current contents and replace the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cache = config.get_timing_cache()
        with _file_lock(path, exclusive=True):
            # Another build may have saved since we loaded: merge, so neither loses its entries.
            if path.is_file():
                other = config.create_timing_cache(path.read_bytes())
                if other is not None:
                    cache.combine(other, True)
            data = bytes(memoryview(cache.serialize()))
            _atomic_write(path, data)
    logger.debug("Timing cache %s: saved %d bytes", path, len(data))
    return len(data)


# -- layer report -------------------------------------------------------------------------------
def _trt_dtype(dtype) -> str:
    name = getattr(dtype, "name", str(dtype)).split(".")[-1]
    return _TRT_DTYPES.get(name, name.lower())


def _network_info(network) -> dict:
    """Layers of the parsed network, its Q/DQ layer names, and the precision of each conv/matmul."""
    layers, producer = [], {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        entry = {"name": layer.name, "type": layer.type.name, "inputs": [], "outputs": []}
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            entry["inputs"].append(None if t is None else {"name": t.name, "dtype": _trt_dtype(t.dtype)})
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            entry["outputs"].append({"name": t.name, "dtype": _trt_dtype(t.dtype)})
            producer[t.name] = entry
        layers.append(entry)

    def source_dtype(tensor: dict | None, depth: int = 0) -> str | None:
        """The type a tensor was dequantized from, looking through reshapes/transposes."""
        if tensor is None:
            return None
        prod = producer.get(tensor["name"])
        if prod is not None and depth < 8:
            if prod["type"] == "DEQUANTIZE" and prod["inputs"] and prod["inputs"][0]:
                return prod["inputs"][0]["dtype"]
            if prod["type"] in _PASS_THROUGH_TYPES and prod["inputs"]:
                return source_dtype(prod["inputs"][0], depth + 1)
        return tensor["dtype"]

    compute = []
    for entry in layers:
        if entry["type"] in _COMPUTE_TYPES:
            ins = entry["inputs"]
            compute.append({
                "name": entry["name"],
                "type": entry["type"],
                "activation_dtype": source_dtype(ins[0] if ins else None),
                "weight_dtype": source_dtype(ins[1]) if len(ins) > 1 else None,
            })
    qdq = {entry["name"] for entry in layers if entry["type"] in _QDQ_TYPES}
    return {"layers": layers, "compute": compute, "qdq": qdq}


def _engine_information(trt, trt_logger, plan: bytes, shapes: dict) -> dict | None:
    """Engine inspector JSON, or None where the engine cannot be deserialized (no GPU)."""
    trt_logger.quiet = True
    try:
        runtime = trt.Runtime(trt_logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            logger.debug("The engine cannot be deserialized on this machine; no engine inspector")
            return None
        inspector = engine.create_engine_inspector()
        context = None
        try:  # with dynamic shapes, formats are known only for concrete shapes
            context = engine.create_execution_context()
            for name, (_, opt, _) in shapes.items():
                context.set_input_shape(name, opt)
            inspector.execution_context = context
        except Exception as exc:
            logger.debug("No execution context for the engine inspector: %s", exc)
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        return json.loads(text)
    except Exception as exc:
        logger.debug("Engine inspector unavailable: %s", exc)
        return None
    finally:
        trt_logger.quiet = False


def _dtype_from_format(text: str) -> str | None:
    """Data type from an inspector "Format/Datatype" string such as "Row major linear FP32"."""
    t = str(text).lower()
    if not t or t.startswith("n/a"):
        return None
    for keys, name in (
        # Order matters: "uint8" contains "int8", "bfloat16" contains "float".
        (("fp8", "e4m3", "float8"), "fp8"), (("uint8",), "uint8"), (("int8",), "int8"),
        (("int4",), "int4"), (("fp4", "e2m1"), "fp4"), (("bf16", "bfloat16"), "bf16"),
        (("half", "fp16", "float16"), "fp16"), (("float", "fp32"), "fp32"), (("int32",), "int32"),
        (("int64",), "int64"), (("bool",), "bool"),
    ):
        if any(k in t for k in keys):
            return name
    return None


def _layers_from_inspector(info: dict) -> list[dict]:
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # non-detailed verbosity gives names only
            layer = {"Name": layer}
        name = str(layer.get("Name", ""))
        onnx = _ONNX_LAYER.findall(str(layer.get("Metadata", "")))
        if not onnx:  # no metadata: fused layers are named "a + b + c"
            onnx = [part.strip() for part in name.split(" + ") if part.strip()]

        def dtypes(key):
            return [_dtype_from_format(t.get("Format/Datatype", "")) for t in layer.get(key, [])
                    if isinstance(t, dict)]

        layers.append({
            "name": name,
            "type": str(layer.get("LayerType", "")),
            "tactic": layer.get("TacticName"),
            "origin": "inspector",
            "onnx_layers": onnx,
            "inputs": dtypes("Inputs"),
            "outputs": dtypes("Outputs"),
        })
    return layers


# One op per line: '  corrltn={ name="conv" output={...} input={...} ... layers="[ONNX Layer: conv]',
# further '[ONNX Layer: ...]' lines follow when a kernel implements several ONNX nodes.
_PLAN_OP = re.compile(
    rb'^  ([a-z][a-z0-9_]*)=\{ name="?([^"\s]+)"?([^\n]*(?:\n[\x1e\x1f]?\[ONNX Layer:[^\n]*)*)', re.M
)
_PLAN_TENSOR = re.compile(rb"^  (?:sub_)?tensor=\{ ([^\n]*)", re.M)


def _plan_dtype(name: str) -> str:
    if name.startswith("fp8"):
        return "fp8"
    if name.startswith("fp4"):
        return "fp4"
    return _PLAN_DTYPES.get(name, name)


def _layers_from_plan(plan: bytes) -> list[dict]:
    """Kernels listed in a TensorRT-RTX plan (undocumented text; best effort, empty if not found)."""
    try:
        types = {}
        for match in _PLAN_TENSOR.finditer(plan):
            body = match.group(1)
            name, dtype = re.search(rb' name="([^"]+)"', body), re.search(rb" type=(\w+)", body)
            if name and dtype:
                types[name.group(1).decode("utf-8", "replace")] = _plan_dtype(dtype.group(1).decode())
        layers = []
        for match in _PLAN_OP.finditer(plan):
            kind, name, body = (g.decode("utf-8", "replace") for g in match.groups())
            onnx = _ONNX_LAYER.findall(body)
            if not onnx or kind == "tensor":
                continue
            inputs = re.search(r"\binput=\{([^}]*)\}", body)
            names = re.findall(r'"([^"]+)"', inputs.group(1)) if inputs else []
            layers.append({
                "name": name,
                "type": kind,
                "tactic": None,
                "origin": "plan",
                "onnx_layers": list(dict.fromkeys(onnx)),
                "inputs": [types.get(n) for n in names],
                "outputs": [],
            })
        return layers
    except Exception as exc:  # an unexpected layout must not fail the build
        logger.debug("Could not read the plan's kernel listing: %s", exc)
        return []


def _match_engine_layer(name: str, engine_layers: list[dict]) -> dict | None:
    containing = [l for l in engine_layers if name in l["onnx_layers"]]
    for layer in containing:
        if layer["name"] == name:
            return layer
    for layer in containing:
        if _COMPUTE_HINT.search(f"{layer['type']} {layer.get('tactic') or ''} {layer['name']}"):
            return layer
    return containing[0] if containing else None


def _precision(activation: str | None, weight: str | None) -> str:
    activation = activation or "unknown"
    if weight in _NON_NUMERIC or weight == activation:
        return activation
    return f"{weight}w/{activation}a"  # e.g. int4 weight-only GEMM: "int4w/fp16a"


def _compute_rows(net: dict, engine_layers: list[dict] | None) -> tuple[list[dict], int]:
    rows, covered = [], 0
    for c in net["compute"]:
        activation, weight, matched = c["activation_dtype"], c["weight_dtype"], None
        if engine_layers:
            matched = _match_engine_layer(c["name"], engine_layers)
        from_engine = False
        if matched is not None:
            numeric = [d for d in matched["inputs"] if d not in _NON_NUMERIC]
            if numeric:
                activation, from_engine = numeric[0], True
                covered += 1
                # The plan listing gives the weight operand's type too (second input).
                second = matched["inputs"][1] if len(matched["inputs"]) > 1 else None
                if matched["origin"] == "plan" and second not in _NON_NUMERIC:
                    weight = second
        rows.append({
            "name": c["name"],
            "type": c["type"],
            "precision": _precision(activation, weight),
            "activation_dtype": activation,
            "weight_dtype": weight,
            "engine_layer": matched["name"] if matched is not None else None,
            "precision_from": "engine" if from_engine else "network",
        })
    return rows, covered


def _choose_source(net: dict, candidates: list[tuple[str, list[dict]]]):
    """Pick the engine evidence that covers most convolutions/matmuls; else the network definition."""
    best = ("network_definition", None, _compute_rows(net, None)[0], 0)
    for source, layers in candidates:
        if not layers:
            continue
        rows, covered = _compute_rows(net, layers)
        if covered > best[3] or (best[1] is None and not net["compute"]):
            best = (source, layers, rows, covered)
    return best[0], best[1], best[2]
