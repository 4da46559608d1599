"""Train the reference text-to-audio model (issue 8) and package it as a diffusers AudioLDM folder.

On the GPU machine (one call; see README "Reference model"):

    python3 benchmarks/train_reference.py --out $OUT/reference --time-budget 500

A CPU smoke run of every stage (minutes, tiny counts):

    python benchmarks/train_reference.py --smoke --out /tmp/ref-smoke

The result folder holds ``audioldm/`` (AudioLDMPipeline, FP16 safetensors),
``reference_clap.safetensors`` + ``.json`` (the evaluation embedder), ``training_log.json``,
``config.json``, ``GENERATOR_VERSION`` and ``README.md`` (the card); copy it to
``adm_export/data/reference/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CARD = """# reference-audioldm

A small AudioLDM-shaped text-to-audio model trained from scratch on the procedural captioned corpus
of `adm_export.reference.corpus` (GENERATOR_VERSION {gv}), so that quantization quality numbers of
adm-export mean something on a machine that cannot download pretrained weights.

* Pipeline: diffusers `AudioLDMPipeline` (FP16 safetensors): byte-level RoBERTa tokenizer (256
  positions), `ClapTextModelWithProjection` ({text_params:.2f} M), `AutoencoderKL` on 64-bin log-mel
  (8 latent channels, 4x down in time and frequency, {vae_params:.2f} M), `UNet2DConditionModel` with
  AudioLDM's class-label FiLM conditioning ({unet_params:.2f} M), `SpeechT5HifiGan` ({voc_params:.2f} M),
  DDIM with AudioLDM's betas, epsilon prediction.
* Embedder `reference-clap`: the CNN audio encoder trained contrastively with the text encoder,
  192-d embedding + 10-class head ({audio_params:.2f} M).
* Data: {n_train} rendered clips of {seconds} s (seed 0) for training, {n_eval} held-out (seed 1).
* Training: {device}, {total:.0f} s wall clock{cont} (recipe `benchmarks/train_reference.py`,
  fixed seeds, wall-clock stage deadlines; steps and losses per stage in `training_log.json`).
* Quick check after training (held-out captions, {qe_clips} clips, 10 DDIM steps, guidance 2.5):
  embedder class accuracy {acc_gen} on generated clips (chance 0.10; {acc_real} on the real clips),
  FD generated vs real {fd_gen} (real half vs half: {fd_rr}).

Limits: the world is 10 synthetic sound classes with attribute captions; the model knows nothing
else (AudioCaps-style captions give arbitrary sounds). The vocoder is trained without a
discriminator, so its audio is buzzier than a GAN-trained HiFi-GAN.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="result folder")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (data, stage checkpoints)")
    p.add_argument("--time-budget", type=float, default=500.0, help="wall-clock seconds for everything")
    p.add_argument("--n-train", type=int, default=24000)
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument("--eval-clips", type=int, default=200, help="held-out clips generated after training")
    p.add_argument("--seconds", type=float, default=2.56)
    p.add_argument("--device", default=None)
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--init", type=Path, default=None,
                   help="result folder of an earlier run to continue from (VAE kept, other stages fine-tuned)")
    p.add_argument("--keep", default="", help="with --init: stages taken over unchanged (only 'vocoder'; the VAE always is)")
    p.add_argument("--phase-a-frac", type=float, default=0.3,
                   help="share of the training time before the U-Net starts (VAE, CLAP)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of every stage")
    a = p.parse_args()
    import torch

    from adm_export.reference import corpus
    from adm_export.reference.train import run

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.smoke:
        a.n_train, a.n_eval, a.eval_clips, a.seconds, a.max_steps = 64, 16, 4, 1.28, 3
        a.time_budget = min(a.time_budget, 600.0)
    work = a.work or Path(tempfile.mkdtemp(prefix="ref-train-"))
    print(f"device {device}, work {work}, out {a.out}, budget {a.time_budget} s", flush=True)
    s = run(a.out, work, a.time_budget, a.n_train, a.n_eval, a.seconds, device, a.max_steps, a.workers,
            a.eval_clips, phase_a_frac=a.phase_a_frac, init=a.init,
            keep=tuple(k for k in a.keep.split(",") if k))
    qe = s.get("quick_eval") or {}
    prm = {k: v / 1e6 for k, v in s["params"].items()}

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    (a.out / "README.md").write_text(CARD.format(
        gv=corpus.GENERATOR_VERSION, text_params=prm["text_encoder"], vae_params=prm["vae"], unet_params=prm["unet"],
        voc_params=prm["vocoder"], audio_params=prm["audio_encoder"], n_train=a.n_train, n_eval=a.n_eval,
        seconds=a.seconds, device=s.get("device_name", device), total=s["total_seconds"],
        cont="" if a.init is None else " in this run, continuing an earlier run (`continued_from` in the log)",
        qe_clips=qe.get("clips", 0), acc_gen=f(qe.get("class_acc_generated")), acc_real=f(qe.get("class_acc_real")),
        fd_gen=f(qe.get("fd_generated_vs_real")), fd_rr=f(qe.get("fd_real_half_vs_half"))))
    print(json.dumps({"sizes_bytes": s["sizes_bytes"], "params": s["params"], "quick_eval": qe,
                      "total_seconds": s["total_seconds"]}, indent=1), flush=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"finished in {time.time() - t0:.0f} s", flush=True)
