"""Ablation of the calibration set: selection method x prompt set, same budget K, same preset.

For each prompt set (``seed``: the built-in seed captions only, ``augment=False``; ``augmented``:
coverage-driven augmentation, ``augment=True``; both N prompts, as ``adm-export calibrate``
builds them) the sampler runs once on every prompt, recording the activation statistics of the
quantized layers (``calibration.stats``) and every denoiser input (benchmark only, to reuse one
run for all methods; the calibrate stage keeps only the selected ones). Each selection method then
picks K points of that pool, exactly as ``calibrate`` would (``latents.select_indices`` and
``selection.select_activation`` on the same statistics), the U-Net is quantized with ModelOpt
(``quantize.modelopt.quantize_denoiser``, preset int8), and the quantized U-Net is compared with
full precision on **held-out** trajectories (prompts in neither calibration set, other seeds):

* per-step relative L2 of the noise prediction on the full-precision trajectory's inputs
  (teacher-forced: the quantized U-Net sees the same x_t as the reference);
* final-latent SNR in dB when the sampler runs free with the quantized U-Net from the same noise;
* FD (weight-free log-mel embedder, ``adm_export.eval``) and the paired drift between the decoded
  clips of the quantized and full-precision runs (few clips: compare rows, not absolute values);
* the selection's estimated input error (``selection`` error model) on the calibration pool and
  on the held-out trajectories' own statistics, and how much of each layer's range it reaches.

Context rows: ``weights only`` (the ``all`` model with activation quantizers disabled: the part
of the error no calibration set changes) and the ``rounding floor`` (the same fake-quant model in
float64 vs float32, see README "Parity").

Run (CPU, embedded model)::

    python benchmarks/calibration_ablation.py --out benchmarks/results/calibration_ablation_cpu

``--model audioldm-s`` swaps in an AudioLDM-S-sized U-Net (random weights, 512-d CLAP
projection) on the tiny pipeline's text encoder, VAE and vocoder (for the GPU run).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- model ----------------------------------------------------------------------------------------
def load_adapter(model: str, device: str):
    """``tiny`` (embedded tiny-audioldm), ``reference`` (the trained reference-audioldm) or
    ``audioldm-s`` (AudioLDM-S-sized U-Net, random weights)."""
    from adm_export.models import load_model

    if model in ("tiny", "reference"):
        return load_model({"tiny": "tiny-audioldm", "reference": "reference-audioldm"}[model], device)
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    from adm_export.models.audioldm import AudioLDMAdapter
    from adm_export.models.embedded import audioldm_s_unet_config, build_tiny_audioldm

    pipe = build_tiny_audioldm()
    tok = pipe.tokenizer
    torch.manual_seed(10)
    unet = UNet2DConditionModel(**audioldm_s_unet_config()).eval()
    torch.manual_seed(12)
    # A small CLAP text tower with AudioLDM-S's 512-d projection: the U-Net sees 512-d class labels.
    text = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
        projection_dim=512, max_position_embeddings=tok.model_max_length + 3, pad_token_id=1, bos_token_id=0,
        eos_token_id=2)).eval()
    pipe.register_modules(unet=unet, text_encoder=text)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return AudioLDMAdapter("audioldm-s-random", pipe)


# -- sampling -------------------------------------------------------------------------------------
def trajectory(adapter, prompts: list[str], seeds: list[int], steps: int, seconds: float, gs: float, record=None):
    """One batched sampler run, initial noise per prompt as ``adapter.generate`` draws it.

    Returns:
        (denoiser inputs of every step, final latents ``(B, ...)``, audios). With guidance each
        call's rows are ``[unconditional x B, conditional x B]``, as the pipeline batches them.
    """
    import torch

    calls: list[dict] = []
    final: dict = {}

    def on_call(inputs):
        calls.append({k: v.detach().clone() for k, v in inputs.items()})
        if record is not None:
            record(len(calls) - 1)

    def on_step(i, t, latents):
        final["z"] = latents.detach().float().cpu().clone()

    device = adapter.pipeline.device
    lat = torch.stack([torch.randn(adapter._latent_shape(seconds), generator=torch.Generator().manual_seed(int(s)))
                       for s in seeds]).to(device)
    with adapter.record_denoiser_calls(on_call), torch.inference_mode():
        out = adapter.pipeline(prompt=list(prompts), num_inference_steps=steps, audio_length_in_s=seconds,
                               guidance_scale=gs, latents=lat, output_type="np", callback=on_step, callback_steps=1)
    return calls, final["z"], [a.astype("float32") for a in out.audios]


def batched_outputs(adapter, module, calls: list[dict], chunk: int = 5):
    """The denoiser's outputs on the recorded calls, ``chunk`` calls per batch (rows concatenated)."""
    import torch

    from adm_export.numerics import run_denoiser

    outs = []
    for i in range(0, len(calls), chunk):
        part = calls[i:i + chunk]
        batch = {n: torch.cat([c[n] for c in part]) for n in part[0]}
        outs.append(run_denoiser(adapter, module, batch).float().cpu())
    return torch.cat(outs)


