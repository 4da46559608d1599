"""Activation-aware selection of calibration points from recorded activation statistics.

The quantize stage calibrates each activation quantizer with ModelOpt's ``max`` calibrator:
the scale of layer ``l`` is set by ``A_l(S) = max over the selected points S of absmax_l``. So
the selected set decides one number per layer, and a good set is one whose ``A_l`` serves *all*
recorded (prompt, step) inputs well, not only its own. The algorithm scores that directly.

**Error model** (per layer, from the statistics of :mod:`adm_export.calibration.stats`). Pool the
log2 histograms of ``|x|`` of one step over the prompts; with ``c_b`` the count and ``v_b`` the
centre of bin ``b`` and ``levels = 127`` (INT8, symmetric per-tensor), the mean squared
quantization error that a scale ``A`` causes at step ``s``, relative to that step's signal energy
``sum_b c_b v_b**2``, is estimated as::

    err_{l,s}(A) = [ sum_{v_b > A} c_b (v_b - A)**2                       clipping (range not covered)
                   + sum_{v_b <= A} c_b min(v_b**2, (A / levels)**2 / 12) ]  rounding (cost of the range)
                   / sum_b c_b v_b**2

``err(0) = 1``. Clipping falls and rounding grows with ``A``; the error is lowest somewhere below
the largest value ever seen when the top of the range is rare. Prefix sums over the bins make one
evaluation O(1) (:class:`ErrorModel`).

**Objective**: ``F(S) = mean_s mean_l err_{l,s}(A_l(S))``, the estimated relative
input-quantization error of the quantized layers, each step counting the same. Normalising per
step matters: layers on the residual stream see activations whose scale changes ~10x along the
trajectory (measured on the embedded model: ``down_blocks.0.downsamplers.0.conv`` reaches only
10% of its range at the first step); pooled over steps (``per_step=False``, energy weighted) the
small-signal steps barely count and a range set by the loud steps quantizes them coarsely.
With ``rounding=False`` only the clipping term is kept: that is weighted max-coverage of the
per-layer ranges (a range bin is "covered" when a selected point reaches it; missing it costs
its clipping loss), COVERCAL's formulation, which always prefers the widest range.

**Algorithm** (``select_activation``):

1. *Ranges* (greedy): start from ``S = {}``, ``A = 0``; add the point with the largest decrease
   of ``F`` while one decreases it. Adding point ``i`` changes layer ``l`` only if
   ``absmax[i, l] > A_l``, and then to the tabulated ``err_l(absmax[i, l])``, so one step costs
   ``O(points * layers)`` after a one-off table of ``O(points * steps * layers)`` (prefix sums).
2. *Swaps*: replace a selected point by an unselected one while that lowers ``F`` (a few passes;
   greedy on a non-monotone objective can overshoot a layer's best range).
3. *Distribution* (fill the remaining budget): among points that keep ``F`` within
   ``1 + fill_tolerance`` of stage 2's value, add the one that makes the selected points' pooled
   per-layer histograms (coarsened to one bin per octave) closest to the pooled histograms of
   all points, by mean KL divergence. The ``max`` calibrator only sees the ranges, but
   distribution-based calibrators (percentile, MSE, SmoothQuant, AWQ) see the whole set, and
   these points represent the steps and prompts that stage 1 did not need.

Deterministic: ties go to the earlier (prompt, step); no random numbers are drawn. Measured cost
at AudioLDM-S scale (64 prompts x 50 steps x 242 layers, K = 64, synthetic statistics): 4.5 s on
one CPU core, no memory beyond the statistics' own 403 MB worth mentioning.

Limits: the error model is INT8 (and W4A8's INT8 activations) with per-tensor ``max``
calibration; FP8's relative rounding is not modelled (``levels`` only changes the step). All
layers weigh the same; the network's sensitivity to each layer is not measured here. On the
ablation (``benchmarks/calibration_ablation.py``) the model's held-out estimate ranks the
selections as the measured U-Net error does with Spearman 0.83 (CPU, tiny) and 0.66 (AudioLDM-S
sized, H200).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from adm_export.calibration.stats import ActivationStats, memory_bytes

logger = logging.getLogger(__name__)

INT8_LEVELS = 127
_CHUNK = 64  # candidates per vectorised block of the error table (bounds its temporary memory)


@dataclasses.dataclass(frozen=True)
class SelectionResult:
    """Outcome of :func:`select_activation`.

    Attributes:
        points: Selected (prompt, step) pairs, sorted.
        order: The same pairs in the order they were chosen (after swaps).
        range_points: How many were chosen by stages 1-2 (the ranges); the rest fill by distribution.
        objective: ``F`` of the selection (estimated relative input error, mean over layers).
        objective_all: ``F`` of every recorded point (what ``--select all`` would give).
        swaps: Improving swaps made in stage 2.
    """

    points: list[tuple[int, int]]
    order: list[tuple[int, int]]
    range_points: int
    objective: float
    objective_all: float
    swaps: int

    def to_dict(self) -> dict:
        return {
            "range_points": self.range_points,
            "objective": self.objective,
            "objective_all_points": self.objective_all,
            "swaps": self.swaps,
            "order": [list(p) for p in self.order],
        }


# -- error model ---------------------------------------------------------------------------------
class ErrorModel:
    """``err_{l,s}(A)`` of every layer and step group from prefix sums of the pooled histograms.

    With ``c_b``, ``v_b`` the counts and bin centres, ``j`` the number of bins with ``v_b <= A``
    and ``m`` the number with ``v_b < A / (levels * sqrt(12))``, and ``P_k[i] = sum_{b < i} c_b v_b**k``::

        clip  = (P2[B] - P2[j]) - 2 A (P1[B] - P1[j]) + A**2 (P0[B] - P0[j])
        round = P2[m] + (A / levels)**2 / 12 * (P0[j] - P0[m])
        err   = (clip + round) / P2[B]

    so one evaluation is O(1) after O(bins) prefix sums, whatever the number of candidates.

    Args:
        stats: Recorded statistics.
        levels: Positive quantization levels (127: INT8).
        rounding: Include the rounding term (``False``: clipping only).
        per_step: Normalise per step (pooled over prompts), then average over steps, so that
            every step's relative error counts the same; ``False`` pools all steps (energy
            weighted: steps whose activations are small count little).
    """

    def __init__(self, stats: ActivationStats, levels: int = INT8_LEVELS, rounding: bool = True,
                 per_step: bool = True):
        # Points never recorded hold zeros, so summing over prompts needs no (copying) mask.
        h = stats.hist.sum(axis=0, dtype=np.float64)  # (steps, layers, bins)
        h = h[h.sum(axis=(1, 2)) > 0]
        if not per_step:
            h = h.sum(axis=0, keepdims=True)
        self.v = stats.grid.centers()
        self.levels = levels
        self.rounding = rounding
        zero = np.zeros(h.shape[:-1] + (1,))
        self.p0 = np.concatenate([zero, np.cumsum(h, axis=-1)], axis=-1)  # (G, L, B + 1)
        self.p1 = np.concatenate([zero, np.cumsum(h * self.v, axis=-1)], axis=-1)
        self.p2 = np.concatenate([zero, np.cumsum(h * self.v**2, axis=-1)], axis=-1)
        self.energy = np.maximum(self.p2[..., -1], 1e-300)  # (G, L)
        self.groups = h.shape[0]

    def per_group(self, amax: np.ndarray) -> np.ndarray:
        """``err`` for ranges ``amax`` of shape ``(n, layers)`` -> ``(groups, n, layers)``."""
        amax = np.asarray(amax, dtype=np.float64)
        n, n_layers = amax.shape
        j = np.searchsorted(self.v, amax, side="right")  # (n, L)
        lidx = np.broadcast_to(np.arange(n_layers), (n, n_layers))
        take = lambda p, i: p[:, lidx, i]  # noqa: E731  (G, n, L)
        last = self.p0.shape[-1] - 1
        tot = lambda p: p[:, None, :, last]  # noqa: E731
        clip = (tot(self.p2) - take(self.p2, j)) - 2 * amax * (tot(self.p1) - take(self.p1, j)) \
            + amax**2 * (tot(self.p0) - take(self.p0, j))
        total = np.maximum(clip, 0.0)  # cancellation can leave -1e-16 where nothing is clipped
        if self.rounding:
            step2 = (amax / self.levels) ** 2 / 12.0
            m = np.minimum(np.searchsorted(self.v, np.sqrt(step2), side="left"), j)
            total = total + take(self.p2, m) + step2 * (take(self.p0, j) - take(self.p0, m))
        return total / self.energy[:, None, :]

    def __call__(self, amax: np.ndarray) -> np.ndarray:
        """Mean over step groups: ``(n, layers)`` -> ``(n, layers)`` (or ``(layers,)`` -> ``(layers,)``)."""
        amax = np.asarray(amax, dtype=np.float64)
        if amax.ndim == 1:
            return self(amax[None])[0]
        out = np.empty(amax.shape)
        for start in range(0, amax.shape[0], _CHUNK):
            out[start:start + _CHUNK] = self.per_group(amax[start:start + _CHUNK]).mean(axis=0)
        return out


def errors_for_amax(stats: ActivationStats, amax: np.ndarray, levels: int = INT8_LEVELS,
                    rounding: bool = True, per_step: bool = True) -> np.ndarray:
    """Estimated relative input error per layer of the recorded distribution under ranges ``amax``.

    ``amax`` may come from another run (e.g. the ranges calibrated on one prompt set, scored on
    the statistics of held-out trajectories).

    Returns:
        ``(layers,)`` float64 ``err_l(amax_l)`` (mean over steps, see :class:`ErrorModel`).
    """
    return ErrorModel(stats, levels, rounding, per_step)(np.asarray(amax, dtype=np.float64))


def layer_errors(stats: ActivationStats, points: Sequence[tuple[int, int]], levels: int = INT8_LEVELS,
                 rounding: bool = True, per_step: bool = True) -> np.ndarray:
    """Estimated relative input error per layer when calibrating (``max``) on ``points``.

    Args:
        stats: Recorded statistics.
        points: (prompt, step) pairs the quantizers are calibrated on.
        levels: Positive quantization levels (127 for INT8).
        rounding: Include the rounding term (``False``: clipping only).
        per_step: Average per-step relative errors (``False``: pool all steps).

    Returns:
        ``(layers,)`` float64, each ``err_l(A_l(points))`` over the whole recorded distribution.
    """
    idx = tuple(np.array(points, dtype=int).reshape(-1, 2).T)
    amax = stats.absmax[idx].max(axis=0) if len(points) else np.zeros(len(stats.layers))
    return errors_for_amax(stats, amax, levels, rounding, per_step)


# -- selection -----------------------------------------------------------------------------------
def _state(sel: list[int], absmax: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Current ranges ``A`` and per-layer errors of a selection (index of the max per layer)."""
    n_layers = absmax.shape[1]
    if not sel:
        return np.zeros(n_layers), np.ones(n_layers)
    s = np.array(sel)
    arg = s[np.argmax(absmax[s], axis=0)]
    cols = np.arange(n_layers)
    return absmax[arg, cols], table[arg, cols]


