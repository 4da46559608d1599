"""The engine's speed-up over the same model in FP32, measured by the engine stage on the same CPU.

The FP32 reference is the export itself with its quantization undone, made without torch in a
second or two (:func:`fp32_reference_graph`): every low-bit weight's ``DequantizeLinear`` is
evaluated into an FP32 initializer (ONNX's reference implementation: the exact grid values),
activation ``QuantizeLinear -> DequantizeLinear`` pairs are dropped. Same graph, same shapes,
same graph passes: only the quantization differs, so the ratio is what quantization bought on
this machine. Both are timed round-robin (one call of each per round, :func:`time_round_robin`)
so that other load on the machine slows both alike.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

REFERENCE_NOTE = ("the export with its quantization undone: low-bit weights dequantized to FP32 initializers, "
                  "activation Q/DQ dropped (same graph otherwise), ONNX Runtime CPU")


def fp32_reference_graph(model) -> dict:
    """Turn a quantized export into its FP32 counterpart, in place.

    Returns:
        ``{"weights_dequantized": n, "activation_qdq_dropped": n}``.
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    # DequantizeLinear means the same from opset 13 to 21 for what an export holds (21 adds types
    # and blocks); the reference implementation starts at 19.
    version = max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] + [21])
    opsets = [helper.make_opsetid("", version)]
    prod = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    keep, new_inits = [], []
    weights = pairs = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            # A weight: evaluate the one node with ONNX's reference semantics (INT8/INT4/FP8, any axis/block).
            args = [numpy_helper.to_array(inits[i]) for i in node.input if i]
            names = [f"i{k}" for k in range(len(args))]
            one = helper.make_node("DequantizeLinear", names, ["y"], **{a.name: helper.get_attribute_value(a)
                                                                        for a in node.attribute})
            g = helper.make_graph([one], "dq", [], [helper.make_tensor_value_info("y", 0, None)],
                                  [numpy_helper.from_array(a, n) for a, n in zip(args, names)])
            (value,) = ReferenceEvaluator(helper.make_model(g, opset_imports=opsets)).run(None, {})
            new_inits.append(numpy_helper.from_array(np.asarray(value, np.float32), node.output[0]))
            weights += 1
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in prod and prod[node.input[0]].op_type == "QuantizeLinear":
            rename[node.output[0]] = prod[node.input[0]].input[0]  # consumers read the float tensor
            pairs += 1
            continue
        keep.append(node)
    for node in keep:
        for k, name in enumerate(node.input):
            while name in rename:  # back-to-back pairs (an output Q/DQ, then the next layer's input Q/DQ)
                name = rename[name]
            node.input[k] = name
    for out in graph.output:  # pragma: no cover - a Q/DQ pair is never the graph's output
        if out.name in rename:
            raise RuntimeError(f"graph output {out.name!r} is a DequantizeLinear output")
    used = {i for n in keep for i in n.input}
    keep = [n for n in keep if n.op_type != "QuantizeLinear" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.value_info[:]
    return {"weights_dequantized": weights, "activation_qdq_dropped": pairs}


def time_round_robin(runners: dict, inputs: dict, rounds: int = 5, warmup: int = 1) -> dict:
    """Median and minimum milliseconds per call of each runner, timed one call of each per round."""
    for _ in range(warmup):
        for run in runners.values():
            run(inputs)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(inputs)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: {"median_ms": round(statistics.median(t), 3), "min_ms": round(min(t), 3), "runs": len(t)}
            for name, t in times.items()}


def compare_with_fp32(engine_path: Path, spec, frames: int, threads: int, work: Path, batch: int = 2,
                      rounds: int = 5) -> dict:
    """Time the CPU engine against its FP32 reference on the same inputs, round-robin.

    Args:
        engine_path: The served (quantized) ONNX file.
        spec: The denoiser spec (input names and shapes).
        frames: Latent frames of the timed call.
        threads: ONNX Runtime intra-op threads (0: all cores).
        work: Scratch folder for the FP32 reference graph (removed by the caller).
        batch: Batch of the timed call (2: one clip with classifier-free guidance).
        rounds: Timed rounds.

    Returns:
        ``{"engine": {...}, "fp32_reference": {...}, "speedup_vs_fp32", "batch", "frames", "threads",
        "load_average"}``.
    """
    import onnx

    from adm_export.engines.onnxruntime import OrtRunner, make_session
    from adm_export.export.onnx import save_onnx

    start = time.perf_counter()
    model = onnx.load(str(engine_path))
    undone = fp32_reference_graph(model)
    ref_path = Path(work) / "fp32_reference.onnx"
    save_onnx(model, ref_path)
    del model
    prepared = time.perf_counter() - start
    runners = {"engine": OrtRunner(make_session(engine_path, "cpu", threads)),
               "fp32_reference": OrtRunner(make_session(ref_path, "cpu", threads))}
    inputs = spec.dummy_inputs(batch, frames)
    timing = time_round_robin(runners, inputs, rounds=rounds)
    speedup = timing["fp32_reference"]["median_ms"] / timing["engine"]["median_ms"]
    logger.info("CPU speed-up over FP32: %.2fx (%.1f vs %.1f ms per denoiser call, batch %d, %d frames, "
                "median of %d round-robin calls)", speedup, timing["engine"]["median_ms"],
                timing["fp32_reference"]["median_ms"], batch, frames, rounds)
    return {
        "engine": timing["engine"],
        "fp32_reference": {**timing["fp32_reference"], "graph": REFERENCE_NOTE, **undone,
                           "prepare_seconds": round(prepared, 2)},
        "speedup_vs_fp32": round(speedup, 3),
        "batch": batch,
        "frames": frames,
        "threads": threads or os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
