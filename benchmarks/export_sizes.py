"""Full-size export check: an AudioLDM-S-sized U-Net (random weights) exported on CPU per preset.

Builds the U-Net from ``audioldm_s_unet_config()`` (widths 128/256/384/640, 2 layers per block,
head dim 32: ~185 M parameters) with seeded random weights inside the embedded pipeline (for the
adapter's spec), quantizes it with each preset on synthetic calibration points (random latents,
timesteps and L2-normalised 512-d class embeddings: there are no pretrained weights here, so the
numbers measure storage and quantization noise, not audio quality), exports the compact ONNX file
and prints a size table; ``--json`` writes the results.

Targets (issue 4): ``int8`` at most 27% of the FP32 bytes; ``mixed`` at a 20% budget within budget
and with lower measured error than ``w4a8``.

    python benchmarks/export_sizes.py --json benchmarks/results/export_sizes.json \
        --markdown benchmarks/results/export_sizes.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import tempfile
import time
import warnings
from pathlib import Path

from speed_common import make_points  # benchmarks/ is on sys.path when run as a script


class ListCache:
    """The slice of ``CalibrationCache`` the quantize helpers use, over in-memory points."""

    def __init__(self, points):
        self._points = points

    def __len__(self):
        return len(self._points)

    def point(self, i):
        return self._points[i]

    def points(self, limit=None):
        yield from self._points[:limit]


def make_adapter(seed: int):
    """The embedded pipeline with its U-Net replaced by an AudioLDM-S-sized one (random weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    from adm_export.models.audioldm import AudioLDMAdapter
    from adm_export.models.embedded import audioldm_s_unet_config, build_tiny_audioldm

    pipe = build_tiny_audioldm(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**audioldm_s_unet_config()).eval()
    object.__setattr__(pipe, "unet", unet)
    return AudioLDMAdapter("audioldm-s-sized-random", pipe)


def synthetic_trajectory(adapter, frames: int, seed: int, steps: int = 4):
    """``final_latents(model)`` for the mixed search's trajectory check on this stand-in pipeline.

    The embedded pipeline's text encoder does not fit the full-size U-Net's class embedding, so
    the check runs the scheduler directly: ``steps`` DDIM steps from seeded noise with a fixed
    L2-normalised class embedding (no guidance), returning the final latents.
    """
    import torch

    from adm_export.numerics import run_denoiser

    sched_cls = type(adapter.pipeline.scheduler)
    base = make_points(adapter, 1, frames, seed)[0]

    def final_latents(model):
        sched = sched_cls.from_config(adapter.pipeline.scheduler.config)
        sched.set_timesteps(steps)
        x = base["sample"].clone() * sched.init_noise_sigma
        for t in sched.timesteps:
            inputs = dict(base, sample=sched.scale_model_input(x, t), timestep=torch.full((x.shape[0],), float(t)))
            eps = run_denoiser(adapter, model if model is not None else adapter.denoiser, inputs)
            x = sched.step(eps, t, x).prev_sample
        return [x]

    return final_latents


def run_preset(name, adapter, cache, eval_points, refs, budget, sens_points, workdir, parity, granularity="layer",
               trajectory_check=2):
    from adm_export.config import QuantizeConfig
    from adm_export.export.onnx import build_onnx, export_opset, save_onnx, weight_codecs
    from adm_export.formats import policy as pol
    from adm_export.numerics import rel_l2, run_denoiser
    from adm_export.quantize.modelopt import plan_layers, quantize_with_plans
    from adm_export.quantize.search import search_mixed

    t0 = time.perf_counter()
    cfg = QuantizeConfig(precision=name, size_budget=budget if name == "mixed" else None,
                         target="onnxruntime-cpu", sensitivity_points=sens_points,
                         sensitivity_granularity=granularity, trajectory_check=trajectory_check)
    plans, policy, capability = plan_layers(cfg, adapter)
    search = None
    if policy.searched:
        # mtq.auto_quantize's gradient scoring of a 185 M U-Net is too slow for this shared CPU:
        # the side-by-side comparison is made on the embedded model (quantize stage report).
        frames = cache.point(0)["sample"].shape[2]
        plans, search = search_mixed(cfg, adapter, cache, plans, policy,
                                     lambda pts: [run_denoiser(adapter, adapter.denoiser, p) for p in pts],
                                     compare_auto_quantize=False,
                                     final_latents=synthetic_trajectory(adapter, frames, seed=7))
    model = quantize_with_plans(adapter, list(cache.points()), plans, "tensorrt")
    errs = [rel_l2(run_denoiser(adapter, model, p), r) for p, r in zip(eval_points, refs)]
    t_quant = time.perf_counter() - t0
    codecs = weight_codecs(model, plans)
    opset = export_opset(17, plans, codecs)
    graph, fold, raw_bytes = build_onnx(adapter, model, plans, codecs, opset, eval_points[0], workdir)
    path = Path(workdir) / f"unet_{name}.onnx"
    size = save_onnx(graph, path)
    del graph, codecs
    row = {
        "preset": name, "export_bytes": size, "raw_export_bytes": raw_bytes, "opset": opset,
        "measured_rel_l2": math.sqrt(sum(e * e for e in errs) / len(errs)), "per_point_rel_l2": errs,
        "formats": {k: {"layers": v["layers"], "params": v["params"]} for k, v in pol.summary(plans).items()},
        "predicted_weight_bytes": 4 * (adapter.denoiser_parameter_count() - sum(p.params for p in plans))
        + sum(p.weight_bytes() for p in plans),
        "encoded": fold["by_format"], "float_copies_of_quantized_weights": fold["float_copies_of_quantized_weights"],
        "capability_changes": len(capability["changes"]), "quantize_seconds": round(t_quant, 1),
        "export_seconds": round(time.perf_counter() - t0 - t_quant, 1),
    }
    if search is not None:
        sol = search["solution"]
        row["search"] = {k: sol[k] for k in ("predicted_rel_l2", "total_sensitivity", "predicted_fraction",
                                             "budget_fraction", "eval_points", "candidates", "granularity", "items",
                                             "trajectory_check")}
        row["search"]["top_sensitive"] = search["ranking"][:10]
        row["search"]["trajectory_checked"] = [r for r in search["ranking"] if r.get("trajectory_rel_l2")]
    if parity:
        from adm_export.export.onnx import check_parity, parity_session

        p = check_parity(adapter, model, parity_session(path), eval_points[:1])
        row["parity"] = {k: p[k] for k in ("onnx_vs_torch_mean", "rounding_floor_mean", "quant_error_mean", "passed")}
    path.unlink()
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    return row


def markdown(result: dict) -> str:
    fp32 = result["fp32_bytes"]
    lines = [
        f"AudioLDM-S-sized U-Net, random weights: {result['params'] / 1e6:.2f} M parameters, FP32 "
        f"{fp32 / 1e6:.1f} MB. Exported on CPU ({result['machine']}); error = RMS relative L2 of one U-Net call vs "
        f"full precision on {result['eval_points']} synthetic point(s) (batch 2, {result['frames']} latent frames).",
        "",
        "| preset | file | vs FP32 | measured error | formats (layers) |",
        "|---|---:|---:|---:|---|",
        f"| fp32 (reference) | {fp32 / 1e6:.1f} MB | 100% | – | – |",
        f"| fp16 (reference) | {fp32 / 2e6:.1f} MB | 50% | – | – |",
    ]
    for r in result["rows"]:
        fm = ", ".join(f"{k} {v['layers']}" for k, v in sorted(r["formats"].items()))
        extra = ""
        if "search" in r:
            extra = (f" (budget {100 * r['search']['budget_fraction']:.0f}%, {r['search'].get('granularity', 'layer')}s, "
                     f"predicted {r['search']['predicted_rel_l2']:.4f})")
        lines.append(f"| {r['preset']}{extra} | {r['export_bytes'] / 1e6:.1f} MB | "
                     f"{100 * r['export_bytes'] / fp32:.1f}% | {r['measured_rel_l2']:.4f} | {fm} |")
    for r in result["rows"]:
        top = r.get("search", {}).get("trajectory_checked", [])
        if top:
            lines += ["", f"{r['preset']}: items re-measured by the trajectory check (final-latent rel. L2 of a "
                      "4-step DDIM run from seeded noise with only that item quantized, vs its one-call error):", "",
                      "| item | layers | format | one call (rel. L2) | trajectory (rel. L2) | chosen |",
                      "|---|---:|---|---:|---:|---|"]
            for t in top:
                for fmt, v in sorted(t["trajectory_rel_l2"].items()):
                    lines.append(f"| `{t['layer']}` | {t.get('layers', 1)} | {fmt} | "
                                 f"{math.sqrt(t['sensitivity'][fmt]):.4f} | {v:.4f} | {t['chosen']} |")
    lines += ["", "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in result["targets"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="int8,fp8,w4a8,mixed",
                    help="comma-separated; mixed:layer / mixed:block pick the search granularity of that row")
    ap.add_argument("--size-budget", type=float, default=0.2)
    ap.add_argument("--calib-points", type=int, default=4)
    ap.add_argument("--eval-points", type=int, default=2)
    ap.add_argument("--sensitivity-points", type=int, default=1)
    ap.add_argument("--granularity", choices=["layer", "block"], default="block",
                    help="sensitivity granularity of the mixed search (block: ~5x fewer trials)")
    ap.add_argument("--trajectory-check", type=int, default=2)
    ap.add_argument("--frames", type=int, default=32, help="latent frames per point (256 = 10.24 s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parity", action="store_true", help="also check ONNX Runtime parity on one point")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--update", action="store_true",
                    help="replace only the rows of --presets in an existing --json file (others kept)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("modelopt", "torch", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from adm_export.numerics import run_denoiser

    adapter = make_adapter(args.seed)
    params = adapter.denoiser_parameter_count()
    print(f"U-Net parameters: {params / 1e6:.2f} M (AudioLDM-S: 185 M)", flush=True)
    calib = make_points(adapter, args.calib_points, args.frames, args.seed)
    eval_points = make_points(adapter, args.eval_points, args.frames, args.seed + 1000)
    refs = [run_denoiser(adapter, adapter.denoiser, p) for p in eval_points]
    cache = ListCache(calib)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            # "mixed:layer" / "mixed:block" override --granularity for that row.
            preset, _, granularity = name.partition(":")
            row = run_preset(preset, adapter, cache, eval_points, refs, args.size_budget, args.sensitivity_points,
                             tmp, args.parity, granularity or args.granularity, args.trajectory_check)
            row["preset"] = name
            rows.append(row)
            print(f"{name}: {row['export_bytes'] / 1e6:.1f} MB = {100 * row['export_bytes'] / (4 * params):.1f}% of "
                  f"FP32, error {row['measured_rel_l2']:.4f} ({row['quantize_seconds']} s quantize, "
                  f"{row['export_seconds']} s export)", flush=True)
    if args.update and args.json and args.json.exists():
        old_rows = json.loads(args.json.read_text())["rows"]
        mine = {r["preset"] for r in rows}
        order = [r["preset"] for r in old_rows] + [r["preset"] for r in rows if r["preset"] not in
                                                    {o["preset"] for o in old_rows}]
        merged = {r["preset"]: r for r in old_rows if r["preset"] not in mine} | {r["preset"]: r for r in rows}
        rows = [merged[p] for p in order]
    by = {r["preset"]: r for r in rows}
    targets = {}
    if "int8" in by:
        targets["int8 <= 27% of FP32"] = by["int8"]["export_bytes"] <= 0.27 * 4 * params
    for name in [n for n in by if n.startswith("mixed")]:
        targets[f"{name} <= {args.size_budget:.0%} of FP32"] = by[name]["export_bytes"] <= args.size_budget * 4 * params
        if "w4a8" in by:
            targets[f"{name} error < w4a8 error"] = by[name]["measured_rel_l2"] < by["w4a8"]["measured_rel_l2"]
    result = {"params": params, "fp32_bytes": 4 * params, "frames": args.frames, "eval_points": args.eval_points,
              "calib_points": args.calib_points, "machine": f"{platform.processor() or platform.machine()}, "
              f"{__import__('os').cpu_count()} CPU cores (shared)", "rows": rows, "targets": targets,
              "args": {k: str(v) for k, v in vars(args).items()}}
    text = markdown(result)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return result


if __name__ == "__main__":
    main()
