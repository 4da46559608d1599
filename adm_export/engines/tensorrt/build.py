"""Building a TensorRT / TensorRT-RTX engine from the exported ONNX denoiser: ``unet.plan`` and ``layers.json``."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

from adm_export.artifacts import write_bytes
from adm_export.engines.tensorrt import inspection
from adm_export.engines.tensorrt import timing_cache as tcache
from adm_export.engines.tensorrt.backend import LABELS, EngineBuildError, import_nvinfer, make_logger, one_line
from adm_export.engines.tensorrt.profile import EngineProfile
from adm_export.errors import ArtifactNotFoundError, InvalidInputError

logger = logging.getLogger(__name__)

PLAN_NAME = "unet.plan"
LAYERS_NAME = "layers.json"


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
    label, version = LABELS[backend], str(trt.__version__)
    if compute_capabilities and backend != "tensorrt-rtx":
        raise InvalidInputError(
            "compute capabilities can be chosen with TensorRT-RTX only; drop them for TensorRT"
        )
    trt_logger = make_logger(trt, backend)
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
    cache_report = tcache.attach(config, timing_cache, backend, notes)

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
        cache_report["saved_bytes"] = tcache.save(config, Path(timing_cache))

    # 5. Which precision does each convolution/matmul run in, and which Q/DQ stayed standalone?
    net = inspection.network_info(network)
    candidates = []
    info = inspection.engine_information(trt, trt_logger, plan, shapes)
    if info is not None:
        candidates.append(("engine_inspector", inspection.layers_from_inspector(info)))
    elif backend == "tensorrt-rtx":
        notes.append("the engine could not be deserialized here (no supported GPU?): no engine inspector")
    if backend == "tensorrt-rtx":
        candidates.append(("engine_plan", inspection.layers_from_plan(plan)))
    source, engine_layers, compute = inspection.choose_source(net, candidates)
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
    write_bytes(plan_path, plan)
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
    write_bytes(layers_path, (json.dumps(layers_doc, indent=1) + "\n").encode())
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
    if any(t.get("dtype") == "fp8" for l in inspection.network_info(network)["layers"] for t in l["outputs"] if t):
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
    desc = one_line(err.desc())
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

