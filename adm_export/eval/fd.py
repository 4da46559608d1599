"""Fréchet distance (FD / FAD) and the metrics reported beside it (paired KL, inception score).

Conventions follow ``audioldm_eval`` (the reference the AudioLDM / TANGO papers report with):

* FD compares the Gaussians fitted to two sets of embeddings:
  ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
* The trace of the matrix square root is computed twice, with ``scipy.linalg.sqrtm`` (what the
  field uses, with its ``eps * I`` fallback for singular products) and with a symmetric
  eigendecomposition (``S1^(1/2) S2 S1^(1/2)`` is symmetric PSD and has the eigenvalues of
  ``S1 S2``). SciPy's ``sqrtm`` has had regressions, so a disagreement raises
  :class:`FDNumericalError` instead of returning a wrong number. The eigendecomposition value is
  the one returned (it is exact for PSD inputs and needs no offset).
* FD is biased upward at small N (the covariance of N clips has rank N - 1): compare at equal N,
  report :func:`fd_bootstrap`'s interval, and use :func:`fd_infinity` (FAD-inf) to extrapolate.
* For the eval stage's paired sets (baseline and engine clips share prompts and seeds), the
  bootstrap and FD-inf resample whole clips and keep the pairs together (:func:`bootstrap_fds`,
  :func:`fd_infinity_paired`), intervals are centred on the estimate (:func:`interval`), and
  :func:`paired_drift_pct` measures how far each engine clip is from its own baseline clip.

All functions are pure numpy / scipy. This module is over 500 lines on purpose: it is the one home
of every FD statistic (estimators, cross-check, bootstraps, FD-inf, paired variants) and of the
two logit metrics reported beside FD.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np
import scipy
import scipy.linalg
from scipy import special

from adm_export.errors import InvalidInputError

logger = logging.getLogger(__name__)

#: Relative tolerance between the two ``Tr sqrt(S1 S2)`` computations. Healthy cases agree to
#: ~1e-6 even with rank-deficient covariances; a broken ``sqrtm`` is off by far more.
SQRTM_RTOL = 1e-3
#: Diagonal offset added when ``sqrtm`` of the product is not finite (pytorch-fid / audioldm_eval).
SINGULAR_EPS = 1e-6
#: Largest imaginary part tolerated on ``sqrtm``'s diagonal, relative to the real part.
IMAG_RTOL = 1e-3
#: audioldm_eval adds this to the predicted probabilities before the log in its KL.
KL_EPS = 1e-6


class FDNumericalError(RuntimeError):
    """The matrix square root is unreliable (methods disagree): the FD value cannot be trusted."""


# --------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------


def _as_matrix(x, what: str) -> np.ndarray:
    """Return ``x`` as a finite float64 ``(rows, features)`` array or raise a user error."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise InvalidInputError(
            f"{what} must be a 2-D array (clips, features), got shape {tuple(arr.shape)}; "
            "pass one embedding row per clip"
        )
    if not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.isfinite(arr).sum())
        raise InvalidInputError(
            f"{what} contains {bad} NaN/inf values; the audio given to the embedder is broken "
            "(check the engine output, --engine)"
        )
    return arr


def _check_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = _as_matrix(x, "x")
    y = _as_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise InvalidInputError(
            f"embedding sizes differ: x has {x.shape[1]} features, y has {y.shape[1]}; "
            "embed both sets with the same --embedder"
        )
    for what, arr in (("x", x), ("y", y)):
        if arr.shape[0] < 2:
            raise InvalidInputError(
                f"FD needs at least 2 clips per set to estimate a covariance, {what} has "
                f"{arr.shape[0]}; raise --num-clips"
            )
    return x, y


def rank_warning(n_x: int, n_y: int, dim: int) -> str | None:
    """Warning text when a covariance is rank-deficient (N clips give rank <= N - 1)."""
    if min(n_x, n_y) > dim:
        return None
    return (
        f"only {min(n_x, n_y)} clips for {dim}-dimensional embeddings: the covariance is "
        "rank-deficient and FD is strongly biased upward; compare FDs only at equal N, prefer "
        "fd_infinity, or raise --num-clips"
    )


