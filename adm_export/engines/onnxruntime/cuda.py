"""The ``engine`` stage's CUDA path: the fused FP16 ONNX Runtime engine, what it computes in, and its parity.

:func:`build_cuda_engine` turns any export (FP32 / FP16 baseline, INT8 / FP8 / W4A8 / mixed Q/DQ)
into the served graph (:mod:`.dequantize`: canonical FP32 graph; :mod:`.fusions`: ONNX Runtime's diffusion fusions,
FP16) and writes it with external data. It then checks the served graph numerically:

* on a CUDA machine, exactly as ``generate`` serves it (CUDA provider, IO binding, CUDA graph)
  against the FP32 reference on the same random inputs: the torch FP32 denoiser for a
  full-precision export; for a quantized export the weight-dequantized FP32 graph (the
  quantized weights, activations not quantized: what the CUDA engine is meant to compute) run by
  the CPU provider. A gap above ``tolerance`` fails the build.
* without CUDA (a CPU build machine), the served graph cannot run (its fused ops are CUDA-only):
  the same fusions without the CUDA-only ones are run by the CPU provider against the FP32
  graph, which checks the attention fusion and the dequantization; the served graph's own check
  is recorded as not done.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from adm_export.engines.onnxruntime import dequantize, fusions

logger = logging.getLogger(__name__)

SERVED = "unet.onnx"
FUSED_KIND = "cuda-fused-fp16"
PLAIN_KIND = "cuda-fp16"
CPU_KIND = "export"
DEFAULT_TOLERANCE = 1e-2


@dataclasses.dataclass(frozen=True)
class CudaEngineSpec:
    """How the CUDA engine is built and checked.

    Attributes:
        fusions: Run ONNX Runtime's diffusion optimizer (``False``: the same FP16 graph unfused,
            a fallback if a model's graph breaks the optimizer).
        tolerance: Largest relative L2 gap of the served graph to its FP32 reference.
        frames: Latent frames of the parity and latency inputs.
        batch: Batch of the parity and latency inputs (classifier-free guidance: 2 per clip).
    """

    fusions: bool = True
    tolerance: float = DEFAULT_TOLERANCE
    frames: int = 32
    batch: int = 2


def cuda_available() -> bool:
    """Whether ONNX Runtime's CUDA provider and a CUDA device are both here."""
    try:
        import onnxruntime as ort
        import torch
    except ImportError:  # pragma: no cover
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def parity_inputs(spec, batch: int, frames: int, seed: int) -> dict:
    """Random denoiser inputs; attention masks as 0/1 rows (a random-normal mask means nothing)."""
    import torch

    inputs = spec.dummy_inputs(batch, frames, seed=seed)
    for name, value in inputs.items():
        if "mask" in name:
            keep = max(1, value.shape[-1] * (seed + 1) // (seed + 3))
            mask = torch.zeros_like(value)
            mask[..., :keep] = 1
            inputs[name] = mask
    return inputs


def rel_l2(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _save(model, path: Path) -> int:
    """Save with every weight in ``<name>.data`` beside the graph (any size); returns bytes on disk.

    ``onnx.save_model`` turns the in-memory tensors into references to the data file; they are
    read back so ``model`` stays usable.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    load_external_data_for_model(model, str(path.parent))
    return path.stat().st_size + path.with_name(path.name + ".data").stat().st_size


def build_cuda_graph(src: str | Path, dst: str | Path, use_fusions: bool = True,
                     reference_dst: str | Path | None = None) -> dict:
    """Write the CUDA serving graph of an export (see the module doc) and describe it.

    Args:
        src: The export's ``unet.onnx``.
        dst: Where to write the served graph (``<dst>.data`` holds its weights).
        use_fusions: Run the diffusion optimizer.
        reference_dst: If given, also write the canonical FP32 graph (dequantized weights,
            activation Q/DQ dropped) there: the reference of a quantized export's parity check.

    Returns:
        The ``layers.json`` content without parity and latency: ``graph``, ``layer_precisions``,
        ``compute_ops``, ``fusions``, ``weights``, ``activations``, ``fp32_kept``, sizes, seconds.
    """
    import onnx

    start = time.perf_counter()
    model = onnx.load(str(src))
    source_ops = collections.Counter(n.op_type for n in model.graph.node)
    prepared = dequantize.prepare_fp32(model)
    if reference_dst is not None:
        _save(model, Path(reference_dst))
    fuse_report = {"fusions": {op: 0 for op in fusions.FUSED_OPS}, "decisions": {"optimizer": "not run"}}
    fusion_error = None
    opt = None
    if use_fusions:
        try:
            opt, fuse_report = fusions.fuse(model, cuda=True)
        except Exception as exc:  # the optimizer is third-party pattern matching: keep a working engine
            fusion_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            logger.warning("ONNX Runtime's diffusion optimizer failed (%s); serving the unfused FP16 graph",
                           fusion_error)
    if opt is None:
        from onnxruntime.transformers.onnx_model import OnnxModel

        opt = OnnxModel(model)
    del model
    fused_seconds = time.perf_counter() - start
    fusions.name_nodes(opt.model)
    keep_fp32 = fusions.timestep_path(opt.model)
    fusions.to_fp16(opt, keep_fp32)
    served = opt.model
    counts = fusions.compute_precisions(served)
    ops = collections.Counter(n.op_type for n in served.graph.node)
    size = _save(served, Path(dst))
    grid = prepared["weights_dequantized"]["grid"]
    kind = FUSED_KIND if use_fusions and fusion_error is None else PLAIN_KIND
    weights = {"stored": "fp16", "dequantized_from_low_bit": prepared["weights_dequantized"]["tensors"],
               "quantization_grid": grid}
    if grid:
        grids = "/".join(k.upper() for k in grid)
        weights["note"] = (f"{prepared['weights_dequantized']['tensors']} weights on the {grids} grid, dequantized at "
                           "engine build and stored FP16 in the served graph (the optimizer's fusions need plain "
                           "float weights; the low-bit export stays in onnx/ for TensorRT and storage)")
    dropped = prepared["activation_qdq_pairs_dropped"]
    activations = {"quantized": False, "qdq_pairs_dropped": dropped,
                   "note": ("activations not quantized on ONNX Runtime CUDA (it has no INT8/FP8 kernels for Q/DQ "
                            "graphs); every layer computes in FP16") if dropped else "no activation quantization"}
    report = {
        "graph": kind,
        "device": "cuda",
        "source": "served_graph",
        "layer_precisions": counts["layer_precisions"],
        "compute_ops": counts["compute_ops"],
        "weight_dtypes": counts["weight_dtypes"],
        "fusions": {op: ops.get(op, 0) for op in fusions.FUSED_OPS},
        "fusion_decisions": fuse_report["decisions"],
        "weights": weights,
        "activations": activations,
        "fp32_kept": {"nodes": len(keep_fp32), "why": "timestep sinusoidal embedding (t * f rounds badly in FP16); "
                      "Resize scales and GroupNorm gamma/beta by the converter's rules"},
        "qdq_left": {k: ops.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear")},
        "source_qdq": {k: source_ops.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear")},
        "prepared": {k: v for k, v in prepared.items() if k != "weights_dequantized"},
        "served_bytes": size,
        "build_seconds": round(time.perf_counter() - start, 2),
        "fusion_seconds": round(fused_seconds, 2),
    }
    if fusion_error:
        report["fusion_error"] = fusion_error
    report["summary"] = precision_summary(report)
    return report


def precision_summary(report: dict) -> str:
    """One line saying what the served graph computes in (for the log, the CLI and report.md)."""
    prec = ", ".join(f"{n} {k}" for k, n in report["layer_precisions"].items())
    fused = ", ".join(f"{n} {k}" for k, n in report["fusions"].items() if n) or "none"
    grid = report["weights"].get("quantization_grid") or {}
    weights = (f"weights on the {'/'.join(k.upper() for k in grid)} grid, stored FP16" if grid
               else "weights FP16")
    acts = "activations not quantized" if report["activations"]["qdq_pairs_dropped"] else "activations FP16"
    return f"compute: {prec} ({weights}; {acts}); fused: {fused}"


def _latency(engine, inputs: dict, runs: int = 10) -> dict:
    import torch

    for _ in range(3):  # CUDA graph: two plain runs, then the capture
        engine(inputs)
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        engine(inputs)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": round(statistics.median(times), 3), "runs": runs}


def check_on_cuda(served: Path, spec, reference, options, cfg: CudaEngineSpec) -> dict:
    """Run the served graph as ``generate`` does and compare it with ``reference`` on two inputs.

    Args:
        served: The served graph.
        spec: The denoiser spec.
        reference: ``callable(inputs) -> numpy`` computing the FP32 reference.
        options: The serving ``OrtOptions`` (as ``generate`` resolves them on CUDA).
        cfg: Tolerance and shapes.

    Returns:
        ``{"rel_l2": [...], "max", "tolerance", "passed", "reference", "latency"}``.
    """
    from adm_export.engines.onnxruntime.engine import OrtEngine

    engine = OrtEngine(served, spec, options)
    inputs = [parity_inputs(spec, cfg.batch, cfg.frames, seed) for seed in (0, 1)]
    refs = [reference(x) for x in inputs]
    on_gpu = [{k: v.cuda() for k, v in x.items()} for x in inputs]
    gaps = [rel_l2(engine(x).float().cpu().numpy(), r) for x, r in zip(on_gpu, refs)]
    latency = _latency(engine, on_gpu[0])
    # Once more after the timing runs: with CUDA graphs this is a replay of the captured graph,
    # which must read the new input (not the one it was captured with).
    gaps.append(rel_l2(engine(on_gpu[1]).float().cpu().numpy(), refs[1]))
    latency.update(batch=cfg.batch, frames=cfg.frames, device="cuda", cuda_graph=options.cuda_graph,
                   session_seconds=round(engine.session_seconds, 2))
    return {"rel_l2": gaps, "max": max(gaps), "tolerance": cfg.tolerance, "passed": max(gaps) <= cfg.tolerance,
            "device": "cuda", "served_graph_checked": True, "latency": latency}


def check_on_cpu(fp32_path: Path, spec, cfg: CudaEngineSpec) -> dict:
    """Without CUDA: the fusions the CPU provider can run, checked against the FP32 graph.

    The served graph's fused GroupNorm/NhwcConv only run on CUDA and its FP16 arithmetic cannot
    be checked here; the attention fusion, the dequantization and the Q/DQ removal can.
    """
    import onnx

    from adm_export.engines.onnxruntime.sessions import OrtOptions, make_session

    if not cfg.fusions:
        return {"rel_l2": [], "max": 0.0, "tolerance": cfg.tolerance, "passed": True, "device": "cpu",
                "served_graph_checked": False, "checked": "nothing (--no-cuda-fusions: no fusion to check here)",
                "reason": "no CUDA device here: the served FP16 graph runs only on ONNX Runtime's CUDA provider"}
    model = onnx.load(str(fp32_path))
    opt, report = fusions.fuse(model, cuda=False)
    del model
    cpu_path = fp32_path.with_name("cpu_fused.onnx")
    _save(opt.model, cpu_path)
    del opt
    opts = OrtOptions(provider="cpu", threads=0)
    fp32 = make_session(fp32_path, options=opts)
    fused = make_session(cpu_path, options=opts)
    gaps = []
    for seed in (0, 1):
        x = {k: v.numpy() for k, v in parity_inputs(spec, cfg.batch, cfg.frames, seed).items()}
        names = {i.name for i in fp32.get_inputs()}
        feed = {k: v for k, v in x.items() if k in names}
        gaps.append(rel_l2(fused.run(None, feed)[0], fp32.run(None, feed)[0]))
    # Float reordering only (no FP16 here): far below the FP16 tolerance.
    tol = min(cfg.tolerance, 1e-4)
    return {"rel_l2": gaps, "max": max(gaps), "tolerance": tol, "passed": max(gaps) <= tol, "device": "cpu",
            "served_graph_checked": False,
            "checked": "CPU-runnable fusions (attention, layer norm) vs the FP32 graph on the CPU provider",
            "cpu_fusions": {k: v for k, v in report["fusions"].items() if v},
            "reason": "no CUDA device here: the served graph's fused ops run only on ONNX Runtime's CUDA provider"}