def rel_l2_calls(a, b, calls: int) -> list[float]:
    """Relative L2 per denoiser call (all its rows together)."""
    a = a.double().reshape(calls, -1)
    b = b.double().reshape(calls, -1)
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).tolist()


def snr_db(z, ref) -> list[float]:
    """Final-latent SNR in dB per clip."""
    z, ref = z.double().flatten(1), ref.double().flatten(1)
    return (10 * (ref.pow(2).sum(1) / (z - ref).pow(2).sum(1).clamp_min(1e-300)).log10()).tolist()


# -- the ablation ---------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "reference", "audioldm-s"], default="tiny")
    ap.add_argument("--captions", default=None,
                    help="seed captions file (default: the built-in captions; the reference model's in-domain "
                         "captions: adm_export/data/reference/captions.txt)")
    ap.add_argument("--embedder", default="logmel", help="FD embedder (reference-clap for the reference model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=1.28)
    ap.add_argument("--guidance-scale", type=float, default=2.5)
    ap.add_argument("--heldout", type=int, default=6, help="held-out prompts (half captions, half augmented)")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--prompt-sets", nargs="+", default=["seed", "augmented"])
    ap.add_argument("--methods", nargs="+",
                    default=["uniform", "random", "normal", "all", "activation", "activation-pooled",
                             "activation-coverage"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-fd", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/calibration_ablation_cpu", help="writes OUT.json and OUT.md")
    ap.add_argument("--render", metavar="JSON", help="only re-write the Markdown table of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.render:
        rep = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(rep))
        return rep

    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    else:  # full FP32 as the reference (TF32 would add its own rounding to both sides)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    from adm_export.calibration.cache import CalibrationCache
    from adm_export.calibration.latents import run_trajectories, select_indices
    from adm_export.calibration.prompts import build_prompt_set, builtin_captions, load_captions
    from adm_export.calibration.selection import errors_for_amax, layer_errors, select_activation
    from adm_export.calibration.stats import StatsRecorder, memory_bytes
    from adm_export.config import CalibrationConfig, QuantizeConfig, SelectMethod
    from adm_export.quantize.modelopt import quantize_denoiser

    t_start = time.time()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    adapter = load_adapter(args.model, args.device)
    spec = adapter.denoiser_spec()
    rows = 2 if args.guidance_scale > 1.0 else 1
    cfg = CalibrationConfig(model=adapter.model_id, num_prompts=args.num_prompts, steps=args.steps, points=args.points,
                            audio_seconds=args.seconds, guidance_scale=args.guidance_scale, seed=args.seed,
                            device=args.device)
    timings: dict[str, float] = {}

    # 1. Calibration pools: one sampler pass per prompt set, statistics + every input.
    pools = {}
    for name in args.prompt_sets:
        t0 = time.time()
        ps = build_prompt_set(args.captions, args.num_prompts, args.seed, augment=(name == "augmented"),
                              seeds_first=False)
        prompts = list(ps.prompts)
        rec = StatsRecorder(adapter.denoiser, len(prompts), args.steps)
        inputs: dict = {}

        def on_call(p, s, x, rec=rec, inputs=inputs):
            rec.at(p, s)
            inputs[(p, s)] = {k: v.detach().clone() for k, v in x.items()}

        with rec:
            run_trajectories(adapter, prompts, cfg, on_call, desc=f"pool {name}")
        pools[name] = {"prompts": prompts, "stats": rec.result(), "inputs": inputs,
                       "coverage": ps.coverage.get("summary", {})}
        timings[f"pool_{name}_s"] = time.time() - t0

    # 2. Held-out prompts and seeds: captions in no calibration set, then augmented prompts of
    #    another seed; full-precision trajectories with their own statistics.
    used = {p for pool in pools.values() for p in pool["prompts"]}
    captions = load_captions(args.captions) if args.captions else builtin_captions()
    spare_caps = [c for c in captions if c not in used]
    spare_aug = [c for c in build_prompt_set(args.captions, 4 * args.heldout, args.seed + 1000, augment=True,
                                             seeds_first=False).prompts if c not in used and c not in spare_caps]
    n_cap = min(args.heldout // 2, len(spare_caps))
    heldout = spare_caps[:n_cap] + spare_aug[:args.heldout - n_cap]
    seeds = [10_000 + i for i in range(len(heldout))]
    t0 = time.time()
    # All held-out clips in one batched run (each from its own seed's noise); the quantized runs are
    # batched the same way, so batch effects on float rounding are the same on both sides.
    h_rec = StatsRecorder(adapter.denoiser, 1, args.steps)
    with h_rec:
        ref_calls, ref_z, ref_audio = trajectory(adapter, heldout, seeds, args.steps, args.seconds,
                                                 args.guidance_scale, record=lambda s: h_rec.at(0, s))
    h_stats = h_rec.result()
    ref_out = batched_outputs(adapter, adapter.denoiser, ref_calls)
    timings["heldout_reference_s"] = time.time() - t0

    embedder = None
    fp_emb = None
    if not args.no_fd:
        from adm_export.eval.embedders import get_embedder

        embedder = get_embedder(args.embedder)
        fp_emb = embedder.fd_embeddings(ref_audio, adapter.sampling_rate)

    def evaluate(model) -> dict:
        steps_err = rel_l2_calls(batched_outputs(adapter, model, ref_calls), ref_out, len(ref_calls))
        with adapter.using_denoiser(model):
            _, z, audios = trajectory(adapter, heldout, seeds, args.steps, args.seconds, args.guidance_scale)
        snrs = snr_db(z, ref_z)
        res = {"rel_l2_mean": float(np.mean(steps_err)), "rel_l2_per_step": steps_err,
               "final_snr_db": float(np.mean(snrs)), "final_snr_db_per_clip": snrs}
        if embedder is not None:
            from adm_export.eval.fd import frechet_distance
            from adm_export.eval.fd import paired_drift_pct

            q_emb = embedder.fd_embeddings(audios, adapter.sampling_rate)
            # Key kept from the logmel-only version; the embedder is in the JSON's args.
            res["fd_logmel"] = float(frechet_distance(q_emb, fp_emb))
            res["drift_pct"] = float(paired_drift_pct([e[None] for e in fp_emb], [e[None] for e in q_emb]))
        return res

    def selections(name: str) -> list[tuple[str, list[tuple[int, int]], dict]]:
        pool = pools[name]
        n = len(pool["prompts"])
        out = []
        for method in args.methods:
            if method == "activation":
                r = select_activation(pool["stats"], args.points)
                out.append(("activation", r.points, {"range_points": r.range_points}))
            elif method == "activation-coverage":  # clipping term only: COVERCAL-style range coverage
                r = select_activation(pool["stats"], args.points, rounding=False)
                out.append(("activation-coverage", r.points, {"range_points": r.range_points}))
            elif method == "activation-pooled":  # all steps pooled (energy weighted), not per step
                r = select_activation(pool["stats"], args.points, per_step=False)
                out.append(("activation-pooled", r.points, {"range_points": r.range_points}))
            elif method == "random":
                for s in range(args.random_seeds):
                    out.append((f"random (seed {args.seed + s})",
                                select_indices(SelectMethod.RANDOM, n, args.steps, args.points, args.seed + s), {}))
            else:
                out.append((method, select_indices(SelectMethod(method), n, args.steps, args.points, args.seed), {}))
        return out

    # 3. Quantize per (prompt set, method) and evaluate on the held-out trajectories.
    results = []
    qcfg = QuantizeConfig(precision="int8", device=args.device)
    all_model = None
    for name in args.prompt_sets:
        pool = pools[name]
        for method, points, extra in selections(name):
            t0 = time.time()
            cache = CalibrationCache(
                inputs={n: torch.cat([pool["inputs"][pt][n] for pt in points]) for n in pool["inputs"][points[0]]},
                prompt_index=torch.tensor([p for p, _ in points]), step_index=torch.tensor([s for _, s in points]),
                rows_per_point=rows, manifest={"spec": spec.to_dict()}, path=Path("."))
            model = quantize_denoiser(adapter, cache, qcfg)
            st = pool["stats"]
            amax = st.absmax[tuple(np.array(points).T)].max(axis=0)
            gmax = st.absmax.max(axis=(0, 1))
            row = {
                "prompt_set": name, "method": method, "points": len(points), "selected": [list(p) for p in points],
                "steps_covered": len({s for _, s in points}), "prompts_covered": len({p for p, _ in points}),
                "est_input_error_pool": float(layer_errors(st, points).mean()),
                "est_input_error_heldout": float(errors_for_amax(h_stats, amax).mean()),
                "range_coverage_pool": float((amax / np.maximum(gmax, 1e-30)).mean()),
                "heldout_clipped_layers": int((h_stats.absmax.max(axis=(0, 1)) > amax).sum()),
                **extra, **evaluate(model),
            }
            row["seconds"] = time.time() - t0
            results.append(row)
            # Rows so far, in case the run is cut short (device time limits).
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(results, indent=1))
            print(f"{name:10s} {method:22s} relL2 {row['rel_l2_mean']:.5f}  SNR {row['final_snr_db']:6.2f} dB  "
                  f"est {row['est_input_error_heldout']:.3g}  ({row['seconds']:.0f}s)", flush=True)
            if method == "all" and all_model is None:
                all_model = model
            else:
                del model

    # 4. Context: weights only, and the rounding floor (float64 vs float32 of the same model).
    context = {}
    if all_model is not None:
        import copy

        import modelopt.torch.quantization as mtq

        w_only = copy.deepcopy(all_model)
        mtq.disable_quantizer(w_only, "*input_quantizer")
        context["weights_only"] = evaluate(w_only)
        del w_only
        m64 = copy.deepcopy(all_model).double()
        calls64 = [{k: v.double() for k, v in c.items()} for c in ref_calls]
        floor = rel_l2_calls(batched_outputs(adapter, m64, calls64), batched_outputs(adapter, all_model, ref_calls),
                             len(ref_calls))
        context["rounding_floor_rel_l2_mean"] = float(np.mean(floor))
        context["rounding_floor_rel_l2_per_step"] = floor

    layers = len(pools[args.prompt_sets[0]]["stats"].layers)
    report = {
        "benchmark": "calibration_ablation",
        "model": args.model,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "quantization": "int8 (ModelOpt max calibration, NVIDIA diffusion exclusions)",
        "quantized_layers": layers,
        "statistics_memory": {
            "pool_bytes": pools[args.prompt_sets[0]]["stats"].nbytes,
            "bound_64_prompts_50_steps_bytes": memory_bytes(64, 50, layers),
        },
        "heldout_prompts": heldout,
        "heldout_seeds": seeds,
        "pool_prompts": {n: p["prompts"] for n, p in pools.items()},
        "pool_coverage": {n: p["coverage"] for n, p in pools.items()},
        "results": results,
        "context": context,
        "timings_s": {**timings, "total": time.time() - t_start},
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(markdown(report))
    return report


def memory_line(rep: dict) -> str:
    mem = rep.get("statistics_memory")
    if not mem:
        return ""
    return (f"Activation statistics: {mem['pool_bytes'] / 1e6:.2f} MB per pool; 64 prompts x 50 steps would take "
            f"{mem['bound_64_prompts_50_steps_bytes'] / 1e6:.0f} MB. ")


def markdown(rep: dict) -> str:
    c = rep["config"]
    lines = [
        f"# Calibration ablation ({rep['model']}, {rep['device']})",
        "",
        f"Same budget K = {c['points']} points, preset {rep['quantization']}; {rep['quantized_layers']} quantized "
        f"layers. Pools: {c['num_prompts']} prompts x {c['steps']} DDIM steps, {c['seconds']} s, guidance "
        f"{c['guidance_scale']}. {memory_line(rep)}Held out: {len(rep['heldout_prompts'])} prompts (in neither "
        "pool) with seeds "
        f"{rep['heldout_seeds'][0]}..{rep['heldout_seeds'][-1]}. "
        + ("Trained weights (reference-audioldm). " if "reference" in str(rep["model"]) else
           "Random weights: differences are small by nature (see the context rows). ")
        + f"FD embedder: {rep['config'].get('embedder', 'logmel')}. "
        + ("No timing claims (shared CPU)." if rep["device"] == "cpu" else "No timing claims."),
        "",
        "| prompt set | method | steps/prompts hit | est. input err (pool) | est. input err (held-out) | "
        "range reached | held-out layers clipped | rel. L2 (mean over steps) | final-latent SNR dB | FD | "
        "drift % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["results"]:
        lines.append(
            f"| {r['prompt_set']} | {r['method']} | {r['steps_covered']}/{r['prompts_covered']} | "
            f"{r['est_input_error_pool']:.4g} | {r['est_input_error_heldout']:.4g} | {r['range_coverage_pool']:.3f} | "
            f"{r['heldout_clipped_layers']} | {r['rel_l2_mean']:.5f} | {r['final_snr_db']:.2f} | "
            f"{r.get('fd_logmel', float('nan')):.4g} | {r.get('drift_pct', float('nan')):.3g} |")
    # Random: mean over seeds; and does the error model's held-out estimate rank the rows as measured?
    rnd = [r for r in rep["results"] if r["method"].startswith("random")]
    if rnd:
        lines += ["", "Random, mean over its seeds: " + "; ".join(
            f"{ps}: rel. L2 {np.mean([r['rel_l2_mean'] for r in rnd if r['prompt_set'] == ps]):.5f}, SNR "
            f"{np.mean([r['final_snr_db'] for r in rnd if r['prompt_set'] == ps]):.2f} dB"
            for ps in dict.fromkeys(r["prompt_set"] for r in rnd))]
    est = np.array([r["est_input_error_heldout"] for r in rep["results"]])
    meas = np.array([r["rel_l2_mean"] for r in rep["results"]])
    if len(est) > 2:
        rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
        rho = float(np.corrcoef(rank(est), rank(meas))[0, 1])
        lines += ["", f"Spearman rank correlation, estimated held-out input error vs measured rel. L2, over the rows: "
                      f"{rho:.2f}."]
    ctx = rep.get("context", {})
    if ctx:
        w = ctx["weights_only"]
        lines += ["", "Context (first prompt set's `all` model):", "",
                  f"- weights only (activation quantizers off): rel. L2 {w['rel_l2_mean']:.5f}, final-latent SNR "
                  f"{w['final_snr_db']:.2f} dB" + (f", FD {w['fd_logmel']:.4g}" if "fd_logmel" in w else ""),
                  "- rounding floor (float64 vs float32 of the same fake-quant model): rel. L2 "
                  f"{ctx['rounding_floor_rel_l2_mean']:.5f}; per step "
                  + ", ".join(f"{x:.4f}" for x in ctx["rounding_floor_rel_l2_per_step"])]
    lines += ["", "Per-step relative L2 (held-out, mean over clips; step 0 = noisiest):", "",
              "| prompt set | method | " + " | ".join(str(i) for i in range(c["steps"])) + " |",
              "|---|---|" + "---|" * c["steps"]]
    for r in rep["results"]:
        lines.append(f"| {r['prompt_set']} | {r['method']} | "
                     + " | ".join(f"{x:.4f}" for x in r["rel_l2_per_step"]) + " |")
    lines += ["", f"Total {rep['timings_s']['total']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
