"""The ``eval`` stage: the same prompts and seeds through the full-precision pipeline and the engine.

Both runs use the model's own diffusers sampler; only the denoiser differs (the engine plugs in
through :func:`adm_export.engines.stage.load_ort_denoiser`). What is measured:

* ``fd_quantized_vs_baseline``: FD between the engine's clips and the baseline's clips (same
  prompts, same seeds), with a bootstrap interval.
* The gate compares both against a *reference* set: a folder of real clips (``--reference``) or,
  without one, a second baseline draw with other seeds. ``fd_increase_pct`` is
  ``100 * (FD(engine, ref) - FD(baseline, ref)) / FD(baseline, ref)``: how much further the
  quantized model's output distribution is from the reference than the baseline's.
* The per-step latent error between the two trajectories (relative L2 of x_t at each step).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from adm_export.artifacts import atomic_dir, read_manifest, write_json
from adm_export.config import EvalConfig, to_dict
from adm_export.errors import InvalidInputError
from adm_export.progress import progress

logger = logging.getLogger(__name__)

REFERENCE_SEED_OFFSET = 1_000_003  # far from any seed a user would pick for the main run
CHUNK = 8


def eval_prompts(num_clips: int) -> list[str]:
    """The evaluation prompts: the built-in captions, cycled to ``num_clips``."""
    from adm_export.calibration.prompts import builtin_captions

    captions = builtin_captions()
    return [captions[i % len(captions)] for i in range(num_clips)]


def generate_with_trajectory(adapter, prompts: Sequence[str], seeds: Sequence[int], cfg: EvalConfig,
                             label: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Generate clips in chunks and record x_t of every step.

    Returns:
        ``(waveforms, latents)`` with latents shaped (clips, steps, *latent_shape).
    """
    import torch

    waves, trajectories = [], []
    chunks = [range(i, min(i + CHUNK, len(prompts))) for i in range(0, len(prompts), CHUNK)]
    for chunk in progress(chunks, desc=f"eval: {label}", unit="batch"):
        steps: list = []
        n = len(chunk)

        def record(inputs, steps=steps, n=n):
            # With classifier-free guidance the batch is [uncond; cond] over the same x_t.
            steps.append(inputs["sample"][:n].detach().to("cpu", torch.float32).clone())

        with adapter.record_denoiser_calls(record):
            waves += adapter.generate([prompts[i] for i in chunk], [seeds[i] for i in chunk], cfg.steps,
                                      cfg.audio_seconds, cfg.guidance_scale)
        trajectories.append(torch.stack(steps, dim=1).numpy())
    return waves, np.concatenate(trajectories)


