#!/usr/bin/env python3
"""CPU speed: ONNX Runtime FP32 vs INT8 Q/DQ vs torch FP32, per U-Net step, embedded and AudioLDM-S sizes.

One step is one denoiser call at batch 2 (one clip with classifier-free guidance) on the 10.24 s
latent (8x256x16), random weights. Rows per model size:

* torch FP32 (eager, ``torch.set_num_threads(threads)``),
* ONNX Runtime CPU FP32 (the unquantized export, ``adm_export.export.fp16`` with ``fp16=False``),
* ONNX Runtime CPU INT8 Q/DQ: the project's export (calibrate -> ModelOpt INT8 -> export, TensorRT
  placement: Q/DQ on inputs and weights),
* with ``--ort-placement``: the project's export with ``--placement onnxruntime`` (convolution
  outputs quantized too, UINT8 activations, so ONNX Runtime fuses QLinearConv), same calibration,
* with ``--ort-native``: ONNX Runtime's own ``quantize_static`` (QDQ, per-channel INT8 weights,
  UINT8 activations, outputs quantized too) on the FP32 export, as the reference for what an
  ONNX-Runtime placement would give.

CPU contention is recorded with every row (load averages and the busiest processes), because
this machine's 2 cores are shared.

    python benchmarks/speed_cpu.py --out benchmarks/results --workdir /tmp/adm-cpu-bench
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_common as sc  # noqa: E402

log = logging.getLogger("speed_cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["embedded", "audioldm-s"], choices=["embedded", "audioldm-s"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/adm-cpu-bench"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--seconds", type=float, default=10.24)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reuse", action="store_true", help="Reuse exports already in --workdir.")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--ort-native", action="store_true", help="Also time ONNX Runtime's own quantize_static QDQ.")
    p.add_argument("--ort-placement", action="store_true",
                   help="Also export with --placement onnxruntime (convolution outputs quantized) and time it.")
    p.add_argument("--calib-seconds", type=float, default=10.24)
    return p.parse_args(argv)


def load(size: str):
    if size == "embedded":
        from adm_export.models import load_model

        return load_model("tiny-audioldm")
    return sc.make_adapter(sc.build_pipeline("audioldm-s"), sc.MODEL_ID)


def prepare(size: str, adapter, args) -> dict:
    """FP32 export and the project's INT8 Q/DQ export (and ONNX Runtime's own QDQ with --ort-native)."""
    from adm_export.config import FullPrecisionExportConfig
    from adm_export.export.fp16 import export_full_precision

    work = args.workdir / size
    info = {}
    fp32 = work / "fp32" / "unet.onnx"
    if not (args.reuse and fp32.is_file()):
        t0 = time.perf_counter()
        export_full_precision(FullPrecisionExportConfig(fp16=False, audio_seconds=2.56, parity=False), fp32.parent,
                              adapter=adapter, force=True)
        info["fp32_export_s"] = round(time.perf_counter() - t0, 1)
    int8 = work / "int8" / "onnx" / "unet.onnx"
    if not (args.reuse and int8.is_file()):
        info["int8"] = sc.prepare_int8(adapter, adapter, work / "int8", args.calib_seconds)
    int8_ort = work / "int8_ort" / "onnx" / "unet.onnx"
    if args.ort_placement and not (args.reuse and int8_ort.is_file()):
        info["int8_ort"] = sc.prepare_int8(adapter, adapter, work / "int8_ort", args.calib_seconds,
                                           placement="onnxruntime", calibration=work / "int8" / "calibration")
    native = work / "ort_native" / "unet.onnx"
    if args.ort_native and not (args.reuse and native.is_file()):
        t0 = time.perf_counter()
        ort_native_qdq(fp32, native, work / "int8" / "calibration", adapter)
        info["ort_native_s"] = round(time.perf_counter() - t0, 1)
    # Keep what earlier runs recorded about exports reused now (--reuse).
    record = work / "prepare.json"
    if record.is_file():
        info = {**json.loads(record.read_text()), **info}
    sc.write_json(record, info)
    info["paths"] = {"fp32": str(fp32), "int8": str(int8), "int8_ort": str(int8_ort), "ort_native": str(native)}
    return info


def ort_native_qdq(fp32: Path, out: Path, calibration: Path, adapter) -> None:
    """ONNX Runtime's ``quantize_static`` on the FP32 export, calibrated on the project's cache."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from adm_export.calibration.cache import load_cache

    cache = load_cache(calibration, adapter.identity())

    class Reader(CalibrationDataReader):
        def __init__(self):
            # One point (2 rows): ONNX Runtime's calibrator keeps every intermediate tensor of every sample.
            self.it = iter([{k: v.numpy() for k, v in p.items()} for p in cache.points(limit=1)])

        def get_next(self):
            return next(self.it, None)

    out.parent.mkdir(parents=True, exist_ok=True)
    pre = out.with_name("pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        src = pre
    except Exception as exc:  # the pre-processing is an optimisation only
        log.warning("quant_pre_process failed (%s); quantizing the export as is", exc)
        src = fp32
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], extra_options={"ActivationSymmetric": False})


