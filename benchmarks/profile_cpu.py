#!/usr/bin/env python3
"""Per-op CPU profile of ONNX Runtime U-Net exports: where a denoiser step spends its time.

Runs each ONNX file in an ONNX Runtime CPU session with ``SessionOptions.enable_profiling`` (the
session's own per-node kernel timer), a few calls after a warm-up, and sums the kernel time by
op group: integer convolutions / GEMMs / attention MatMuls, their float counterparts, Q/DQ,
normalisation, softmax, element-wise and data movement. The groups come from ONNX Runtime's
optimised graph (what actually runs), the float/integer split from its op types, and the
attention MatMuls are told apart by having no weight initializer (both inputs are activations).

    python benchmarks/profile_cpu.py /tmp/bench/audioldm-s/fp32/unet.onnx /tmp/bench/audioldm-s/int8_ort/onnx/unet.onnx \
        --size audioldm-s --threads 2 --out benchmarks/results/profile_cpu.json

The spec (input names and shapes) comes from ``--size`` (``reference``: reference-audioldm, the
embedded default model; ``embedded``: tiny-audioldm; ``audioldm-s``: the 185 M U-Net), batch 2,
``--seconds`` of audio.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_common as sc  # noqa: E402

log = logging.getLogger("profile_cpu")

INTEGER_MATMULS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul"}
INTEGER_CONVS = {"QLinearConv", "ConvInteger"}
FLOAT_CONVS = {"Conv", "FusedConv", "NhwcConv"}
FLOAT_MATMULS = {"MatMul", "FusedMatMul"}
GEMMS = {"Gemm", "FusedGemm"}
QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
NORMS = {"InstanceNormalization", "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
         "GroupNorm", "GroupNormalization", "ReduceMean", "Pow", "Sqrt"}
SOFTMAX = {"Softmax", "QLinearSoftmax"}
ELEMENTWISE = {"Add", "Mul", "Sub", "Div", "Sigmoid", "Erf", "Gelu", "BiasGelu", "FastGelu", "QuickGelu", "Tanh",
               "QLinearAdd", "QLinearMul", "QLinearSigmoid", "Sin", "Cos", "Exp", "Neg", "Where"}
MOVEMENT = {"Reshape", "Transpose", "Concat", "Resize", "Slice", "Split", "Gather", "Unsqueeze", "Squeeze",
            "Expand", "Shape", "Cast", "ConstantOfShape", "Identity", "Flatten", "Tile", "QLinearConcat", "Range",
            "Equal", "Pad"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("onnx", nargs="+", type=Path, help="ONNX files (label=path to name a row).")
    p.add_argument("--labels", nargs="*", default=None, help="One label per file.")
    p.add_argument("--size", choices=["reference", "embedded", "audioldm-s"], default="audioldm-s")
    p.add_argument("--seconds", type=float, default=10.24)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="JSON file for every number.")
    return p.parse_args(argv)


def spec_for(size: str):
    if size in ("embedded", "reference"):
        from adm_export.models import load_model

        return load_model("tiny-audioldm" if size == "embedded" else "reference-audioldm").denoiser_spec()
    return sc.make_adapter(sc.build_pipeline("audioldm-s"), sc.MODEL_ID).denoiser_spec()


def classify(op: str, node, inits: set[str]) -> str:
    """Op group of one node of the optimised graph."""
    if op in INTEGER_CONVS:
        return "conv int8"
    if op in FLOAT_CONVS:
        return "conv fp32"
    if op in INTEGER_MATMULS or op in FLOAT_MATMULS:
        weighted = node is not None and any(i in inits for i in list(node.input)[1:2])
        if op in INTEGER_MATMULS and node is not None and op == "MatMulIntegerToFloat":
            # MatMulIntegerToFloat's B is input 1 too (A, B, a_scale, b_scale, ...).
            weighted = node.input[1] in inits
        if op == "QLinearMatMul" and node is not None:
            weighted = node.input[3] in inits  # a, a_scale, a_zp, b, ...
        kind = "linear" if weighted else "attention"
        return f"{kind} matmul {'int8' if op in INTEGER_MATMULS else 'fp32'}"
    if op in GEMMS:
        return "gemm fp32"
    if op == "QGemm":
        return "gemm int8"
    if op in QDQ:
        return "quantize/dequantize"
    if op in NORMS:
        return "normalization"
    if op in SOFTMAX:
        return "softmax"
    if op in ELEMENTWISE:
        return "element-wise"
    if op in MOVEMENT:
        return "data movement"
    return f"other ({op})"


def profile(path: Path, spec, frames: int, batch: int, threads: int, iters: int) -> dict:
    """Kernel time per op group and per op type (ms per call), from ONNX Runtime's profiler."""
    import onnx
    import onnxruntime as ort

    from adm_export.engines.onnxruntime import OrtRunner

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
        nodes = {n.name: n for n in graph.node}
        inits = {i.name for i in graph.initializer}
        runner = OrtRunner(sess)
        x = spec.dummy_inputs(batch, frames, seed=1)
        runner(x)  # warm-up (its events are dropped below)
        walls = []
        for _ in range(iters):
            t0 = time.perf_counter()
            runner(x)
            walls.append((time.perf_counter() - t0) * 1000)
        prof = Path(sess.end_profiling())
        events = json.loads(prof.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    # Keep the node events of the timed calls: those after the end of the first (warm-up) run.
    first_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < first_end:
            continue
        name = e["name"][: -len("_kernel_time")]
        per_node[name].append(e["dur"] / 1000)
        op_of[name] = e["args"].get("op_name", "?")
    # Per node, the median over the timed calls: a call preempted by another job on this shared
    # CPU inflates one sample, not the node's time.
    by_group: dict[str, float] = collections.Counter()
    by_op: dict[str, float] = collections.Counter()
    for name, durations in per_node.items():
        ms = statistics.median(durations)
        by_group[classify(op_of[name], nodes.get(name), inits)] += ms
        by_op[op_of[name]] += ms
    kernel_ms = sum(by_group.values())
    ops_in_graph = collections.Counter(n.op_type for n in graph.node)
    return {
        "file": str(path),
        "wall_ms_per_call": [round(w, 1) for w in walls],
        "kernel_ms_per_call": round(kernel_ms, 1),  # sum over nodes of each node's median
        "groups_ms": {k: round(v, 2) for k, v in sorted(by_group.items(), key=lambda kv: -kv[1])},
        "ops_ms": {k: round(v, 2) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "ops_in_graph": dict(sorted(ops_in_graph.items())),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", datefmt="%H:%M:%S")
    labels = args.labels or [p.parent.name if p.parent.name != "onnx" else p.parent.parent.name for p in args.onnx]
    spec = spec_for(args.size)
    frames = spec.frames_for_seconds(args.seconds)
    results = {"environment": sc.environment("cpu"), "load_at_start": sc.cpu_load(),
               "settings": {"size": args.size, "seconds": args.seconds, "frames": frames, "batch": args.batch,
                            "threads": args.threads, "iters": args.iters}, "profiles": {}}
    for label, path in zip(labels, args.onnx):
        log.info("profiling %s (%s)", label, path)
        results["profiles"][label] = profile(path, spec, frames, args.batch, args.threads, args.iters)
    results["load_at_end"] = sc.cpu_load()
    if args.out:
        sc.write_json(args.out, results)
    groups = sorted({g for r in results["profiles"].values() for g in r["groups_ms"]},
                    key=lambda g: -max(r["groups_ms"].get(g, 0) for r in results["profiles"].values()))
    head = "| op group | " + " | ".join(f"{lab} ms (%)" for lab in labels) + " |"
    print(head)
    print("| --- |" + " ---: |" * len(labels))
    for g in groups:
        cells = []
        for lab in labels:
            r = results["profiles"][lab]
            v = r["groups_ms"].get(g)
            cells.append("—" if v is None else f"{v:.1f} ({100 * v / r['kernel_ms_per_call']:.0f} %)")
        print(f"| {g} | " + " | ".join(cells) + " |")
    print("| **kernel total** | " + " | ".join(f"**{results['profiles'][lab]['kernel_ms_per_call']:.1f}**"
                                               for lab in labels) + " |")
    print(f"load average {results['load_at_start']['loadavg_1_5_15']} -> {results['load_at_end']['loadavg_1_5_15']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
