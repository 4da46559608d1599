#!/usr/bin/env python
"""Quality of ``reference-audioldm`` (issue 8), recomputed on the CPU.

1. Class accuracy: the first N held-out corpus items (seed 1; the model trained on seed 0) are
   generated from their captions (DDIM, --steps, guidance 2.5, 2.56 s, seed = index) and the
   ``reference-clap`` embedder's predicted class is compared with the caption's class (chance
   0.10). The same embedder on the real clips gives its own ceiling.
2. FD (``reference-clap`` 192-d embeddings) of the generated clips vs the real clips of the same
   captions, next to the FD of two real sets of equal size (seed 1 vs seed 2: the floor at this
   N; FD is biased upward at small N) with bootstrap intervals.
3. With --quant: ``adm-export build --model reference-audioldm`` for each precision (int8, w4a8,
   mixed --size-budget 0.2) on in-domain captions (held-out corpus captions, seed 3), eval with
   ``--embedder reference-clap``; the FD increase vs the full-precision baseline from report.json.

Usage:  python benchmarks/reference_model.py [--clips 100] [--quant] [--json PATH]
Writes benchmarks/results/reference_model.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def quality(n: int, steps: int, batch: int) -> dict:
    import torch

    from adm_export.eval import fd as fdlib
    from adm_export.eval.embedders.reference_clap import ReferenceClapEmbedder
    from adm_export.models import reference_components as C
    from adm_export.models.reference import load_reference_pipeline
    from adm_export.reference import corpus

    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    emb = ReferenceClapEmbedder()
    held = list(corpus.corpus(n, seed=1))
    other = list(corpus.corpus(n, seed=2))
    caps = [c.caption for c in held]
    labels = np.array([corpus.label_vector(c.spec)[0] for c in held])
    gen = []
    t0 = time.time()
    for s in range(0, n, batch):
        gens = [torch.Generator().manual_seed(i) for i in range(s, min(n, s + batch))]
        out = pipe(caps[s:s + batch], num_inference_steps=steps, guidance_scale=2.5, audio_length_in_s=2.56,
                   generator=gens)
        gen.extend(np.asarray(a, dtype=np.float32).reshape(-1) for a in out.audios)
        print(f"generated {len(gen)}/{n} ({time.time() - t0:.0f} s)", flush=True)
    gen_s = time.time() - t0
    e_gen, l_gen = emb.embed_and_logits(gen, C.SAMPLING_RATE)
    e_real, l_real = emb.embed_and_logits([c.audio for c in held], C.SAMPLING_RATE)
    e_other = emb.embed([c.audio for c in other], C.SAMPLING_RATE)
    pred_gen, pred_real = l_gen.argmax(1), l_real.argmax(1)
    per_class = {
        cls: {"n": int((labels == k).sum()),
              "acc_generated": float((pred_gen[labels == k] == k).mean()) if (labels == k).any() else None,
              "acc_real": float((pred_real[labels == k] == k).mean()) if (labels == k).any() else None}
        for k, cls in enumerate(corpus.CLASSES)}

    def fd_ci(x, y):
        b = fdlib.fd_bootstrap(x, y, n_boot=200, seed=0)
        return {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in b.items()} \
            if isinstance(b, dict) else b

    return {
        "clips": n, "steps": steps, "guidance_scale": 2.5, "seconds": 2.56,
        "captions": "held-out corpus items 0..N-1 of seed 1 (training used seed 0)",
        "captions_unseen_in_training_pct": None,
        "class_acc_generated": float((pred_gen == labels).mean()),
        "class_acc_real": float((pred_real == labels).mean()),
        "chance": 1.0 / len(corpus.CLASSES),
        "per_class": per_class,
        "fd_generated_vs_real": float(fdlib.frechet_distance(e_gen, e_real)),
        "fd_real_vs_real_other_seed": float(fdlib.frechet_distance(e_other, e_real)),
        "fd_generated_vs_real_bootstrap": fd_ci(e_gen, e_real),
        "fd_real_vs_real_bootstrap": fd_ci(e_other, e_real),
        "generate_seconds_cpu": round(gen_s, 1),
    }


def variant_args(name: str) -> list[str]:
    """Build arguments of a row: ``int8``, ``mixed-0.2``, or ``LABEL=ARGS`` (e.g.
    ``int8-tensorrt=--precision int8 --placement tensorrt``)."""
    if "=" in name:
        return name.split("=", 1)[1].split()
    if name.startswith("mixed"):
        return ["--precision", "mixed", "--size-budget", "0.2"]
    return ["--precision", name]


def quant(precisions: list[str], num_clips: int, workdir: Path, on_row=None) -> dict:
    from adm_export.reference import corpus

    caps = workdir / "captions.txt"
    caps.write_text("\n".join(c.caption for c in corpus.corpus(64, seed=3, seconds=0.1)) + "\n")
    rows = {}
    for name in precisions:
        prec = name.split("=", 1)[0]
        out = workdir / prec.replace(" ", "_")
        args = ["adm-export", "build", "--model", "reference-audioldm", "--out", str(out), "--force",
                "--captions", str(caps), "--embedder", "reference-clap", "--num-clips", str(num_clips),
                *variant_args(name)]
        t0 = time.time()
        proc = subprocess.run(args, capture_output=True, text=True)
        secs = time.time() - t0
        print(f"{prec}: exit {proc.returncode} in {secs:.0f} s", flush=True)
        rep_path = out / "report.json"
        if not rep_path.exists():
            rows[prec] = {"exit_code": proc.returncode, "seconds": round(secs, 1), "error": proc.stderr[-800:]}
            if on_row is not None:
                on_row(rows)
            continue
        rep = json.loads(rep_path.read_text())
        ev, size = rep.get("eval", {}), rep.get("size", {})
        rows[prec] = {
            "exit_code": proc.returncode, "seconds": round(secs, 1),
            "fd_baseline_vs_ref": ev.get("fd_baseline_vs_ref"), "fd_quantized_vs_baseline": ev.get("fd_quantized_vs_baseline"),
            "fd_increase_pct": ev.get("fd_increase_pct"), "fd_increase_pct_ci": ev.get("fd_increase_pct_ci"),
            "fd_quantized_vs_ref": ev.get("fd_quantized_vs_ref"),
            "paired_drift_pct": ev.get("paired_drift_pct"), "final_latent_rel_l2": ev.get("final_latent_rel_l2"),
            "gate_passed": (ev.get("gate") or {}).get("passed"),
            "kl": ev.get("kl"), "num_clips": ev.get("num_clips"), "embedder": ev.get("embedder"),
            "unet_fp32_bytes": size.get("unet_fp32_bytes"), "unet_export_bytes": size.get("unet_export_bytes"),
            "reduction_vs_fp32": size.get("reduction_vs_fp32"),
            "stages_seconds": {k: v.get("seconds") for k, v in (rep.get("stages") or {}).items() if isinstance(v, dict)},
            "build_args": variant_args(name),
            "placement": ((rep.get("quantization") or {}).get("placement") or {}).get("value")
            if isinstance((rep.get("quantization") or {}).get("placement"), dict) else None,
            "speedup_vs_fp32": (rep.get("engine") or {}).get("speedup_vs_fp32"),
            "engine_latency_ms": (rep.get("engine") or {}).get("latency_ms"),
        }
        if on_row is not None:  # results of finished builds survive an interrupted run
            on_row(rows)
    return rows


def _md(res: dict) -> str:
    lines = ["# reference-audioldm: quality (CPU)", "", f"Machine: {res['machine']}. {res['note']}", ""]
    q = res.get("quality")
    if q:
        lines += [f"Held-out captions (seed 1), {q['clips']} clips, {q['steps']} DDIM steps, guidance 2.5, 2.56 s.", "",
             "| measure | value |", "| --- | --- |",
             f"| class accuracy, generated (embedder `reference-clap`) | {q['class_acc_generated']:.3f} (chance {q['chance']:.2f}) |",
             f"| class accuracy, real clips of the same captions | {q['class_acc_real']:.3f} |",
             f"| FD generated vs real | {q['fd_generated_vs_real']:.2f} |",
             f"| FD real (seed 2) vs real (seed 1), same N: the floor | {q['fd_real_vs_real_other_seed']:.2f} |", "",
             "| class | n | acc generated | acc real |", "| --- | --- | --- | --- |"]
        for cls, r in q["per_class"].items():
            f = (lambda v: "-" if v is None else f"{v:.2f}")
            lines.append(f"| {cls} | {r['n']} | {f(r['acc_generated'])} | {f(r['acc_real'])} |")
    if res.get("quant"):
        lines += ["", "Quantized builds (`adm-export build --model reference-audioldm --embedder reference-clap`, "
                  f"in-domain captions of corpus seed 3, {res.get('quant_clips', '?')} clips per set, 10 steps; "
                  "FD increase = FD(quantized, ref) vs FD(baseline, ref), ref = a second baseline draw; "
                  "paired drift and KL compare each quantized clip with its own baseline clip):", "",
                  "| precision | exit | FD baseline vs ref | FD quantized vs ref | FD increase % (95% CI) | paired drift % | KL q vs b | U-Net export / FP32 | build s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p, r in res["quant"].items():
            def g(k, fmt="{:.2f}"):
                v = r.get(k)
                return "-" if v is None else fmt.format(v)
            ratio = (r["unet_export_bytes"] / r["unet_fp32_bytes"]) if r.get("unet_export_bytes") and r.get("unet_fp32_bytes") else None
            ci = r.get("fd_increase_pct_ci")
            ci_s = f" ({ci[0]:.1f} to {ci[1]:.1f})" if ci else ""
            kl = (r.get("kl") or {}).get("quantized_vs_baseline")
            lines.append(f"| {p} | {r['exit_code']} | {g('fd_baseline_vs_ref')} | {g('fd_quantized_vs_ref')} | "
                         f"{g('fd_increase_pct', '{:.1f}')}{ci_s} | {g('paired_drift_pct', '{:.1f}')} | "
                         f"{'-' if kl is None else f'{kl:.3f}'} | {'-' if ratio is None else f'{ratio:.3f}'} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--quant", action="store_true", help="also build int8, w4a8 and mixed (0.2) and read their FD")
    p.add_argument("--quant-clips", type=int, default=8)
    p.add_argument("--precisions", default="int8,w4a8,mixed-0.2",
                   help="Comma-separated rows: a preset, mixed-0.2, or LABEL=BUILD ARGS.")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--json", type=Path, default=RESULTS / "reference_model.json")
    p.add_argument("--note", default="2 CPU cores shared with other engineers' jobs: timings are indicative only.")
    a = p.parse_args()
    import torch

    res = json.loads(a.json.read_text()) if a.json.exists() else {}
    res.update({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                           f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
                "note": a.note})
    if not a.skip_quality:
        res["quality"] = quality(a.clips, a.steps, a.batch)
    def save(quant_rows=None):
        if quant_rows is not None:  # rows of earlier runs with other labels are kept
            res["quant"] = {**res.get("quant", {}), **quant_rows}
            res["quant_clips"] = a.quant_clips
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
        md = _md(res)
        a.json.with_suffix(".md").write_text(md)
        return md

    if a.quant:
        with tempfile.TemporaryDirectory(prefix="ref-quant-") as tmp:
            quant(a.precisions.split(","), a.quant_clips, Path(tmp), on_row=save)
    print(save())


if __name__ == "__main__":
    main()
