#!/usr/bin/env python
"""Stage times of `adm-export build` on the embedded model, and ONNX Runtime CPU latency of the
U-Net: FP32 export vs the INT8 Q/DQ export (TensorRT-style placement), beside torch FP32.

Usage:  python benchmarks/build_stages.py [--model tiny-audioldm] [--threads 2] [--runs 5]
Prints a table and writes benchmarks/results/build_stages.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def other_load() -> float:
    """1-minute load average minus this process's expected share: a hint of CPU contention."""
    return os.getloadavg()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-audioldm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, nargs="+", default=[2.56, 10.24], help="latent lengths to time")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "build_stages.json"))
    args = ap.parse_args()

    import torch

    import adm_export
    from adm_export.config import BuildConfig, CalibrationConfig
    from adm_export.engines.onnxruntime import OrtRunner, make_session
    from adm_export.export.onnx import onnx_file_bytes, torch_to_onnx
    from adm_export.models import load_model
    from adm_export.progress import set_progress

    set_progress(False)
    torch.set_num_threads(args.threads)
    load_before = other_load()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "build"
        t0 = time.perf_counter()
        report = adm_export.build(BuildConfig(out=out, calibration=CalibrationConfig(model=args.model))).report
        total = time.perf_counter() - t0
        adapter = load_model(args.model)
        spec = adapter.denoiser_spec()
        fp32 = Path(tmp) / "fp32.onnx"
        example = spec.dummy_inputs(2, spec.frames_for_seconds(2.56))
        torch_to_onnx(adapter, adapter.denoiser, fp32, 17, example)
        int8 = out / "onnx" / "unet.onnx"
        sessions = {"onnxruntime fp32": OrtRunner(make_session(fp32, "cpu", args.threads)),
                    "onnxruntime int8 q/dq": OrtRunner(make_session(int8, "cpu", args.threads))}
        latency = []
        for seconds in args.seconds:
            frames = spec.frames_for_seconds(seconds)
            inputs = spec.dummy_inputs(2, frames)
            row = {"seconds": seconds, "frames": frames, "batch": 2}
            module = adapter.export_module(adapter.denoiser)
            with torch.inference_mode():
                row["torch fp32"] = median_ms(lambda: module(*inputs.values()), args.runs)
            for name, runner in sessions.items():
                row[name] = median_ms(lambda r=runner: r(inputs), args.runs)
            row["int8 speed-up vs onnxruntime fp32"] = row["onnxruntime fp32"] / row["onnxruntime int8 q/dq"]
            latency.append(row)
        sizes = dict(report["size"], fp32_onnx_bytes=onnx_file_bytes(fp32))
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "load_average_before": round(load_before, 2),
                    "load_average_after": round(other_load(), 2)},
        "model": args.model,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "stages_seconds": {k: v["seconds"] for k, v in report["stages"].items()},
        "build_total_seconds": round(total, 1),
        "sizes": sizes,
        "parity": report["parity"],
        "engine_layer_precisions": report["engine"]["layer_precisions"],
        "latency_ms_per_denoiser_call": latency,
    }
    print(f"adm-export build on {args.model} ({os.cpu_count()} cores, load average {load_before:.1f} before)")
    print("| stage | seconds |\n|---|---:|")
    for k, v in result["stages_seconds"].items():
        print(f"| {k} | {v:.1f} |")
    print(f"| total | {total:.1f} |\n")
    print(f"U-Net: FP32 {sizes['unet_fp32_bytes'] / 1e6:.2f} MB (ONNX {sizes['fp32_onnx_bytes'] / 1e6:.2f} MB), "
          f"INT8 export {sizes['unet_export_bytes'] / 1e6:.2f} MB = {100 * sizes['reduction_vs_fp32']:.1f}% of FP32\n")
    cols = ["torch fp32", "onnxruntime fp32", "onnxruntime int8 q/dq"]
    print("| audio | latent | " + " | ".join(f"{c} ms" for c in cols) + " | int8 vs ORT fp32 |")
    print("|---|---|" + "---:|" * (len(cols) + 1))
    for row in latency:
        print(f"| {row['seconds']} s | 8x{row['frames']}x16, batch 2 | " + " | ".join(f"{row[c]:.1f}" for c in cols)
              + f" | {row['int8 speed-up vs onnxruntime fp32']:.2f}x |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
