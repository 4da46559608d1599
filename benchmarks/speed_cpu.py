#!/usr/bin/env python3
"""CPU speed: ONNX Runtime FP32 vs the INT8 engine per Q/DQ placement vs torch FP32, per U-Net step.

One step is one denoiser call at batch 2 (one clip with classifier-free guidance) on the 10.24 s
latent (8x256x16). Sizes: ``reference`` (``reference-audioldm``, the embedded default model,
trained weights), ``embedded`` (``tiny-audioldm``, same structure, random weights) and
``audioldm-s`` (the 185 M U-Net, random weights). Rows per size:

* torch FP32 (eager, ``torch.set_num_threads(threads)``),
* ONNX Runtime CPU FP32 (the unquantized export, ``adm_export.export.fp16`` with ``fp16=False``),
* ONNX Runtime CPU INT8, one row per ``--placements`` entry: the project's calibrate -> quantize
  (ModelOpt INT8) -> export on one calibration cache; ``default`` is what ``adm-export build``
  does on a CPU (the placement ``--target onnxruntime-cpu`` chooses), ``tensorrt`` the TensorRT
  placement (Q/DQ on inputs and weights), ``onnxruntime`` the integer-kernel one spelled out;
  ``LABEL=POLICY.json`` exports with a ``--policy`` file on the default placement,
* with ``--engine-reference``: the engine stage's FP32 reference of the default export (its
  quantization undone, ``adm_export.engines.speedup``): what the build's speed-up is measured against,
* with ``--ort-native``: ONNX Runtime's own ``quantize_static`` (QDQ, per-channel INT8 weights,
  UINT8 activations, outputs quantized too) on the FP32 export, as a reference.

Every row of a size is timed round-robin (one call of each per round) so that the other users of
this shared CPU slow them alike; each row reports the median of its calls, the ratio of the
medians to ONNX Runtime FP32 and, more robust under load, the median over rounds of the paired
ratio (FP32's call / the row's call of the same round). CPU contention is recorded with every
row (load averages and the busiest processes).

    python benchmarks/speed_cpu.py --out benchmarks/results --workdir /tmp/adm-cpu-bench
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_common as sc  # noqa: E402

log = logging.getLogger("speed_cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["reference", "audioldm-s"],
                   choices=["reference", "embedded", "audioldm-s"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/adm-cpu-bench"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--seconds", type=float, default=10.24)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                   help="Intra-op thread counts; every count times every row of a size in its own round-robin.")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reuse", action="store_true", help="Reuse exports already in --workdir.")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--ort-native", action="store_true", help="Also time ONNX Runtime's own quantize_static QDQ.")
    p.add_argument("--placements", nargs="+", default=["default", "tensorrt"],
                   help="INT8 exports to time: default (the CPU build's), tensorrt, onnxruntime, or LABEL=POLICY.json.")
    p.add_argument("--engine-reference", action="store_true",
                   help="Also time the engine stage's FP32 reference of the default export.")
    p.add_argument("--calib-seconds", type=float, default=10.24)
    return p.parse_args(argv)


def load(size: str):
    if size in ("embedded", "reference"):
        from adm_export.models import load_model

        return load_model("tiny-audioldm" if size == "embedded" else "reference-audioldm")
    return sc.make_adapter(sc.build_pipeline("audioldm-s"), sc.MODEL_ID)


def variant(entry: str) -> tuple[str, str | None, str | None]:
    """``--placements`` entry -> (label, placement or None for the target's, policy file or None)."""
    if "=" in entry:
        label, policy = entry.split("=", 1)
        return label, None, policy
    return entry, None if entry == "default" else entry, None


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
        # The strongest FP32 baseline gets the graph cleanup the CPU placement gets: an export with
        # diffusers' classic attention carries an all-zero attention bias (none with SDPA: no-op).
        import onnx

        from adm_export.export.onnx import save_onnx
        from adm_export.export.onnx_graph import fold_zero_attention_bias

        model = onnx.load(str(fp32))
        info["fp32_zero_attention_bias_folded"] = fold_zero_attention_bias(model)
        if info["fp32_zero_attention_bias_folded"]:
            save_onnx(model, fp32)
        info["fp32_export_s"] = round(time.perf_counter() - t0, 1)
    calibration = work / "calibration"
    paths = {"fp32": str(fp32)}
    for entry in args.placements:
        label, placement, policy = variant(entry)
        onnx_path = work / f"int8_{label}" / "onnx" / "unet.onnx"
        paths[label] = str(onnx_path)
        if args.reuse and onnx_path.is_file():
            continue
        info[label] = sc.prepare_int8(adapter, adapter, work / f"int8_{label}", args.calib_seconds,
                                      placement=placement, policy=policy,
                                      calibration=calibration if calibration.is_dir() else None,
                                      calibration_out=calibration)
    reference = work / "engine_reference" / "unet.onnx"
    if args.engine_reference and "default" in paths and not (args.reuse and reference.is_file()):
        import onnx

        from adm_export.engines.speedup import fp32_reference_graph
        from adm_export.export.onnx import save_onnx

        model = onnx.load(paths["default"])
        info["engine_reference"] = fp32_reference_graph(model)
        reference.parent.mkdir(parents=True, exist_ok=True)
        save_onnx(model, reference)
    if args.engine_reference:
        paths["engine_reference"] = str(reference)
    native = work / "ort_native" / "unet.onnx"
    if args.ort_native and not (args.reuse and native.is_file()):
        t0 = time.perf_counter()
        ort_native_qdq(fp32, native, calibration, adapter)
        info["ort_native_s"] = round(time.perf_counter() - t0, 1)
    # Keep what earlier runs recorded about exports reused now (--reuse).
    record = work / "prepare.json"
    if record.is_file():
        info = {**json.loads(record.read_text()), **info}
    sc.write_json(record, info)
    info["paths"] = {**paths, "ort_native": str(native)}
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


def measure(size: str, adapter, info: dict, args, results: dict, threads: int) -> None:
    import torch

    from adm_export.engines.onnxruntime import OrtEngine, OrtOptions
    from adm_export.engines.stage import ort_layer_precisions
    from adm_export.numerics import rel_l2

    spec = adapter.denoiser_spec()
    frames = spec.frames_for_seconds(args.seconds)
    x = spec.dummy_inputs(args.batch, frames, seed=1)
    torch.set_num_threads(threads)
    module = adapter.export_module(adapter.denoiser).eval()
    rows = results["rows"]
    with torch.inference_mode():
        ref = module(*x.values())
    params = adapter.denoiser_parameter_count()

    # Every path is built first, then timed round-robin (one call of each path per round), so
    # that the other users of this shared CPU slow every path alike and the ratios stay fair.
    paths: dict = {"torch FP32": (lambda: module(*x.values()), ref, {})}
    engines = []
    labels = {"fp32": "ONNX Runtime FP32", "engine_reference": "ONNX Runtime FP32, engine stage's reference",
              "default": "ONNX Runtime INT8, default CPU build (placement onnxruntime)",
              "tensorrt": "ONNX Runtime INT8, --placement tensorrt", "onnxruntime": "ONNX Runtime INT8, --placement onnxruntime",
              "ort_native": "ONNX Runtime INT8 QDQ (ORT quantize_static)"}
    for key, path in info["paths"].items():
        label = labels.get(key, f"ONNX Runtime INT8, {key} (--policy)")
        path = Path(path)
        if not path.is_file():
            continue
        engine = OrtEngine(path, spec, OrtOptions(provider="cpu", threads=threads))
        engines.append(engine)
        extra = {"kernels": ort_layer_precisions(path, "cpu", threads)["layer_precisions"],
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
            log.info("%s, %d threads, round %d/%d: %s", size, threads, i + 1, args.iters,
                     {k: round(v[-1], 1) for k, v in times.items()})
    load_after = sc.cpu_load()
    fp32 = "ONNX Runtime FP32"
    fp32_ms = sc._summary(times[fp32])["median_ms"] if fp32 in times else None
    for label, (_, out, extra) in paths.items():
        timing = sc._summary(times[label])
        r = {"size": size, "params_m": round(params / 1e6, 1), "path": label, "batch": args.batch, "frames": frames,
             "threads": threads, **timing, **extra, "rel_l2_vs_torch_fp32": round(rel_l2(out.float(), ref), 5),
             "load_before": load_before, "load_after": load_after["loadavg_1_5_15"],
             "busiest_processes_after": load_after["top_processes"]}
        if fp32_ms:
            r["speedup_vs_ort_fp32"] = round(fp32_ms / timing["median_ms"], 2)
            # Same-round pairs: a burst of load on the shared CPU slows both calls of a round.
            paired = [f / t for f, t in zip(times[fp32], times[label])]
            r["speedup_paired_median"] = round(statistics.median(paired), 2)
            r["speedup_paired_min_max"] = [round(min(paired), 2), round(max(paired), 2)]
        rows.append(r)
        log.info("%-10s %d thr %-60s %8.1f ms (min %.1f)  x%.2f vs ORT FP32 (paired x%.2f)", size, threads, label,
                 r["median_ms"], r["min_ms"], r.get("speedup_vs_ort_fp32") or 0, r.get("speedup_paired_median") or 0)
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
            for threads in args.threads:
                measure(size, adapter, results["prepare"][size], args, results, threads)
        del adapter
        gc.collect()
    results["load_at_end"] = sc.cpu_load()
    sc.write_json(args.out / "speed_cpu.json", results)
    cols = [("size", "model"), ("params_m", "params (M)"), ("path", "path"), ("threads", "threads"),
            ("median_ms", "median ms"), ("min_ms", "min ms"), ("speedup_vs_ort_fp32", "x ORT FP32 (medians)"),
            ("speedup_paired_median", "x ORT FP32 (paired)"), ("rel_l2_vs_torch_fp32", "rel. L2 vs torch"),
            ("kernels", "compute ops"), ("file_mb", "file MB"), ("load_after", "load avg after")]
    print(sc.format_table(results["rows"], cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