def _gains(amax: np.ndarray, cur: np.ndarray, absmax: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Decrease of ``F`` (mean over layers) from adding each candidate to the current selection."""
    raise_ = absmax > amax[None, :]
    return np.where(raise_, cur[None, :] - table, 0.0).mean(axis=1)


def _coarse(hist: np.ndarray, per_octave: int) -> np.ndarray:
    """Merge ``per_octave`` fine bins into one (last axis)."""
    *lead, b = hist.shape
    return hist.reshape(*lead, b // per_octave, per_octave).sum(axis=-1)


def _kl_to(target: np.ndarray, counts: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Mean over layers of ``KL(target_l || normalised counts_l)``; ``counts`` is ``(..., L, B)``."""
    q = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1e-300)
    q = (q + eps) / (1.0 + eps * q.shape[-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(target > 0, target * np.log(target / q), 0.0)
    return terms.sum(axis=-1).mean(axis=-1)


def select_activation(stats: ActivationStats, k: int, *, levels: int = INT8_LEVELS, rounding: bool = True,
                      per_step: bool = True, fill_tolerance: float = 0.02, refine_passes: int = 4) -> SelectionResult:
    """Select ``k`` (prompt, step) points whose calibration serves every recorded input (module doc).

    Args:
        stats: Statistics of every (prompt, step) of the sampler runs.
        k: Budget; capped by the number of recorded points.
        levels: Positive quantization levels of the activation format (127: INT8).
        rounding: Keep the rounding term of the error model (``False``: COVERCAL-style range
            coverage, which always prefers the widest ranges).
        per_step: Every step's relative error counts the same (``False``: pool all steps,
            energy weighted).
        fill_tolerance: Stage 3 may raise ``F`` by at most this fraction.
        refine_passes: Passes of improving swaps in stage 2 (0 disables them).

    Returns:
        The selection and its objective values.
    """
    p_n, s_n, l_n = stats.shape
    cand = np.flatnonzero(stats.recorded.reshape(-1))  # flat point ids in (prompt, step) order
    absmax_all, _, hist_all = stats.flat()
    absmax = absmax_all[cand].astype(np.float64)
    table = ErrorModel(stats, levels, rounding, per_step)(absmax)  # T[i, l] = err_l(absmax[i, l])
    k = min(k, len(cand))

    # 1. Ranges: greedy on F.
    sel: list[int] = []
    amax, cur = _state(sel, absmax, table)
    while len(sel) < k:
        g = _gains(amax, cur, absmax, table)
        g[sel] = -np.inf
        best = int(np.argmax(g))
        if g[best] <= 1e-12:
            break
        sel.append(best)
        amax, cur = _state(sel, absmax, table)

    # 2. Swaps: replace one selected point by a better one while F drops.
    swaps = 0
    for _ in range(refine_passes):
        improved = False
        for j in range(len(sel)):
            rest = sel[:j] + sel[j + 1:]
            amax_r, cur_r = _state(rest, absmax, table)
            g = _gains(amax_r, cur_r, absmax, table)
            g[rest] = -np.inf
            best = int(np.argmax(g))
            f_now, f_new = cur.mean(), cur_r.mean() - g[best]
            if best != sel[j] and f_new < f_now - 1e-12 * max(f_now, 1e-30):
                sel[j] = best
                amax, cur = _state(sel, absmax, table)
                swaps += 1
                improved = True
        if not improved:
            break
    range_points = len(sel)
    f_ranges = float(cur.mean()) if sel else 1.0

    # 3. Distribution: fill the budget with points that keep the ranges and match the pooled
    #    histograms of all points.
    if len(sel) < k:
        bpo = stats.grid.bins_per_octave
        # Coarsen before indexing: the fine histograms are the bulk of the statistics' memory.
        coarse = _coarse(hist_all, bpo)[cand]  # (N, L, bins / bins_per_octave), float32
        target = coarse.sum(axis=0, dtype=np.float64)
        target = target / np.maximum(target.sum(axis=-1, keepdims=True), 1e-300)
        counts = coarse[sel].sum(axis=0, dtype=np.float64) if sel else np.zeros_like(target)
        limit = f_ranges * (1.0 + fill_tolerance)
        while len(sel) < k:
            f_new = cur.mean() - _gains(amax, cur, absmax, table)
            f_new[sel] = np.inf
            ok = np.flatnonzero(f_new <= limit)
            if ok.size == 0:  # every remaining point widens a range too much: take the least harmful
                ok = np.flatnonzero(f_new == f_new.min())
            kl = np.concatenate([_kl_to(target, counts[None] + coarse[ok[i:i + _CHUNK]])
                                 for i in range(0, ok.size, _CHUNK)])
            best = int(ok[int(np.argmin(kl))])
            sel.append(best)
            counts = counts + coarse[best]
            amax, cur = _state(sel, absmax, table)

    order = [(int(cand[i]) // s_n, int(cand[i]) % s_n) for i in sel]
    everything = list(range(len(cand)))
    _, cur_all = _state(everything, absmax, table)
    result = SelectionResult(points=sorted(order), order=order, range_points=range_points,
                             objective=float(cur.mean()), objective_all=float(cur_all.mean()), swaps=swaps)
    logger.info("activation selection: %d points (%d for the ranges, %d swaps); estimated input error %.3g "
                "(all points: %.3g)", len(order), range_points, swaps, result.objective, result.objective_all)
    return result


# -- summary for the manifest --------------------------------------------------------------------
def summarize(stats: ActivationStats, points: Sequence[tuple[int, int]],
              quantiles: Sequence[float] = (0.5, 0.99, 0.999, 0.9999), levels: int = INT8_LEVELS) -> dict:
    """Statistics summary of a run and of a selection, for the cache manifest.

    Args:
        stats: Recorded statistics.
        points: The selected (prompt, step) pairs.
        quantiles: Quantiles of ``|x|`` reported per layer (from the histograms).
        levels: Positive quantization levels of the error model.

    Returns:
        JSON-serialisable dict: the memory used, the estimated input error of the selection and
        of all points, how much of each layer's range the selection reaches, the per-step range
        profile and per-layer numbers.
    """
    p_n, s_n, l_n = stats.shape
    rec = stats.recorded
    idx = tuple(np.array(points, dtype=int).reshape(-1, 2).T)
    gmax = stats.absmax[rec].max(axis=0).astype(np.float64)
    smax = stats.absmax[idx].max(axis=0).astype(np.float64)
    cover = smax / np.maximum(gmax, 1e-30)
    err_sel = layer_errors(stats, points, levels)
    all_points = [tuple(x) for x in np.argwhere(rec)]
    err_all = layer_errors(stats, all_points, levels)
    clip_sel = layer_errors(stats, points, levels, rounding=False)
    q = stats.quantiles(quantiles)
    numel = stats.hist.sum(axis=(0, 1, 3), dtype=np.float64)  # unrecorded points hold zeros
    rms = np.sqrt(stats.sumsq.sum(axis=(0, 1), dtype=np.float64) / np.maximum(numel, 1))
    # How wide each step's ranges are relative to the widest step: max over prompts, then the mean
    # over layers of absmax / global absmax.
    step_max = np.where(rec[..., None], stats.absmax, 0).max(axis=0) / np.maximum(gmax, 1e-30)
    r = lambda x: float(f"{float(x):.4g}")  # noqa: E731
    return {
        "layers": l_n,
        "grid": stats.grid.to_dict(),
        "recorded_points": int(rec.sum()),
        "memory_bytes": stats.nbytes,
        "memory_bound": {"formula": "prompts * steps * layers * (bins + 2) * 4 bytes",
                         "bytes": memory_bytes(p_n, s_n, l_n, stats.grid)},
        "error_model": f"per-tensor symmetric, {levels} levels, max calibration; relative MSE of layer inputs",
        "estimated_input_error": {"selected": r(err_sel.mean()), "all_points": r(err_all.mean()),
                                  "selected_clipping_only": r(clip_sel.mean())},
        "range_coverage": {"mean": r(cover.mean()), "min": r(cover.min()),
                           "layers_full": int((cover >= 0.999).sum()), "layers_below_90pct": int((cover < 0.9).sum())},
        "per_step_range": [r(x) for x in step_max.mean(axis=1)],
        "per_layer": [
            {"name": name, "absmax": r(gmax[i]), "absmax_selected": r(smax[i]), "rms": r(rms[i]),
             "quantiles": {str(qq): r(q[i, j]) for j, qq in enumerate(quantiles)},
             "est_error_selected": r(err_sel[i]), "est_error_all": r(err_all[i])}
            for i, name in enumerate(stats.layers)
        ],
    }