def measure(size: str, adapter, info: dict, args, results: dict) -> None:
    import torch

    from adm_export.engines.onnxruntime import OrtEngine, OrtOptions
    from adm_export.engines.stage import ort_layer_precisions
    from adm_export.numerics import rel_l2

    spec = adapter.denoiser_spec()
    frames = spec.frames_for_seconds(args.seconds)
    x = spec.dummy_inputs(args.batch, frames, seed=1)
    torch.set_num_threads(args.threads)
    module = adapter.export_module(adapter.denoiser).eval()
    rows = results["rows"]
    with torch.inference_mode():
        ref = module(*x.values())
    params = adapter.denoiser_parameter_count()

    # Every path is built first, then timed round-robin (one call of each path per round), so
    # that the other users of this shared CPU slow every path alike and the ratios stay fair.
    paths: dict = {"torch FP32": (lambda: module(*x.values()), ref, {})}
    engines = []
    for key, label in (("fp32", "ONNX Runtime FP32"), ("int8", "ONNX Runtime INT8 Q/DQ (project export)"),
                       ("int8_ort", "ONNX Runtime INT8 Q/DQ (project export, --placement onnxruntime)"),
                       ("ort_native", "ONNX Runtime INT8 QDQ (ORT quantize_static)")):
        path = Path(info["paths"][key])
        if not path.is_file():
            continue
        engine = OrtEngine(path, spec, OrtOptions(provider="cpu", threads=args.threads))
        engines.append(engine)
        extra = {"kernels": ort_layer_precisions(path, "cpu", args.threads)["layer_precisions"],
                 "file_mb": round(sum(p.stat().st_size for p in path.parent.glob("unet.onnx*")) / 1e6, 1)}
        paths[label] = ((lambda e=engine: e(x)), engine(x), extra)
    load_before = sc.cpu_load()["loadavg_1_5_15"]
    times = {label: [] for label in paths}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for fn, _, _ in paths.values():
                fn()
        for i in range(args.iters):
            for label, (fn, _, _) in paths.items():
                t0 = time.perf_counter()
                fn()
                times[label].append((time.perf_counter() - t0) * 1000)
            log.info("%s round %d/%d: %s", size, i + 1, args.iters,
                     {k: round(v[-1], 1) for k, v in times.items()})
    load_after = sc.cpu_load()
    fp32_ms = None
    for label, (_, out, extra) in paths.items():
        timing = sc._summary(times[label])
        r = {"size": size, "params_m": round(params / 1e6, 1), "path": label, "batch": args.batch, "frames": frames,
             "threads": args.threads, **timing, **extra, "rel_l2_vs_torch_fp32": round(rel_l2(out.float(), ref), 5),
             "load_before": load_before, "load_after": load_after["loadavg_1_5_15"],
             "busiest_processes_after": load_after["top_processes"]}
        if label == "ONNX Runtime FP32":
            fp32_ms = timing["median_ms"]
        rows.append(r)
    for r in rows:
        if r["size"] == size and fp32_ms:
            r["speedup_vs_ort_fp32"] = round(fp32_ms / r["median_ms"], 2)
        if r["size"] == size:
            log.info("%-10s %-44s %8.1f ms (min %.1f)  x%.2f vs ORT FP32", size, r["path"], r["median_ms"],
                     r["min_ms"], r.get("speedup_vs_ort_fp32") or 0)
    sc.write_json(args.out / "speed_cpu.json", results)
    del engines
    gc.collect()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for name in ("diffusers", "transformers", "modelopt", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    results = {"environment": sc.environment("cpu"), "settings": {k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in vars(args).items()},
               "load_at_start": sc.cpu_load(), "prepare": {}, "rows": []}
    for size in args.sizes:
        adapter = load(size)
        results["prepare"][size] = prepare(size, adapter, args)
        sc.write_json(args.out / "speed_cpu.json", results)
        if not args.prepare_only:
            measure(size, adapter, results["prepare"][size], args, results)
        del adapter
        gc.collect()
    results["load_at_end"] = sc.cpu_load()
    sc.write_json(args.out / "speed_cpu.json", results)
    cols = [("size", "model"), ("params_m", "params (M)"), ("path", "path"), ("median_ms", "median ms"),
            ("min_ms", "min ms"), ("speedup_vs_ort_fp32", "x ORT FP32"), ("rel_l2_vs_torch_fp32", "rel. L2 vs torch"),
            ("kernels", "compute ops"), ("file_mb", "file MB"), ("load_after", "load avg after")]
    print(sc.format_table(results["rows"], cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
