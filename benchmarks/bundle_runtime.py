#!/usr/bin/env python
"""The torch-free bundle runtime against the diffusers pipeline, per family (CPU).

For each model: an FP32 ONNX Runtime engine (export-baseline + engine stages), `adm-export bundle`,
then on the same initial noise (and DDPM step noise):
  * equivalence: relative L2 of the runtime's final latents and waveform vs the pipeline's;
  * speed per clip: the diffusers pipeline with its torch U-Net, the same pipeline with the ONNX
    Runtime U-Net (what `adm-export generate --engine` runs), the bundle runtime (batch 1, and
    batch 4 per clip); start-up: loading the model vs loading the bundle.

Usage:  python benchmarks/bundle_runtime.py [--models tiny-audioldm,...] [--seconds 2.56] [--steps 10]
Prints a table and writes benchmarks/results/bundle_runtime.{json,md} (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = "tiny-audioldm,reference-audioldm,tiny-audioldm2,tiny-tango,tiny-make-an-audio"


def timed(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model_id: str, args, tmp: Path) -> dict:
    import torch

    from adm_export import bundle
    from adm_export.config import BundleConfig
    from adm_export.engines.stage import load_ort_denoiser
    from adm_export.models import load_model
    from adm_export.runtime import BundleRuntime, GenerationRequest, RuntimeOptions
    from tests.bundle_helpers import fp32_engines, pipeline_reference, rel_l2

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    adapter = load_model(model_id)
    load_model_s = time.perf_counter() - start
    fp32_engines(adapter, tmp / model_id / "build")
    result = bundle(BundleConfig(build_dir=str(tmp / model_id / "build"), out=str(tmp / model_id / "bundle")),
                    adapter=adapter)
    start = time.perf_counter()
    rt = BundleRuntime(result.out, RuntimeOptions(threads=args.threads))
    load_bundle_s = time.perf_counter() - start
    prompts = ["a dog barks while rain falls", "a loud siren, rising in pitch", "birds chirp at dawn", "a bell rings"]
    reqs = [GenerationRequest(p, args.seconds, args.steps, 3.0, i) for i, p in enumerate(prompts)]
    got = rt.sample(reqs[:2], [rt.initial_noise(r)[0] for r in reqs[:2]], [rt.initial_noise(r)[1] for r in reqs[:2]])
    ref = pipeline_reference(adapter, rt, reqs[:2])
    lat_err = max(rel_l2(g, r[0]) for g, r in zip(got.latents, ref))
    wav_err = max(rel_l2(g, r[1]) for g, r in zip(got.waveforms, ref))
    denoiser, _ = load_ort_denoiser(result.out.parent / "build" / "engines", adapter, threads=args.threads)
    pipe_torch = timed(lambda: pipeline_reference(adapter, rt, reqs[:1]), args.runs)
    pipe_ort = timed(lambda: pipeline_reference(adapter, rt, reqs[:1], denoiser), args.runs)
    rt1 = timed(lambda: rt.generate(reqs[:1]), args.runs)
    rt4 = timed(lambda: rt.generate(reqs), args.runs) / 4
    return {
        "model": model_id, "family": adapter.family, "bundle_mb": round(sum(result.files.values()) / 1e6, 2),
        "latent_rel_l2": lat_err, "waveform_rel_l2": wav_err,
        "load_model_s": round(load_model_s, 2), "load_bundle_s": round(load_bundle_s, 2),
        "pipeline_torch_s": round(pipe_torch, 3), "pipeline_ort_unet_s": round(pipe_ort, 3),
        "runtime_b1_s": round(rt1, 3), "runtime_b4_per_clip_s": round(rt4, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--seconds", type=float, default=2.56)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bundle_runtime"))
    args = ap.parse_args()
    os.environ.setdefault("ADM_EXPORT_NO_PROGRESS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_id in args.models.split(","):
            rows.append(measure(model_id, args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    head = ("| model | bundle MB | latents rel. L2 | waveform rel. L2 | load model / bundle s | pipeline torch s | "
            "pipeline + ORT U-Net s | runtime s (batch 1) | runtime s/clip (batch 4) |")
    lines = [f"CPU, {args.threads} thread(s), {args.seconds} s clips, {args.steps} steps, guidance 3, FP32 engines; "
             f"load average {os.getloadavg()[0]:.1f}", "", head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bundle_mb']} | {r['latent_rel_l2']:.1e} | {r['waveform_rel_l2']:.1e} | "
                     f"{r['load_model_s']} / {r['load_bundle_s']} | {r['pipeline_torch_s']} | "
                     f"{r['pipeline_ort_unet_s']} | {r['runtime_b1_s']} | {r['runtime_b4_per_clip_s']} |")
    print("\n".join(lines))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
