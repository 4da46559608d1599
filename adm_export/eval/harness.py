"""The ``eval`` stage: the same prompts and seeds through the full-precision pipeline and the engine.

Both runs use the model's own diffusers sampler; only the denoiser differs (the engine plugs in
through :func:`adm_export.engines.stage.load_ort_denoiser`). What is measured:

* ``fd_quantized_vs_baseline``: FD between the engine's clips and the baseline's clips (same
  prompts, same seeds). With ``--embedder vggish`` the rows are VGGish frames, i.e. FAD.
* The gate compares both against a *reference* set: a folder of real clips (``--reference``) or,
  without one, a second baseline draw with other seeds. ``fd_increase_pct`` is
  ``100 * (FD(engine, ref) - FD(baseline, ref)) / FD(baseline, ref)``: how much further the
  quantized model's output distribution is from the reference than the baseline's.
* ``paired_drift_pct``: ``100 * mean_i ||e(q_i) - e(b_i)||^2 / mean_{i!=j} ||e(b_i) - e(b_j)||^2``,
  how far each engine clip is from its own baseline clip relative to the spread of the set. The gate
  checks both (``--max-fd-increase``, ``--max-drift``): at small N the FD increase is dominated by
  covariance-trace terms and can even fall for a broken engine whose output lost variance (measured
  on tiny-audioldm: INT8 weight scales x4 gave -16 % FD increase but 40 % drift; the real engine
  0.4 % drift); the paired drift has no small-N bias and catches it.
* Intervals: a clip-level bootstrap that keeps the pairing (baseline and engine clips are
  resampled with the same indices; a reference draw too, since it shares the prompts; a reference
  folder independently). FD is biased upward by resampling (duplicated clips), badly so when
  clips <= embedding size, so the percentile interval can lie entirely above the estimate. The
  interval reported (``ci``) is the percentile interval shifted by the bootstrap's median bias,
  so it is centred on the estimate; the raw percentile interval and the bias are reported too.
* KL (paired by prompt and seed) and the inception score from the embedder's class logits
  (PANNs Cnn14), the CLAP score (text-audio cosine) with a CLAP checkpoint, FD-inf on request.
* The per-step latent error between the two trajectories (relative L2 of x_t at each step).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adm_export.artifacts import atomic_dir, read_manifest, write_json
from adm_export.config import EvalConfig, to_dict
from adm_export.errors import InvalidInputError

logger = logging.getLogger(__name__)

REFERENCE_SEED_OFFSET = 1_000_003  # far from any seed a user would pick for the main run
CHUNK = 8
#: Audio files a ``--reference`` folder may hold (what libsndfile reads everywhere).
REFERENCE_SUFFIXES = (".wav", ".flac", ".ogg")
#: FD(baseline, reference) below this fraction of the sets' total variance means the reference
#: is a copy of the baseline: the relative FD increase is then undefined.
DEGENERATE_REF_RTOL = 1e-6
#: Central coverage of every bootstrap interval.
CI = 0.95
#: Clips shown in the spectrogram grid.
SPECTROGRAM_ROWS = 3
#: Full-precision runs kept in memory for reuse by later evaluations in the same process, keyed
#: by model identity and sampling settings; ``None`` (the default) keeps nothing. Set it to a
#: dict when one process evaluates several engines of one model (a precision sweep, tests): the
#: baseline and the reference draw are then generated once. Entries hold every clip and latent
#: trajectory, so the cache is off by default.
BASELINE_CACHE: dict | None = None


def eval_prompts(num_clips: int, captions_file: str | None = None) -> list[str]:
    """The evaluation prompts: the captions of ``captions_file`` (else the built-in ones), cycled."""
    from adm_export.calibration.prompts import builtin_captions, load_captions

    captions = load_captions(captions_file) if captions_file else builtin_captions()
    return [captions[i % len(captions)] for i in range(num_clips)]


# ------------------------------------------------------------------------------------------------
# Clips
# ------------------------------------------------------------------------------------------------


def generate_with_trajectory(adapter, prompts: Sequence[str], seeds: Sequence[int], cfg: EvalConfig,
                             label: str, timesteps: list | None = None,
                             denoiser_key: Any = "full-precision", embedding: tuple | None = None,
                             embedded: list | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Generate clips in chunks of :data:`CHUNK` and record x_t of every step.

    Under torchrun the chunks are split over the ranks (one resumable shard per chunk,
    :mod:`adm_export.distributed`); rank 0 returns all clips, the others empty lists. A chunk is the same batch in
    any number of processes, so the clips are bit-identical to a single-process run.

    Args:
        adapter: Model adapter (its current denoiser is the one that runs).
        prompts: One prompt per clip.
        seeds: One seed per clip (initial noise).
        cfg: Steps, length and guidance.
        label: Progress-bar label.
        timesteps: If given, filled with the scheduler timestep of every step (first chunk).
        denoiser_key: Identity of the denoiser that runs (part of the shards' key: an engine's
            manifest digest, or ``"full-precision"``).
        embedding: ``(identity, embed)``: also embed each chunk's clips where they are generated
            (``embed(waves) -> (fd_rows_per_clip, logits)``, :func:`_embed_set`), so the embedding
            is split over the ranks too; ``identity`` joins the shards' key.
        embedded: With ``embedding``: filled with ``(fd_rows_per_clip, logits)`` of all clips (rank 0).

    Returns:
        ``(waveforms, latents)`` with latents shaped (clips, steps, *latent_shape).
    """
    import torch

    from adm_export import distributed as dist

    chunks = [range(i, min(i + CHUNK, len(prompts))) for i in range(0, len(prompts), CHUNK)]
    store = dist.ShardStore.open("eval-clips", {
        "model": adapter.identity(), "denoiser": denoiser_key, "prompts": list(prompts), "seeds": list(seeds),
        "steps": cfg.steps, "audio_seconds": cfg.audio_seconds, "guidance_scale": cfg.guidance_scale,
        "device": cfg.device, "chunk": CHUNK, "embedding": None if embedding is None else embedding[0]})

    def run_chunk(c: int) -> dict:
        chunk = chunks[c]
        steps: list = []
        stamps: list[float] = []
        n = len(chunk)

        def record(inputs):
            # With classifier-free guidance the batch is [uncond; cond] over the same x_t.
            steps.append(inputs["sample"][:n].detach().to("cpu", torch.float32).clone())
            stamps.append(float(torch.as_tensor(inputs["timestep"]).reshape(-1)[0]))

        # Baseline and engine sample a length the exported U-Net can run, cut back to --eval-seconds.
        keep = int(cfg.audio_seconds * adapter.sampling_rate)
        with adapter.record_denoiser_calls(record):
            waves = adapter.generate([prompts[i] for i in chunk], [seeds[i] for i in chunk], cfg.steps,
                                     adapter.engine_seconds(cfg.audio_seconds), cfg.guidance_scale)
        waves = [w[:keep] for w in waves]
        unit = {"waves": [torch.from_numpy(np.ascontiguousarray(w)) for w in waves],
                "trajectory": torch.stack(steps, dim=1), "timesteps": stamps}
        if embedding is not None:
            blocks, logits = embedding[1](waves)
            unit["blocks"] = [torch.from_numpy(np.ascontiguousarray(b)) for b in blocks]
            unit["logits"] = None if logits is None else torch.from_numpy(np.ascontiguousarray(logits))
        return unit

    units = [f"chunk-{c:05d}" for c in range(len(chunks))]
    dist.run_units(store, units, run_chunk, f"eval: {label}", "batch")
    # Rank 0 scores the clips; the others need not hold them.
    results = dist.load_all(store, units) if dist.is_main() else []
    store.close()
    if not results:
        return [], np.zeros((0,), dtype=np.float32)
    if timesteps is not None and results:
        timesteps.extend(results[0]["timesteps"])
    waves = [w.numpy() for r in results for w in r["waves"]]
    if embedding is not None and embedded is not None:
        logits = [r["logits"] for r in results]
        embedded[:] = [[b.numpy() for r in results for b in r["blocks"]],
                       None if any(x is None for x in logits) else np.concatenate([x.numpy() for x in logits])]
    return waves, np.concatenate([r["trajectory"].numpy() for r in results])


