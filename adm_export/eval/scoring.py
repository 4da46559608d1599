"""Scoring of the eval stage's clips: every clip-level metric and the gate, from three sets of clips.

No model is involved (testable with any embedder); the clips come from
:mod:`adm_export.eval.harness`. What is measured:

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
from typing import Any, Sequence

import numpy as np

from adm_export.config import EvalConfig
from adm_export.errors import InvalidInputError
from adm_export.eval import fd as fdlib
from adm_export.eval.embedders.clap import clap_scores
from adm_export.eval.fd import bootstrap_fds, fd_infinity_paired, increase_pct, interval, paired_drift_pct
from adm_export.eval.gate import gate_verdict

logger = logging.getLogger(__name__)

#: FD(baseline, reference) below this fraction of the sets' total variance means the reference
#: is a copy of the baseline: the relative FD increase is then undefined.
DEGENERATE_REF_RTOL = 1e-6
#: Central coverage of every bootstrap interval.
CI = 0.95


def embed_set(embedder, waves: Sequence[np.ndarray], sr: int) -> tuple[list[np.ndarray], np.ndarray | None]:
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
        intervals = {k: interval(None, np.empty(0), CI, None) for k in keys}
        result.update({k: None for k in keys})
        result.update({"fd_quantized_vs_baseline_ci": None, "fd_increase_pct_ci": None,
                       "paired_drift_pct_ci": None, "fd_warning": None, "intervals": intervals})
        result["gate"] = gate_verdict(cfg, intervals, nonfinite, len(quantized))
        return result

    # 1. Embeddings (and class logits where the embedder has a head).
    embedded = list(embedded) if embedded is not None else [None, None, None]
    (b_blocks, b_logits), (q_blocks, q_logits), (r_blocks, r_logits) = (
        e if e else embed_set(embedder, w, sr) for w, e in zip((baseline, quantized, reference), embedded))
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
    increase = increase_pct(fd_qr, fd_br)
    drift = paired_drift_pct(b_blocks, q_blocks)

    # 3. Bootstrap intervals (clips resampled with their pairing).
    boots = bootstrap_fds(b_blocks, q_blocks, r_blocks, ref_paired, cfg.n_boot, cfg.seed)
    estimates = {"fd_quantized_vs_baseline": fd_qb, "fd_baseline_vs_ref": fd_br, "fd_quantized_vs_ref": fd_qr,
                 "fd_increase_pct": increase, "paired_drift_pct": drift}
    intervals = {k: interval(estimates[k], boots[k], CI, None if k == "fd_increase_pct" else 0.0) for k in keys}
    warning = fdlib.rank_warning(min(len(b_rows), len(q_rows)), len(r_rows), b_rows.shape[1])
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
        result["fd_inf_increase_pct"] = (increase_pct(qr_inf, br_inf) if br_inf is not None and qr_inf is not None
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

    result["gate"] = gate_verdict(cfg, intervals, [], len(quantized))
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