# --------------------------------------------------------------------------------------------
# Core
# --------------------------------------------------------------------------------------------


def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a set of embeddings.

    Args:
        x: ``(N, D)`` embeddings, one row per clip (or frame), ``N >= 2``.

    Returns:
        ``(mu, sigma)``: float64 arrays of shapes ``(D,)`` and ``(D, D)``.

    Raises:
        InvalidInputError: ``x`` is not 2-D, not finite, or has fewer than 2 rows.
    """
    x = _as_matrix(x, "x")
    if x.shape[0] < 2:
        raise InvalidInputError(
            f"a covariance needs at least 2 clips, got {x.shape[0]}; raise --num-clips"
        )
    mu = x.mean(axis=0)
    sigma = np.atleast_2d(np.cov(x, rowvar=False))
    return mu, sigma


def _trace_sqrt_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """``Tr (S1 S2)^(1/2)`` via symmetric eigendecompositions (S1, S2 symmetric PSD).

    ``S1 S2`` and ``S1^(1/2) S2 S1^(1/2)`` share their eigenvalues; the latter is symmetric PSD, so
    its eigenvalues are real and non-negative and their square roots sum to the trace.
    """
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root @ s2 @ root
    ev = np.linalg.eigvalsh(0.5 * (m + m.T))
    # Tiny negative eigenvalues are rounding of zeros (rank-deficient covariances).
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def _trace_sqrt_scipy(s1: np.ndarray, s2: np.ndarray, eps: float) -> tuple[float, bool]:
    """``Tr (S1 S2)^(1/2)`` the way pytorch-fid / audioldm_eval compute it.

    Returns:
        The trace and whether the ``eps * I`` offset had to be added.
    """
    # Look sqrtm up at call time (not imported by name) so tests can substitute a broken one.
    with warnings.catch_warnings():
        # scipy warns on singular products; the cross-check is the real test of the result.
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        offset = False
        if not np.isfinite(covmean).all():
            logger.warning(
                "FD: sqrtm of the covariance product is not finite (singular product); "
                "adding %g to the diagonals, as pytorch-fid does",
                eps,
            )
            off = eps * np.eye(s1.shape[0])
            covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
            offset = True
    covmean = np.asarray(covmean)
    if not np.isfinite(covmean).all():
        raise FDNumericalError(
            "scipy.linalg.sqrtm returned non-finite values even with the diagonal offset "
            f"{eps:g}; the FD cannot be computed reliably (scipy {scipy.__version__})"
        )
    if np.iscomplexobj(covmean):
        diag = np.diagonal(covmean)
        worst = float(np.abs(diag.imag).max())
        if worst > IMAG_RTOL * max(1.0, float(np.abs(diag.real).max())):
            raise FDNumericalError(
                f"scipy.linalg.sqrtm returned an imaginary component of {worst:.3g} on the "
                f"diagonal; the FD cannot be trusted (scipy {scipy.__version__})"
            )
        # Numerical error gives a slight imaginary component: drop it, as the field does.
        covmean = covmean.real
    return float(np.trace(covmean)), offset


def frechet_distance_from_stats(
    mu1: np.ndarray,
    s1: np.ndarray,
    mu2: np.ndarray,
    s2: np.ndarray,
    *,
    eps: float = SINGULAR_EPS,
    rtol: float = SQRTM_RTOL,
) -> float:
    """Fréchet distance between two Gaussians, with a cross-checked matrix square root.

    Args:
        mu1: Mean of the first set, ``(D,)``.
        s1: Covariance of the first set, ``(D, D)``.
        mu2: Mean of the second set, ``(D,)``.
        s2: Covariance of the second set, ``(D, D)``.
        eps: Diagonal offset used when ``sqrtm`` of the product is not finite.
        rtol: Largest relative disagreement allowed between the ``sqrtm`` and the
            eigendecomposition value of ``Tr (S1 S2)^(1/2)``.

    Returns:
        ``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr (S1 S2)^(1/2)`` (never negative; rounding
        below zero is clipped).

    Raises:
        InvalidInputError: Shapes do not match.
        FDNumericalError: The two square-root methods disagree beyond ``rtol`` or ``sqrtm``
            returns a clearly complex or non-finite result.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(s1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(s2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or s1.shape != (d, d) or s2.shape != (d, d):
        raise InvalidInputError(
            f"Gaussian statistics do not match: means {mu1.shape} and {mu2.shape}, covariances "
            f"{s1.shape} and {s2.shape}; compute both with the same --embedder"
        )
    for what, arr in (("mu1", mu1), ("s1", s1), ("mu2", mu2), ("s2", s2)):
        if not np.isfinite(arr).all():
            raise InvalidInputError(f"{what} contains NaN/inf; the embeddings are broken")

    diff = mu1 - mu2
    tr_eig = _trace_sqrt_eigh(s1, s2)
    tr_scipy, offset = _trace_sqrt_scipy(s1, s2, eps)
    if offset:
        off = eps * np.eye(d)
        reference = _trace_sqrt_eigh(s1 + off, s2 + off)
    else:
        reference = tr_eig
    tr1, tr2 = float(np.trace(s1)), float(np.trace(s2))
    # The floor keeps the test meaningful when both traces are (almost) zero.
    scale = max(abs(reference), abs(tr_scipy), 1e-12 * (abs(tr1) + abs(tr2)))
    gap = abs(tr_scipy - reference)
    if gap > rtol * scale:
        raise FDNumericalError(
            f"matrix square root cross-check failed: Tr sqrt(S1 S2) = {tr_scipy!r} by "
            f"scipy.linalg.sqrtm but {reference!r} by eigendecomposition (relative difference "
            f"{gap / scale if scale else float('inf'):.3g} > {rtol:g}); the FD cannot be trusted "
            f"(scipy {scipy.__version__})"
        )
    fd = float(diff @ diff + tr1 + tr2 - 2.0 * tr_eig)
    return max(fd, 0.0)


def _reduce_dim(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project both sets onto the subspace that holds all their variation, when it is smaller.

    With ``n_x + n_y + 1 < D`` the centred rows and the mean difference span a subspace of
    dimension ``< D``; both covariances vanish outside it and the mean difference lies inside it,
    so FD is unchanged by the orthonormal projection (exact up to rounding) while the matrix
    functions shrink from ``D x D`` to at most ``(n_x + n_y + 1)``-square. The same basis also
    holds every bootstrap resample and subset of the two sets.
    """
    d = x.shape[1]
    if x.shape[0] + y.shape[0] + 1 >= d:
        return x, y
    mx, my = x.mean(axis=0), y.mean(axis=0)
    basis = np.concatenate([x - mx, y - my, (mx - my)[None, :]], axis=0).T
    q, _ = np.linalg.qr(basis, mode="reduced")
    return x @ q, y @ q


def _fd_eigh(x: np.ndarray, y: np.ndarray) -> float:
    """FD with the eigendecomposition square root only (the fast path for resampling loops)."""
    mu1, s1 = x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))
    mu2, s2 = y.mean(axis=0), np.atleast_2d(np.cov(y, rowvar=False))
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_eigh(s1, s2)
    return max(float(fd), 0.0)


def frechet_distance(x: np.ndarray, y: np.ndarray, **kwargs) -> float:
    """Fréchet distance between two sets of embeddings.

    Args:
        x: ``(N1, D)`` embeddings of the first set (e.g. the engine's clips).
        y: ``(N2, D)`` embeddings of the second set (e.g. the baseline's clips).
        **kwargs: ``eps`` and ``rtol`` of :func:`frechet_distance_from_stats`.

    Returns:
        The FD (same units as the squared embedding values).

    Raises:
        InvalidInputError: Malformed inputs or fewer than 2 rows per set.
        FDNumericalError: The matrix square root cross-check failed.
    """
    x, y = _check_pair(x, y)
    xr, yr = _reduce_dim(x, y)
    mu1, s1 = gaussian_stats(xr)
    mu2, s2 = gaussian_stats(yr)
    return frechet_distance_from_stats(mu1, s1, mu2, s2, **kwargs)


def fd_bootstrap(
    x: np.ndarray, y: np.ndarray, n_boot: int = 200, seed: int = 0, ci: float = 0.95
) -> dict:
    """FD with a percentile bootstrap interval (both sets resampled with replacement).

    The point estimate is :func:`frechet_distance` on the full sets. Each bootstrap draw
    resamples the rows of ``x`` and ``y`` independently and recomputes FD with the
    eigendecomposition square root (the value :func:`frechet_distance` cross-checks). Duplicated
    rows make resampled sets look less alike, so with few clips the interval sits above the point
    estimate: read it as a spread, and compare FDs only at equal N.

    Args:
        x: ``(N1, D)`` embeddings.
        y: ``(N2, D)`` embeddings.
        n_boot: Number of bootstrap draws (>= 1).
        seed: Seed of the resampling generator (deterministic output).
        ci: Central coverage of the interval, in (0, 1).

    Returns:
        ``{"fd", "ci_low", "ci_high", "n_x", "n_y", "dim", "warning", "ci", "n_boot",
        "boot_mean", "boot_std"}``; ``warning`` is a string when a covariance is rank-deficient
        (N <= D, FD strongly biased), else ``None``. The warning is also logged.
    """
    if int(n_boot) != n_boot or n_boot < 1:
        raise InvalidInputError(f"invalid n_boot {n_boot!r}: give a positive integer")
    if not 0.0 < ci < 1.0:
        raise InvalidInputError(f"invalid ci {ci!r}: give a coverage in (0, 1), e.g. 0.95")
    x, y = _check_pair(x, y)
    n_x, n_y, dim = x.shape[0], y.shape[0], x.shape[1]
    fd = frechet_distance(x, y)
    xr, yr = _reduce_dim(x, y)
    rng = np.random.default_rng(seed)
    boots = np.empty(int(n_boot))
    for b in range(int(n_boot)):
        ix = rng.integers(0, n_x, size=n_x)
        iy = rng.integers(0, n_y, size=n_y)
        boots[b] = _fd_eigh(xr[ix], yr[iy])
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    warning = rank_warning(n_x, n_y, dim)
    if warning:
        logger.warning("FD bootstrap: %s", warning)
    return {
        "fd": fd,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n_x": n_x,
        "n_y": n_y,
        "dim": dim,
        "warning": warning,
        "ci": float(ci),
        "n_boot": int(n_boot),
        "boot_mean": float(boots.mean()),
        "boot_std": float(boots.std(ddof=1)) if n_boot > 1 else 0.0,
    }


def fd_infinity(
    x: np.ndarray,
    y: np.ndarray,
    ns: Sequence[int] | None = None,
    seed: int = 0,
    n_trials: int = 10,
) -> dict:
    """FD extrapolated to infinitely many clips (FAD-inf, Gui et al. 2024).

    For each subset size ``n`` both sets are subsampled without replacement to ``n`` rows
    (``n_trials`` times, averaged); FD is fitted linearly against ``1/n`` and the intercept at
    ``1/n = 0`` is returned. The ``1/n`` model holds once ``n`` is well above the embedding
    dimension; below it FD is far from linear in ``1/n`` and the value is only indicative.

    Args:
        x: ``(N1, D)`` embeddings.
        y: ``(N2, D)`` embeddings.
        ns: Subset sizes, each in ``[2, min(N1, N2)]`` with at least two distinct values;
            default: 5 sizes evenly spaced from ``max(2, N // 4)`` to ``N = min(N1, N2)``.
        seed: Seed of the subsampling generator.
        n_trials: Subsets averaged per size (a size equal to both set sizes needs only one).

    Returns:
        ``{"fd_inf", "slope", "r2", "points", "n_x", "n_y", "dim", "warning"}`` where ``points``
        lists ``{"n", "inv_n", "fd", "fd_std", "trials"}`` for every size used.
    """
    x, y = _check_pair(x, y)
    n_x, n_y, dim = x.shape[0], y.shape[0], x.shape[1]
    n_max = min(n_x, n_y)
    if ns is None:
        lo = max(2, n_max // 4)
        ns = sorted({int(round(v)) for v in np.linspace(lo, n_max, 5)})
    ns = sorted({int(n) for n in ns})
    if any(n < 2 or n > n_max for n in ns) or len(ns) < 2:
        raise InvalidInputError(
            f"invalid FD-inf subset sizes {ns}: need at least two distinct sizes in "
            f"[2, {n_max}]; raise --num-clips for a wider range"
        )
    if int(n_trials) != n_trials or n_trials < 1:
        raise InvalidInputError(f"invalid n_trials {n_trials!r}: give a positive integer")
    xr, yr = _reduce_dim(x, y)
    rng = np.random.default_rng(seed)
    points = []
    for n in ns:
        trials = 1 if (n == n_x and n == n_y) else int(n_trials)
        vals = np.empty(trials)
        for t in range(trials):
            ix = rng.permutation(n_x)[:n]
            iy = rng.permutation(n_y)[:n]
            vals[t] = _fd_eigh(xr[ix], yr[iy])
        points.append(
            {
                "n": n,
                "inv_n": 1.0 / n,
                "fd": float(vals.mean()),
                "fd_std": float(vals.std(ddof=1)) if trials > 1 else 0.0,
                "trials": trials,
            }
        )
    inv = np.array([p["inv_n"] for p in points])
    fds = np.array([p["fd"] for p in points])
    slope, intercept = np.polyfit(inv, fds, 1)
    resid = fds - (slope * inv + intercept)
    total = float(((fds - fds.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0
    warning = rank_warning(n_max, n_max, dim)
    if warning:
        warning = warning.replace("prefer fd_infinity, ", "") + "; FD is not linear in 1/N here"
        logger.warning("FD-inf: %s", warning)
    return {
        "fd_inf": float(intercept),
        "slope": float(slope),
        "r2": float(r2),
        "points": points,
        "n_x": n_x,
        "n_y": n_y,
        "dim": dim,
        "warning": warning,
    }


# --------------------------------------------------------------------------------------------
# Paired clip sets: the eval stage's intervals, FD-inf and drift (whole clips resampled)
# --------------------------------------------------------------------------------------------


def interval(estimate: float | None, boots: np.ndarray, ci: float, floor: float | None) -> dict:
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


def increase_pct(fd_q_ref: float, fd_base_ref: float) -> float:
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

    :func:`fd_infinity` subsamples the two sets independently; for clips paired
    by prompt and seed that would compare unrelated clips at small N and the fit would extrapolate a
    meaningless (even negative) intercept, so paired sets take the same clip subset.

    Returns:
        ``{"fd_inf", "slope", "r2", "points", "warning"}`` (``fd_inf`` is ``None`` with fewer than 3 clips).
    """
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
    warning = rank_warning(rows, rows, x[0].shape[1])
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
        out["fd_increase_pct"][i] = increase_pct(qr, br) if br > 0 else np.nan
        out["paired_drift_pct"][i] = paired_drift_pct([base[k] for k in idx], [quant[k] for k in idx])
    return out


# --------------------------------------------------------------------------------------------
# Classifier-based metrics (PANNs logits)
# --------------------------------------------------------------------------------------------


def kl_paired(
    logits_a: np.ndarray,
    logits_b: np.ndarray,
    activation: str = "softmax",
    eps: float = KL_EPS,
) -> float:
    """Mean KL divergence between paired clips' class distributions (audioldm_eval's KL).

    Follows ``audioldm_eval.metrics.kl.calculate_kl``: ``a`` is the generated set (prediction),
    ``b`` the reference (pseudo target), rows paired by index (the field pairs by file name), and
    the value is ``mean_i KL(p_b,i || p_a,i) = mean_i sum_c p_b log(p_b / (p_a + eps))``.
    ``activation="softmax"`` (default) is the metric audioldm_eval prints as ``KL`` (key
    ``kullback_leibler_divergence_softmax``; its README: "KL divergence (softmax over logits)");
    ``"sigmoid"`` is its ``KL_Sigmoid``: the same formula on the 527 independent sigmoid
    probabilities (not a Bernoulli KL, kept for comparability). ``eps`` makes identical logits
    give ``~ -C * eps`` (about -5e-4 for 527 classes) rather than exactly 0; pass ``eps=0`` for
    the exact KL.

    Args:
        logits_a: ``(N, C)`` logits of the generated clips.
        logits_b: ``(N, C)`` logits of the reference clips, row ``i`` paired with ``a``'s row ``i``.
        activation: ``"softmax"`` or ``"sigmoid"``.
        eps: Added to ``p_a`` before the log (audioldm_eval uses 1e-6).

    Returns:
        The mean KL over pairs.

    Raises:
        InvalidInputError: Shapes differ, are not 2-D, or ``activation`` is unknown.
    """
    a = np.asarray(logits_a, dtype=np.float64)
    b = np.asarray(logits_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise InvalidInputError(
            f"kl_paired needs two non-empty (clips, classes) logit arrays of equal shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}; pair every generated clip with its reference "
            "(same prompts and seeds, same --num-clips)"
        )
    if activation == "softmax":
        p_a, p_b = special.softmax(a, axis=1), special.softmax(b, axis=1)
    elif activation == "sigmoid":
        p_a, p_b = special.expit(a), special.expit(b)
    else:
        raise InvalidInputError(
            f"unknown KL activation {activation!r}: choose softmax or sigmoid"
        )
    # xlogy: 0 * log 0 = 0, as torch.nn.functional.kl_div treats zero targets.
    per_pair = np.sum(special.xlogy(p_b, p_b) - p_b * np.log(p_a + eps), axis=1)
    return float(per_pair.mean())


def inception_score(logits: np.ndarray, splits: int = 1) -> float:
    """Inception score from class logits (audioldm_eval's ISc, softmax over classes).

    ``IS = exp(mean_i KL(p_i || mean_j p_j))`` per split, averaged over the splits (audioldm_eval
    shuffles with seed 2020 and uses 10 splits; shuffle the rows beforehand to match it).

    Args:
        logits: ``(N, C)`` logits.
        splits: Number of contiguous splits, ``1 <= splits <= N``.

    Returns:
        The mean inception score over splits (1 for identical predictions, up to ``C``).

    Raises:
        InvalidInputError: ``logits`` is not 2-D or ``splits`` is out of range.
    """
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim != 2 or lg.shape[0] == 0:
        raise InvalidInputError(
            f"inception_score needs (clips, classes) logits, got shape {tuple(lg.shape)}"
        )
    n = lg.shape[0]
    if int(splits) != splits or not 1 <= splits <= n:
        raise InvalidInputError(f"invalid IS splits {splits!r}: give an integer in [1, {n}]")
    p = special.softmax(lg, axis=1)
    scores = []
    for i in range(int(splits)):
        chunk = p[i * n // splits : (i + 1) * n // splits]
        q = chunk.mean(axis=0, keepdims=True)
        kl = np.sum(special.xlogy(chunk, chunk) - special.xlogy(chunk, q), axis=1).mean()
        scores.append(float(np.exp(kl)))
    return float(np.mean(scores))