def _embedder_identity(embedder, cfg: EvalConfig) -> dict:
    """What an embedding depends on besides the clips (part of the eval shards' key)."""
    ckpt = cfg.embedder_checkpoint
    stat = Path(ckpt).stat() if ckpt and Path(ckpt).exists() else None
    return {"name": embedder.name, "description": getattr(embedder, "description", None), "checkpoint": ckpt,
            "checkpoint_stat": None if stat is None else [stat.st_size, stat.st_mtime_ns]}


def _full_precision_run(adapter, prompts: Sequence[str], seeds: Sequence[int], cfg: EvalConfig, label: str,
                        timesteps: list, embedding: tuple | None = None,
                        embedded: list | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """:func:`generate_with_trajectory` with the adapter's own denoiser, through :data:`BASELINE_CACHE`."""
    import json

    if BASELINE_CACHE is None:
        return generate_with_trajectory(adapter, prompts, seeds, cfg, label, timesteps, embedding=embedding,
                                        embedded=embedded)
    key = json.dumps([adapter.identity(), list(prompts), list(seeds), cfg.steps, cfg.audio_seconds,
                      cfg.guidance_scale, cfg.device, None if embedding is None else embedding[0]],
                     sort_keys=True, default=str)
    if key not in BASELINE_CACHE:
        steps: list[float] = []
        emb: list = []
        BASELINE_CACHE[key] = (*generate_with_trajectory(adapter, prompts, seeds, cfg, label, steps,
                                                         embedding=embedding, embedded=emb), steps, emb)
    else:
        logger.info("eval: %s reused from this process's baseline cache", label)
    waves, traj, steps, emb = BASELINE_CACHE[key]
    timesteps[:] = steps
    if embedded is not None:
        embedded[:] = emb
    return waves, traj


def load_reference(folder: str | Path, sampling_rate: int) -> list[np.ndarray]:
    """Read every WAV/FLAC/OGG file of a folder (not recursive) as mono float32 at ``sampling_rate``.

    Raises:
        InvalidInputError: The folder is missing, holds fewer than 2 audio files, or a file cannot
            be decoded (the message names ``--reference`` and the file).
    """
    import soundfile as sf
    from scipy.signal import resample_poly

    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"--reference {str(folder)!r} is not a folder; give a folder of WAV/FLAC clips")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in REFERENCE_SUFFIXES)
    if len(files) < 2:
        raise InvalidInputError(
            f"--reference {str(folder)!r} holds {len(files)} audio file(s); "
            "give a folder with at least 2 WAV/FLAC/OGG clips"
        )
    out = []
    for f in files:
        try:
            data, sr = sf.read(str(f), dtype="float32", always_2d=True)
        except Exception as exc:  # libsndfile's errors are RuntimeError / LibsndfileError
            raise InvalidInputError(f"--reference: cannot decode {str(f)!r}: {str(exc).splitlines()[0]}") from exc
        if data.shape[0] == 0:
            raise InvalidInputError(f"--reference: {str(f)!r} is empty; remove it from the folder")
        mono = data.mean(axis=1)
        if not np.isfinite(mono).all():
            raise InvalidInputError(f"--reference: {str(f)!r} holds NaN/inf samples; remove it from the folder")
        if sr != sampling_rate:
            g = math.gcd(sr, sampling_rate)
            mono = resample_poly(mono, sampling_rate // g, sr // g).astype(np.float32)
        out.append(mono)
    logger.info("reference: %d clips from %s (%.1f-%.1f s)", len(out), folder,
                min(len(w) for w in out) / sampling_rate, max(len(w) for w in out) / sampling_rate)
    return out


def write_clips(folder: Path, waves: Sequence[np.ndarray], sampling_rate: int) -> None:
    """Write clips as 16-bit WAV files ``0000.wav, 0001.wav, ...`` (non-finite samples as 0)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    for i, w in enumerate(waves):
        sf.write(str(folder / f"{i:04d}.wav"), np.clip(np.nan_to_num(w), -1, 1), sampling_rate, subtype="PCM_16")


# ------------------------------------------------------------------------------------------------
# Metrics on clips (no model involved: testable with any embedder)
# ------------------------------------------------------------------------------------------------


def _embed_set(embedder, waves: Sequence[np.ndarray], sr: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    """FD rows grouped by clip, and class logits when the embedder has a class head.

    VGGish contributes one row per 0.96 s frame (FAD); other embedders one row per clip. Keeping
    the rows grouped lets the bootstrap resample whole clips.
    """
    frames = getattr(embedder, "frame_embeddings", None)
    if callable(frames):
        blocks = [np.asarray(b, dtype=np.float64) for b in frames(waves, sr)]
        return blocks, embedder.logits(waves, sr)
    emb, logits = embedder.embed_and_logits(waves, sr)
    emb = np.asarray(emb, dtype=np.float64)
    return [row[None, :] for row in emb], None if logits is None else np.asarray(logits, dtype=np.float64)


def _interval(estimate: float | None, boots: np.ndarray, ci: float, floor: float | None) -> dict:
    """Summarise bootstrap replicates of a statistic around its full-sample estimate.

    ``ci`` is the percentile interval shifted by ``bias = median(boots) - estimate``: it keeps
    the bootstrap spread but is centred where the estimate is, so it always contains it. The
    raw percentile interval, the bias and whether the raw interval held the estimate are kept.
    """
    boots = boots[np.isfinite(boots)]
    if estimate is None or not np.isfinite(estimate) or boots.size < 2:
        return {"estimate": estimate, "ci": None, "percentile_ci": None, "bias": None, "boot_median": None,
                "boot_std": None, "estimate_in_percentile_ci": None}
    alpha = (1.0 - ci) / 2.0
    lo, hi = (float(v) for v in np.quantile(boots, [alpha, 1.0 - alpha]))
    med = float(np.median(boots))
    bias = med - float(estimate)
    low, high = lo - bias, hi - bias
    if floor is not None:
        low, high = max(floor, low), max(floor, high)
    return {
        "estimate": float(estimate),
        "ci": [low, high],
        "percentile_ci": [lo, hi],
        "bias": bias,
        "boot_median": med,
        "boot_std": float(boots.std(ddof=1)),
        "estimate_in_percentile_ci": bool(lo <= estimate <= hi),
    }


def _shared_projection(blocks: Sequence[np.ndarray]):
    """An orthonormal projection onto the span of all rows (centred): FD is unchanged by it.

    Every mean difference and centred row of every subset lies in the span of ``rows - c`` for
    any fixed ``c``, so projecting all sets once makes each bootstrap FD a small matrix problem.
    """
    rows = np.concatenate(blocks)
    center = rows.mean(axis=0)
    if rows.shape[0] - 1 >= rows.shape[1]:
        return lambda b: b - center
    q, _ = np.linalg.qr((rows - center).T, mode="reduced")
    return lambda b: (b - center) @ q


def _increase_pct(fd_q_ref: float, fd_base_ref: float) -> float:
    return 100.0 * (fd_q_ref - fd_base_ref) / max(fd_base_ref, 1e-300)


def _paired_rows(base: Sequence[np.ndarray], quant: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the two sets aligned pair by pair: frame by frame where the clips have equal frame
    counts (VGGish frames of equal-length clips), else one mean row per clip."""
    if all(b.shape == q.shape for b, q in zip(base, quant)):
        return np.concatenate(base), np.concatenate(quant)
    return np.stack([b.mean(axis=0) for b in base]), np.stack([q.mean(axis=0) for q in quant])


def paired_drift_pct(base: Sequence[np.ndarray], quant: Sequence[np.ndarray]) -> float:
    """How far each engine clip is from its own baseline clip, relative to how far baseline clips are apart.

    ``100 * mean_i ||q_i - b_i||^2 / mean_{i != j} ||b_i - b_j||^2`` over embedding rows paired by
    prompt and seed (the denominator equals ``2 * Tr(cov(b))``). 0 means identical output, about
    100 means the engine's clip is as far from its baseline clip as an unrelated clip of the set.
    Unlike FD it estimates no covariance, so it has no small-N bias and stays meaningful at N = 2.
    """
    b, q = _paired_rows(base, quant)
    spread = 2.0 * float(np.trace(np.atleast_2d(np.cov(b, rowvar=False))))
    if len(b) < 2 or spread <= 0:
        return float("nan")
    return 100.0 * float(np.mean(np.sum((q - b) ** 2, axis=1))) / spread


def fd_infinity_paired(x: Sequence[np.ndarray], y: Sequence[np.ndarray], paired: bool, seed: int,
                       n_trials: int = 10) -> dict:
    """FD extrapolated to infinitely many clips (1/N fit), subsampling whole clips, pairs kept together.

    :func:`adm_export.eval.fd.fd_infinity` subsamples the two sets independently; for clips paired
    by prompt and seed that would compare unrelated clips at small N and the fit would extrapolate a
    meaningless (even negative) intercept, so paired sets take the same clip subset.

    Returns:
        ``{"fd_inf", "slope", "r2", "points", "warning"}`` (``fd_inf`` is ``None`` with fewer than 3 clips).
    """
    from adm_export.eval.fd import _fd_eigh, _rank_warning

    n_x, n_y = len(x), len(y)
    n_max = min(n_x, n_y)
    if n_max < 3:
        return {"fd_inf": None, "slope": None, "r2": None, "points": [], "warning": "needs at least 3 clips per set"}
    proj = _shared_projection([*x, *y])
    xp, yp = [proj(b) for b in x], [proj(b) for b in y]
    ns = sorted({int(round(v)) for v in np.linspace(max(2, n_max // 4), n_max, 5)})
    rng = np.random.default_rng(seed)
    points = []
    for n in ns:
        trials = 1 if n == n_x == n_y else n_trials
        vals = []
        for _ in range(trials):
            ix = rng.permutation(n_x)[:n]
            iy = ix if paired and n_x == n_y else rng.permutation(n_y)[:n]
            vals.append(_fd_eigh(np.concatenate([xp[k] for k in ix]), np.concatenate([yp[k] for k in iy])))
        points.append({"n": n, "inv_n": 1.0 / n, "fd": float(np.mean(vals)),
                       "fd_std": float(np.std(vals, ddof=1)) if trials > 1 else 0.0, "trials": trials})
    inv = np.array([q["inv_n"] for q in points])
    fds = np.array([q["fd"] for q in points])
    slope, intercept = np.polyfit(inv, fds, 1)
    total = float(((fds - fds.mean()) ** 2).sum())
    r2 = 1.0 - float(((fds - slope * inv - intercept) ** 2).sum()) / total if total > 0 else 1.0
    rows = min(sum(len(b) for b in x), sum(len(b) for b in y))
    warning = _rank_warning(rows, rows, x[0].shape[1])
    if warning:
        warning = warning.replace("prefer fd_infinity, ", "") + "; FD is not linear in 1/N here"
    return {"fd_inf": float(intercept), "slope": float(slope), "r2": float(r2), "points": points, "warning": warning}


def bootstrap_fds(base: Sequence[np.ndarray], quant: Sequence[np.ndarray], ref: Sequence[np.ndarray],
                  ref_paired: bool, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Bootstrap replicates of the three FDs and of the FD increase, resampling whole clips.

    Args:
        base: Baseline FD rows grouped by clip.
        quant: Engine FD rows grouped by clip, paired with ``base`` by index.
        ref: Reference FD rows grouped by clip.
        ref_paired: Resample the reference with the baseline's indices (a reference draw of the same
            prompts); otherwise independently (a folder of other clips).
        n_boot: Replicates.
        seed: Seed of the resampling generator.

    Returns:
        Arrays of length ``n_boot`` under ``fd_quantized_vs_baseline``, ``fd_baseline_vs_ref``,
        ``fd_quantized_vs_ref``, ``fd_increase_pct`` and ``paired_drift_pct``.
    """
    # The eigendecomposition FD is the value frechet_distance cross-checks against scipy's sqrtm;
    # the cross-check runs once on the full sets (the point estimates), not in this loop.
    from adm_export.eval.fd import _fd_eigh

    proj = _shared_projection([*base, *quant, *ref])
    b_p, q_p, r_p = ([proj(x) for x in s] for s in (base, quant, ref))
    n, m = len(b_p), len(r_p)
    rng = np.random.default_rng(seed)
    out = {k: np.empty(n_boot) for k in
           ("fd_quantized_vs_baseline", "fd_baseline_vs_ref", "fd_quantized_vs_ref", "fd_increase_pct",
            "paired_drift_pct")}
    for i in range(n_boot):
        idx = rng.integers(0, n, size=n)
        jdx = idx if ref_paired and m == n else rng.integers(0, m, size=m)
        b = np.concatenate([b_p[k] for k in idx])
        q = np.concatenate([q_p[k] for k in idx])
        r = np.concatenate([r_p[k] for k in jdx])
        out["fd_quantized_vs_baseline"][i] = _fd_eigh(q, b)
        br, qr = _fd_eigh(b, r), _fd_eigh(q, r)
        out["fd_baseline_vs_ref"][i] = br
        out["fd_quantized_vs_ref"][i] = qr
        out["fd_increase_pct"][i] = _increase_pct(qr, br) if br > 0 else np.nan
        out["paired_drift_pct"][i] = paired_drift_pct([base[k] for k in idx], [quant[k] for k in idx])
    return out


def clap_scores(checkpoint: str, prompts: Sequence[str], sets: dict[str, Sequence[np.ndarray]], sr: int,
                device: str = "cpu", embedder=None) -> dict[str, float]:
    """CLAP score of each set: mean cosine similarity between a clip and its prompt's text.

    Args:
        checkpoint: Local ``ClapModel`` folder with its feature extractor and tokenizer.
        prompts: Prompt of each clip (every set is paired with ``prompts`` by index).
        sets: Clips by set name.
        sr: Sampling rate of the clips.
        device: ``cpu`` or ``cuda``.
        embedder: An already loaded :class:`~adm_export.eval.embedders.ClapAudioEmbedder` to reuse.

    Returns:
        ``{set name: mean cosine}`` (in [-1, 1]; higher means the audio matches its text better).

    Raises:
        InvalidInputError: The folder is not a loadable CLAP model or has no tokenizer.
    """
    import torch
    from transformers import AutoTokenizer

    from adm_export.eval.embedders import ClapAudioEmbedder

    if not Path(checkpoint).is_dir():
        raise InvalidInputError(
            f"--clap-checkpoint {checkpoint!r} is not a folder; give a local ClapModel folder (weights cannot be "
            "downloaded here)"
        )
    audio = embedder if isinstance(embedder, ClapAudioEmbedder) else ClapAudioEmbedder(checkpoint, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(
            f"--clap-checkpoint {checkpoint!r} has no usable tokenizer (needed for the CLAP score): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    with torch.inference_mode():
        tokens = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(audio.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        text = audio.model.get_text_features(**tokens)
        if not isinstance(text, torch.Tensor):  # transformers >= 5: a model output
            text = text.pooler_output
        text = text.double().cpu().numpy()
    text /= np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    scores = {}
    for name, waves in sets.items():
        a = audio.embed(waves, sr)
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        scores[name] = float(np.mean(np.sum(a * text[: len(a)], axis=1)))
    return scores


#: Gated metrics: (result key, config field, CLI flag, what it measures).
GATED = (
    ("fd_increase_pct", "max_fd_increase", "--max-fd-increase",
     "how much further from the reference the engine's clips are than the baseline's (FD)"),
    ("paired_drift_pct", "max_drift", "--max-drift",
     "how far each engine clip is from its own baseline clip, relative to the spread of the set"),
)


def _check(metric: str, flag: str, interval: dict, thr: float) -> dict:
    value, ci = interval.get("estimate"), interval.get("ci")
    if value is None or not np.isfinite(value):
        return {"metric": metric, "flag": flag, "value": None, "threshold": thr, "ci": None, "passed": False,
                "excess": None, "message": f"{metric} could not be computed, so the gate cannot pass"}
    passed = bool(value <= thr)
    ci_txt = f" (95% interval {ci[0]:.1f} to {ci[1]:.1f}%)" if ci else ""
    if passed:
        msg = f"{metric} {value:.1f}%{ci_txt} is within {flag} {thr:g}% (margin {thr - value:.1f} points)"
    else:
        msg = f"{metric} {value:.1f}%{ci_txt} exceeds {flag} {thr:g}% by {value - thr:.1f} points"
    if ci and ci[0] <= thr <= ci[1]:
        msg += " [the threshold lies inside the interval: the verdict could flip with other seeds or more clips]"
    return {"metric": metric, "flag": flag, "value": value, "threshold": thr, "ci": ci, "passed": passed,
            "excess": value - thr, "message": msg}


def _gate(cfg: EvalConfig, intervals: dict, nonfinite: list[int], num_clips: int) -> dict:
    """The quality gate's verdict, with one entry per check and a sentence saying what failed.

    ``metric`` / ``value`` / ``ci`` / ``threshold`` describe ``fd_increase_pct`` (the DESIGN.md
    contract); ``checks`` lists every gated metric and ``failed`` the names of those that failed.
    """
    checks: list[dict] = []
    if nonfinite:
        checks.append({
            "metric": "finite_output", "flag": None, "value": len(nonfinite), "threshold": 0, "ci": None,
            "passed": False, "excess": len(nonfinite),
            "message": f"the engine produced NaN/inf samples in {len(nonfinite)} of {num_clips} clips "
                       f"(clips {nonfinite[:8]}); no metric can be computed on them",
        })
    else:
        for metric, field, flag, _ in GATED:
            thr = getattr(cfg, field)
            if thr is not None:
                checks.append(_check(metric, flag, intervals.get(metric) or {}, thr))
    failed = [c for c in checks if not c["passed"]]
    increase = intervals.get("fd_increase_pct") or {}
    return {
        "metric": "fd_increase_pct",
        "value": increase.get("estimate"),
        "ci": increase.get("ci"),
        "threshold": cfg.max_fd_increase,
        "passed": not failed,
        "failed": [c["metric"] for c in failed],
        "checks": checks,
        "message": "; ".join(c["message"] for c in failed) if failed else
        ("; ".join(c["message"] for c in checks) or "no gate threshold set"),
    }


def score_clips(cfg: EvalConfig, prompts: Sequence[str], baseline: Sequence[np.ndarray],
                quantized: Sequence[np.ndarray], reference: Sequence[np.ndarray], sr: int, embedder,
                reference_info: dict, embedded: Sequence | None = None) -> dict:
    """Every clip-level metric and the gate, from the three sets of clips.

    Args:
        cfg: Evaluation settings (bootstrap size, FD-inf, CLAP checkpoint, gate threshold, seed).
        prompts: Prompt of each baseline / quantized clip.
        baseline: Full-precision clips.
        quantized: The engine's clips, paired with ``baseline`` by index (same prompt and seed).
        reference: Reference clips (a folder, or a baseline draw with other seeds).
        sr: Sampling rate of all clips.
        embedder: An :class:`~adm_export.eval.embedders.Embedder`.
        reference_info: ``{"kind": "folder" | "baseline_other_seeds", ...}``; a baseline draw is
            paired with ``baseline`` by prompt (KL, bootstrap).
        embedded: Per set (baseline, quantized, reference), its ``(fd_rows_per_clip, logits)`` when
            already embedded (where the clips were generated, split over ranks), or ``None``.

    Returns:
        The metrics part of the ``eval`` result (FDs with intervals, KL, IS, CLAP, FD-inf, gate).

    Raises:
        InvalidInputError: The reference is indistinguishable from the baseline (the FD increase
            is undefined), or the baseline / reference clips are broken.
    """
    from adm_export.eval import fd as fdlib

    if len(baseline) != len(quantized):
        raise InvalidInputError(f"{len(baseline)} baseline clips but {len(quantized)} quantized clips; pair them")
    ref_paired = reference_info.get("kind") == "baseline_other_seeds" and len(reference) == len(baseline)
    nonfinite = [i for i, w in enumerate(quantized) if not np.isfinite(np.asarray(w)).all()]
    result: dict[str, Any] = {
        "embedder": embedder.name,
        "embedder_weight_free": bool(embedder.weight_free),
        "embedder_description": embedder.description,
        "fd_kind": "FAD on VGGish frame embeddings" if callable(getattr(embedder, "frame_embeddings", None))
        else f"FD on {embedder.name} clip embeddings",
        "nonfinite_quantized_clips": nonfinite,
        "bootstrap": {
            "n_boot": cfg.n_boot, "ci": CI, "seed": cfg.seed,
            "method": "percentile interval shifted by the bootstrap median bias (centred on the estimate)",
            "resampling": "whole clips; baseline and quantized with the same indices (paired by prompt and seed); "
                          + ("the reference draw with the same indices (paired by prompt)" if ref_paired
                             else "the reference folder independently"),
        },
    }
    keys = ("fd_quantized_vs_baseline", "fd_baseline_vs_ref", "fd_quantized_vs_ref", "fd_increase_pct",
            "paired_drift_pct")
    if nonfinite:
        logger.error("eval: the engine produced non-finite audio in clips %s", nonfinite)
        intervals = {k: _interval(None, np.empty(0), CI, None) for k in keys}
        result.update({k: None for k in keys})
        result.update({"fd_quantized_vs_baseline_ci": None, "fd_increase_pct_ci": None,
                       "paired_drift_pct_ci": None, "fd_warning": None, "intervals": intervals})
        result["gate"] = _gate(cfg, intervals, nonfinite, len(quantized))
        return result

    # 1. Embeddings (and class logits where the embedder has a head).
    embedded = list(embedded) if embedded is not None else [None, None, None]
    (b_blocks, b_logits), (q_blocks, q_logits), (r_blocks, r_logits) = (
        e if e else _embed_set(embedder, w, sr) for w, e in zip((baseline, quantized, reference), embedded))
    b_rows, q_rows, r_rows = (np.concatenate(x) for x in (b_blocks, q_blocks, r_blocks))

    # 2. Point estimates (the cross-checked FD on the full sets).
    fd_qb = fdlib.frechet_distance(q_rows, b_rows)
    fd_br = fdlib.frechet_distance(b_rows, r_rows)
    fd_qr = fdlib.frechet_distance(q_rows, r_rows)
    scale = float(np.trace(np.atleast_2d(np.cov(b_rows, rowvar=False)))
                  + np.trace(np.atleast_2d(np.cov(r_rows, rowvar=False))))
    if fd_br <= DEGENERATE_REF_RTOL * max(scale, 1e-300):
        raise InvalidInputError(
            f"the reference clips are indistinguishable from the baseline clips (FD {fd_br:.3g}); the FD "
            "increase is undefined: give --reference a folder of independent clips, or leave it out"
        )
    increase = _increase_pct(fd_qr, fd_br)
    drift = paired_drift_pct(b_blocks, q_blocks)

    # 3. Bootstrap intervals (clips resampled with their pairing).
    boots = bootstrap_fds(b_blocks, q_blocks, r_blocks, ref_paired, cfg.n_boot, cfg.seed)
    estimates = {"fd_quantized_vs_baseline": fd_qb, "fd_baseline_vs_ref": fd_br, "fd_quantized_vs_ref": fd_qr,
                 "fd_increase_pct": increase, "paired_drift_pct": drift}
    intervals = {k: _interval(estimates[k], boots[k], CI, None if k == "fd_increase_pct" else 0.0) for k in keys}
    warning = fdlib._rank_warning(min(len(b_rows), len(q_rows)), len(r_rows), b_rows.shape[1])
    if warning:
        logger.warning("eval: %s", warning)
    shifted = [k for k in keys if intervals[k]["estimate_in_percentile_ci"] is False]
    if shifted:
        logger.info("eval: the bootstrap percentile interval excludes the estimate for %s (bias of resampled FD); "
                    "reporting bias-shifted intervals", ", ".join(shifted))
    result.update(estimates)
    result.update({
        "fd_quantized_vs_baseline_ci": intervals["fd_quantized_vs_baseline"]["ci"],
        "fd_increase_pct_ci": intervals["fd_increase_pct"]["ci"],
        "paired_drift_pct_ci": intervals["paired_drift_pct"]["ci"],
        "fd_warning": warning,
        "fd_rows": {"baseline": len(b_rows), "quantized": len(q_rows), "reference": len(r_rows),
                    "dim": int(b_rows.shape[1])},
        "intervals": intervals,
        "percentile_ci_excludes_estimate": shifted,
    })

    # 4. FD-inf (1/N extrapolation), on request.
    if cfg.fd_inf:
        fd_inf = {
            "fd_quantized_vs_baseline": fd_infinity_paired(q_blocks, b_blocks, True, cfg.seed),
            "fd_baseline_vs_ref": fd_infinity_paired(b_blocks, r_blocks, ref_paired, cfg.seed),
            "fd_quantized_vs_ref": fd_infinity_paired(q_blocks, r_blocks, ref_paired, cfg.seed),
        }
        result["fd_inf"] = fd_inf
        br_inf, qr_inf = fd_inf["fd_baseline_vs_ref"].get("fd_inf"), fd_inf["fd_quantized_vs_ref"].get("fd_inf")
        result["fd_inf_increase_pct"] = (_increase_pct(qr_inf, br_inf) if br_inf is not None and qr_inf is not None
                                         and br_inf > 0 else None)

    # 5. Class-logit metrics: KL paired by prompt and seed, inception score.
    if b_logits is not None and q_logits is not None:
        kl = {"quantized_vs_baseline": fdlib.kl_paired(q_logits, b_logits),
              "quantized_vs_baseline_sigmoid": fdlib.kl_paired(q_logits, b_logits, activation="sigmoid")}
        if ref_paired and r_logits is not None:
            # Same prompts, other seeds: the KL two baseline draws already differ by (a noise floor).
            kl["baseline_vs_ref"] = fdlib.kl_paired(b_logits, r_logits)
            kl["quantized_vs_ref"] = fdlib.kl_paired(q_logits, r_logits)
        result["kl"] = kl
        result["kl_pairing"] = "by prompt and seed (quantized vs baseline); by prompt (vs a reference draw)"
        result["inception_score"] = {name: fdlib.inception_score(lg) for name, lg in
                                     (("baseline", b_logits), ("quantized", q_logits), ("reference", r_logits))
                                     if lg is not None}
    else:
        result["kl"] = None
        result["inception_score"] = None

    # 6. CLAP score when a CLAP checkpoint is given.
    clap_ckpt = cfg.clap_checkpoint or (cfg.embedder_checkpoint if embedder.name == "clap" else None)
    if clap_ckpt:
        sets = {"baseline": baseline, "quantized": quantized}
        if reference_info.get("kind") == "baseline_other_seeds":
            sets["reference"] = reference
        result["clap_score"] = clap_scores(clap_ckpt, prompts, sets, sr, cfg.device,
                                           embedder=embedder if embedder.name == "clap" else None)
    else:
        result["clap_score"] = None

    result["gate"] = _gate(cfg, intervals, [], len(quantized))
    return result


def latent_error(base_traj: np.ndarray, q_traj: np.ndarray) -> dict:
    """Relative L2 of the engine's x_t vs the baseline's at every step, summarised over clips."""
    diff = (q_traj - base_traj).reshape(q_traj.shape[0], q_traj.shape[1], -1).astype(np.float64)
    ref = base_traj.reshape(diff.shape).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        per_clip = np.linalg.norm(diff, axis=2) / np.maximum(np.linalg.norm(ref, axis=2), 1e-30)

    def clean(a) -> list:
        return [float(v) if np.isfinite(v) else None for v in a]

    mean = per_clip.mean(axis=0)
    return {
        "latent_rel_l2_per_step": clean(mean),
        "latent_rel_l2_per_step_median": clean(np.median(per_clip, axis=0)),
        "latent_rel_l2_per_step_p10": clean(np.quantile(per_clip, 0.1, axis=0)),
        "latent_rel_l2_per_step_p90": clean(np.quantile(per_clip, 0.9, axis=0)),
        "final_latent_rel_l2": clean(mean[-1:])[0],
    }


# ------------------------------------------------------------------------------------------------
# Figures and the stage itself
# ------------------------------------------------------------------------------------------------


def write_figures(folder: Path, result: dict, baseline: Sequence[np.ndarray], quantized: Sequence[np.ndarray],
                  sr: int, prompts: Sequence[str]) -> dict[str, str]:
    """Draw the eval figures into ``folder/figures``; returns their paths relative to ``folder``."""
    from adm_export.eval import figures

    fig_dir = Path(folder) / "figures"
    out = {}
    figures.spectrogram_grid(baseline, quantized, sr, prompts, fig_dir / "spectrograms.png", rows=SPECTROGRAM_ROWS)
    out["spectrograms"] = "figures/spectrograms.png"
    median = result.get("latent_rel_l2_per_step_median") or []
    if median and None not in median:
        figures.latent_error_curve(median, fig_dir / "latent_error.png", low=result["latent_rel_l2_per_step_p10"],
                                   high=result["latent_rel_l2_per_step_p90"], timesteps=result.get("timesteps"))
        out["latent_error"] = "figures/latent_error.png"
    figures.fd_interval_chart(fd_rows(result), fig_dir / "fd.png", gate=gate_row(result),
                              metric_name="FAD" if str(result.get("fd_kind", "")).startswith("FAD") else "FD")
    out["fd"] = "figures/fd.png"
    return out


def fd_rows(result: dict, prefix: str = "") -> list[dict]:
    """The rows of the FD chart of one eval result (``prefix`` names the configuration)."""
    ref = (result.get("reference") or {}).get("kind", "reference")
    ref_name = "reference folder" if ref == "folder" else "reference draw"
    intervals = result.get("intervals") or {}
    fd_inf = result.get("fd_inf") or {}
    rows = []
    for key, label in (("fd_quantized_vs_baseline", "quantized vs baseline"),
                       ("fd_baseline_vs_ref", f"baseline vs {ref_name}"),
                       ("fd_quantized_vs_ref", f"quantized vs {ref_name}")):
        rows.append({"label": prefix + label, "value": result.get(key), "ci": (intervals.get(key) or {}).get("ci"),
                     "fd_inf": (fd_inf.get(key) or {}).get("fd_inf")})
    return rows


def gate_row(result: dict) -> dict | None:
    """The gate panel of the FD chart: every gated metric with its interval and threshold."""
    gate = result.get("gate") or {}
    labels = {"fd_increase_pct": "FD increase", "paired_drift_pct": "paired drift"}
    checks = [{**c, "label": labels.get(c["metric"], c["metric"])} for c in gate.get("checks", [])
              if c["metric"] in labels and c.get("value") is not None]
    return {"passed": gate.get("passed"), "checks": checks} if checks else None


def evaluate(cfg: EvalConfig, engine_dir: str | Path, out: str | Path | None = None, force: bool = False,
             adapter=None, model_id: str | None = None, embedder=None) -> dict:
    """Run the ``eval`` stage and return its results (the ``eval`` section of the report).

    Args:
        cfg: Evaluation settings.
        engine_dir: Folder written by the ``engine`` stage.
        out: If given, a folder for ``eval.json``, ``report.json``, ``report.md``, ``figures/`` and
            the clips (``baseline/``, ``quantized/``).
        force: Overwrite ``out``.
        adapter: An already loaded model adapter (its denoiser must be the full-precision one).
        model_id: ``--model`` given by the user; must match the engine's model.
        embedder: An already built embedder (default: ``cfg.embedder`` via ``get_embedder``).

    Returns:
        The eval result; ``result["gate"]["passed"]`` is the quality gate's verdict.
    """
    from adm_export import distributed as dist

    if out is not None and not force:
        from adm_export.artifacts import prepare_out_dir

        prepare_out_dir(out, False)  # refuse a non-empty folder before the work (on every rank)
    # Under torchrun every rank generates its share of the clips; rank 0 scores and writes, and
    # every rank returns rank 0's result.
    with dist.shard_area(out):
        return dist.broadcast(_evaluate(cfg, engine_dir, out, force, adapter, model_id, embedder))


def _evaluate(cfg: EvalConfig, engine_dir: str | Path, out: str | Path | None, force: bool, adapter,
              model_id: str | None, embedder) -> dict | None:
    """:func:`evaluate` on one rank: the result on rank 0, ``None`` on the others."""
    from adm_export import distributed as dist
    from adm_export.artifacts import manifest_digest
    from adm_export.engines.onnxruntime import OrtOptions
    from adm_export.engines.stage import load_ort_denoiser, served_graph
    from adm_export.eval.embedders import get_embedder
    from adm_export.models import load_model, model_defaults

    start = time.perf_counter()
    # 1. Model, engine, embedder, prompts (and the reference folder, read before any generation).
    manifest = read_manifest(engine_dir, "engine", "--engine")
    # The engine is served exactly as `generate` serves it (same options, same checks, same
    # graph); each rank's engine runs on its own GPU (LOCAL_RANK; 0 in one process).
    options = OrtOptions.serving(cfg.device, device_id=dist.local_rank())
    served_graph(engine_dir, options, manifest)  # a CPU engine on --device cuda etc.: one line, before any work
    adapter = adapter or load_model(model_id or manifest["model"]["id"], cfg.device)
    denoiser, _ = load_ort_denoiser(engine_dir, adapter, cfg.device, options=options)
    defaults = model_defaults(adapter.model_id)
    embedder = embedder or get_embedder(cfg.embedder or defaults["embedder"], checkpoint=cfg.embedder_checkpoint,
                                        device=cfg.device)
    prompts = eval_prompts(cfg.num_clips, cfg.captions_file or defaults["captions"])
    seeds = [cfg.seed + i for i in range(cfg.num_clips)]
    sr = adapter.sampling_rate
    ref_wave = load_reference(cfg.reference_dir, sr) if cfg.reference_dir else None

    # 2. Baseline, engine and reference clips, same prompts and seeds for the first two.
    #    Each chunk's clips are embedded where they are generated (split over ranks with it).
    timesteps: list[float] = []
    embedding = (_embedder_identity(embedder, cfg), lambda waves: _embed_set(embedder, waves, sr))
    emb: list[list] = [[], [], []]
    base_wave, base_traj = _full_precision_run(adapter, prompts, seeds, cfg, "baseline", timesteps, embedding, emb[0])
    with adapter.using_denoiser(denoiser):
        q_wave, q_traj = generate_with_trajectory(adapter, prompts, seeds, cfg, "engine",
                                                  denoiser_key={"engine": manifest_digest(manifest)},
                                                  embedding=embedding, embedded=emb[1])
    if ref_wave is not None:
        reference = {"kind": "folder", "path": str(cfg.reference_dir), "clips": len(ref_wave)}
    else:
        ref_seeds = [s + REFERENCE_SEED_OFFSET for s in seeds]
        ref_wave, _ = _full_precision_run(adapter, prompts, ref_seeds, cfg, "reference draw", [], embedding, emb[2])
        reference = {"kind": "baseline_other_seeds", "clips": len(ref_wave), "seed_offset": REFERENCE_SEED_OFFSET}
    # Denoiser calls the engine made in this run, every rank's (chunks reused from shards made none).
    engine_calls = sum(dist.all_gather(int(denoiser.calls)))
    if not dist.is_main():
        return None

    # 3. Clip metrics and the gate; 4. the per-step latent error.
    scores = score_clips(cfg, prompts, base_wave, q_wave, ref_wave, sr, embedder, reference, embedded=emb)
    result = {
        "num_clips": cfg.num_clips,
        "steps": cfg.steps,
        "audio_seconds": cfg.audio_seconds,
        "precision": manifest.get("precision"),
        "reference": reference,
        "prompts": prompts,
        "seeds": seeds,
        **scores,
        **latent_error(base_traj, q_traj),
        "timesteps": timesteps,
        "engine_calls": engine_calls,
        "config": to_dict(cfg),
    }
    result["seconds"] = round(time.perf_counter() - start, 3)
    gate = result["gate"]
    logger.info("eval: %s(engine, baseline) %s; gate %s: %s", "FAD" if result["fd_kind"].startswith("FAD") else "FD",
                "–" if result["fd_quantized_vs_baseline"] is None else f"{result['fd_quantized_vs_baseline']:.4g}",
                "PASSED" if gate["passed"] else "FAILED", gate["message"])

    # 5. Artifacts: clips, figures, eval.json and the eval's own report.json / report.md.
    if out is not None:
        from adm_export.eval.report import make_report, write_report

        with atomic_dir(out, force=force) as tmp:
            write_clips(tmp / "baseline", base_wave, sr)
            write_clips(tmp / "quantized", q_wave, sr)
            if reference["kind"] == "baseline_other_seeds":
                write_clips(tmp / "reference", ref_wave, sr)
            result["figures"] = write_figures(tmp, result, base_wave, q_wave, sr, prompts)
            write_json(tmp / "eval.json", result)
            report = make_report(adapter.identity(), str(manifest.get("precision")), cfg.device,
                                 {"eval": result["seconds"]}, None, manifest, result, eval_dir="")
            write_report(tmp, report)
    return result