def load_reference(folder: str | Path, sampling_rate: int) -> list[np.ndarray]:
    """Read every WAV/FLAC file of a folder as mono float32 at ``sampling_rate``."""
    import soundfile as sf
    from scipy.signal import resample_poly

    folder = Path(folder)
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".wav", ".flac"))
    if len(files) < 2:
        raise InvalidInputError(
            f"--reference {str(folder)!r} holds {len(files)} audio file(s); give a folder with at least 2 WAV/FLAC clips"
        )
    out = []
    for f in files:
        data, sr = sf.read(str(f), dtype="float32", always_2d=True)
        mono = data.mean(axis=1)
        if sr != sampling_rate:
            g = np.gcd(sr, sampling_rate)
            mono = resample_poly(mono, sampling_rate // g, sr // g).astype(np.float32)
        out.append(mono)
    return out


def write_clips(folder: Path, waves: Sequence[np.ndarray], sampling_rate: int) -> None:
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    for i, w in enumerate(waves):
        sf.write(str(folder / f"{i:04d}.wav"), np.clip(w, -1, 1), sampling_rate, subtype="PCM_16")


def evaluate(cfg: EvalConfig, engine_dir: str | Path, out: str | Path | None = None, force: bool = False,
             adapter=None, model_id: str | None = None) -> dict:
    """Run the ``eval`` stage and return its results (the ``eval`` section of the report).

    Args:
        cfg: Evaluation settings.
        engine_dir: Folder written by the ``engine`` stage.
        out: If given, a folder for ``eval.json`` and the clips (``baseline/``, ``quantized/``).
        force: Overwrite ``out``.
        adapter: An already loaded model adapter (its denoiser must be the full-precision one).
        model_id: ``--model`` given by the user; must match the engine's model.
    """
    from adm_export.engines.stage import load_ort_denoiser
    from adm_export.eval import fd as fdlib
    from adm_export.eval.embedders import get_embedder
    from adm_export.models import load_model

    # 1. Model, engine, embedder, prompts.
    manifest = read_manifest(engine_dir, "engine", "--engine")
    adapter = adapter or load_model(model_id or manifest["model"]["id"], cfg.device)
    denoiser, _ = load_ort_denoiser(engine_dir, adapter, cfg.device)
    embedder = get_embedder(cfg.embedder, checkpoint=cfg.embedder_checkpoint, device=cfg.device)
    prompts = eval_prompts(cfg.num_clips)
    seeds = [cfg.seed + i for i in range(cfg.num_clips)]

    # 2. Baseline, engine and reference clips.
    base_wave, base_traj = generate_with_trajectory(adapter, prompts, seeds, cfg, "baseline")
    with adapter.using_denoiser(denoiser):
        q_wave, q_traj = generate_with_trajectory(adapter, prompts, seeds, cfg, "engine")
    if cfg.reference_dir:
        ref_wave = load_reference(cfg.reference_dir, adapter.sampling_rate)
        reference = {"kind": "folder", "path": str(cfg.reference_dir), "clips": len(ref_wave)}
    else:
        ref_seeds = [s + REFERENCE_SEED_OFFSET for s in seeds]
        ref_wave, _ = generate_with_trajectory(adapter, prompts, ref_seeds, cfg, "reference draw")
        reference = {"kind": "baseline_other_seeds", "clips": len(ref_wave),
                     "seed_offset": REFERENCE_SEED_OFFSET}

    # 3. Embeddings and Fréchet distances.
    sr = adapter.sampling_rate
    e_base, e_q, e_ref = (embedder.fd_embeddings(w, sr) for w in (base_wave, q_wave, ref_wave))
    fd_q_base = fdlib.fd_bootstrap(e_q, e_base, seed=cfg.seed)
    fd_base_ref = fdlib.frechet_distance(e_base, e_ref)
    fd_q_ref = fdlib.frechet_distance(e_q, e_ref)
    increase = 100.0 * (fd_q_ref - fd_base_ref) / max(fd_base_ref, 1e-12)
    passed = cfg.max_fd_increase is None or increase <= cfg.max_fd_increase

    # 4. Per-step latent error between the two trajectories.
    diff = (q_traj - base_traj).reshape(q_traj.shape[0], q_traj.shape[1], -1)
    norm = base_traj.reshape(diff.shape)
    per_step = (np.linalg.norm(diff, axis=2) / np.maximum(np.linalg.norm(norm, axis=2), 1e-30)).mean(axis=0)

    result = {
        "num_clips": cfg.num_clips,
        "steps": cfg.steps,
        "audio_seconds": cfg.audio_seconds,
        "embedder": embedder.name,
        "embedder_weight_free": bool(embedder.weight_free),
        "embedder_description": embedder.description,
        "reference": reference,
        "fd_quantized_vs_baseline": fd_q_base["fd"],
        "fd_quantized_vs_baseline_ci": [fd_q_base["ci_low"], fd_q_base["ci_high"]],
        "fd_baseline_vs_ref": fd_base_ref,
        "fd_quantized_vs_ref": fd_q_ref,
        "fd_increase_pct": increase,
        "fd_warning": fd_q_base.get("warning"),
        "latent_rel_l2_per_step": per_step.tolist(),
        "final_latent_rel_l2": float(per_step[-1]),
        "engine_calls": int(denoiser.calls),
        "gate": {
            "metric": "fd_increase_pct",
            "value": increase,
            "threshold": cfg.max_fd_increase,
            "passed": bool(passed),
        },
        "config": to_dict(cfg),
    }
    logger.info("eval: FD(engine, baseline) %.4g [%.4g, %.4g]; FD increase vs %s %.1f%% (gate %s: %s)",
                fd_q_base["fd"], fd_q_base["ci_low"], fd_q_base["ci_high"], reference["kind"], increase,
                cfg.max_fd_increase, "passed" if passed else "FAILED")
    if out is not None:
        with atomic_dir(out, force=force) as tmp:
            write_clips(tmp / "baseline", base_wave, sr)
            write_clips(tmp / "quantized", q_wave, sr)
            write_json(tmp / "eval.json", result)
    return result
