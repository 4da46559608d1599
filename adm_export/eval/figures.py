"""PNG figures of the evaluation, drawn with matplotlib's Agg canvas (no display, no pyplot state).

* :func:`spectrogram_grid`: log-mel spectrograms of a few prompts, baseline beside quantized, and
  their difference in dB.
* :func:`latent_error_curve`: relative L2 between the engine's and the baseline's latent x_t at
  every sampler step (median over clips with the 10-90 % band).
* :func:`fd_interval_chart`: each FD with its bootstrap interval (one row per comparison or
  configuration) and, when a gate ran, the FD increase with its interval against the threshold.

Figures are built on :class:`matplotlib.figure.Figure` with an explicit Agg canvas instead of
``pyplot``: no global backend switch, nothing left open, safe inside a library and in tests.
"""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Mel front end of the spectrogram grid (PANNs' 16 kHz settings, as the default embedder uses).
SPEC_SR = 16000
SPEC_N_FFT = 512
SPEC_HOP = 160
SPEC_MELS = 64
#: Dynamic range shown (dB below each row's loudest bin).
SPEC_RANGE_DB = 80.0
DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    """Write a PNG through a temporary name and an atomic rename."""
    from adm_export.artifacts import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    logger.debug("figure written: %s", path)
    return path


def log_mel_db(wave: np.ndarray, sr: int) -> np.ndarray:
    """Log-mel power in dB, ``(mels, frames)``, at 16 kHz (window 512, hop 160, 64 mels 50-8000 Hz)."""
    from scipy.signal import resample_poly

    from adm_export.audio import mel_filterbank, power_spectrogram

    x = np.asarray(wave, dtype=np.float64).reshape(-1)
    x = np.nan_to_num(x)  # a broken engine's clip must still draw (as silence where it is NaN)
    if sr != SPEC_SR:
        g = math.gcd(int(sr), SPEC_SR)
        x = resample_poly(x, SPEC_SR // g, int(sr) // g)
    fb = mel_filterbank(SPEC_SR, SPEC_N_FFT, SPEC_MELS, 50.0, 8000.0)
    mel = power_spectrogram(x, SPEC_N_FFT, SPEC_HOP) @ fb.T
    return (10.0 * np.log10(np.maximum(mel, 1e-10))).T


def spectrogram_grid(baseline: Sequence[np.ndarray], quantized: Sequence[np.ndarray], sr: int,
                     prompts: Sequence[str], path: str | Path, rows: int = 3) -> Path:
    """Baseline vs quantized log-mel spectrograms for the first ``rows`` prompts, plus their difference.

    Both spectrograms of a row share one colour scale (the row's loudest bin down
    :data:`SPEC_RANGE_DB`), so a level change shows as a colour change; the third column is
    ``quantized - baseline`` in dB on a symmetric diverging scale.

    Args:
        baseline: Baseline clips (mono float arrays).
        quantized: The engine's clips, paired with ``baseline`` by index (same prompt and seed).
        sr: Sampling rate of the clips.
        prompts: Prompt of each pair (row titles).
        path: PNG file to write.
        rows: Number of prompts shown.

    Returns:
        ``path``.
    """
    n = max(1, min(rows, len(baseline), len(quantized)))
    fig = _figure(11.0, 2.3 * n + 0.4)
    axes = fig.subplots(n, 3, squeeze=False)
    seconds_per_frame = SPEC_HOP / SPEC_SR
    for r in range(n):
        base, quant = log_mel_db(baseline[r], sr), log_mel_db(quantized[r], sr)
        frames = min(base.shape[1], quant.shape[1])
        base, quant = base[:, :frames], quant[:, :frames]
        vmax = float(max(base.max(), quant.max()))
        vmin = vmax - SPEC_RANGE_DB
        extent = (0.0, frames * seconds_per_frame, 0, SPEC_MELS)
        diff = np.clip(quant, vmin, None) - np.clip(base, vmin, None)
        lim = max(1.0, float(np.percentile(np.abs(diff), 99)))
        panels = [
            (base, "magma", vmin, vmax, "baseline"),
            (quant, "magma", vmin, vmax, "quantized"),
            (diff, "RdBu_r", -lim, lim, "quantized − baseline (dB)"),
        ]
        prompt = textwrap.shorten(str(prompts[r]) if r < len(prompts) else "", 70, placeholder="…")
        for c, (img, cmap, lo, hi, title) in enumerate(panels):
            ax = axes[r][c]
            im = ax.imshow(img, origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi, extent=extent,
                           interpolation="nearest")
            ax.set_title(f"{title}\n“{prompt}”" if c == 0 else title, fontsize=8, loc="left")
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel("mel band", fontsize=8)
            if r == n - 1:
                ax.set_xlabel("time (s)", fontsize=8)
            if c != 0:
                cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
                cb.ax.tick_params(labelsize=7)
                cb.set_label("dB", fontsize=7)
    fig.suptitle("Log-mel spectrograms (16 kHz, 64 mels): same prompt and seed", fontsize=10)
    return _save(fig, path)


def latent_error_curve(median: Sequence[float], path: str | Path, low: Sequence[float] | None = None,
                       high: Sequence[float] | None = None, timesteps: Sequence[float] | None = None) -> Path:
    """Relative L2 of the engine's latent vs the baseline's at every sampler step.

    Args:
        median: Per-step median over clips of ``||x_t^engine - x_t^base|| / ||x_t^base||``.
        path: PNG file to write.
        low: Optional per-step lower band (10th percentile over clips).
        high: Optional per-step upper band (90th percentile over clips).
        timesteps: Optional scheduler timestep of each step (shown on a second axis label).

    Returns:
        ``path``.
    """
    y = np.asarray(median, dtype=np.float64)
    x = np.arange(1, y.size + 1)
    fig = _figure(6.4, 3.6)
    ax = fig.subplots()
    positive = y[np.isfinite(y) & (y > 0)]
    use_log = positive.size == y.size and y.size > 0 and positive.max() / positive.min() > 20
    if low is not None and high is not None:
        ax.fill_between(x, np.asarray(low, float), np.asarray(high, float), alpha=0.25, color="C0",
                        label="10–90 % of clips", linewidth=0)
    ax.plot(x, y, marker="o", color="C0", label="median over clips")
    if use_log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("sampler step (x_t fed to the denoiser at that step)")
    ax.set_ylabel("relative L2, engine vs baseline")
    if timesteps is not None and len(timesteps) == y.size:
        ax.set_xticks(x)
        ax.set_xticklabels([f"{i}\nt={int(t)}" for i, t in zip(x, timesteps)], fontsize=7)
        if y.size > 12:  # keep the labels readable on long schedules
            for i, label in enumerate(ax.get_xticklabels()):
                label.set_visible(i % math.ceil(y.size / 10) == 0 or i == y.size - 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Per-step latent error (same prompts and seeds; error accumulates along the trajectory)",
                 fontsize=9)
    return _save(fig, path)


def _errorbar(ax, v: float, y: float, ci, **kw) -> None:
    if ci and None not in ci:
        ax.errorbar([v], [y], xerr=[[max(v - ci[0], 0.0)], [max(ci[1] - v, 0.0)]], fmt="o", capsize=4, **kw)
    else:
        ax.plot([v], [y], "o", **{k: v2 for k, v2 in kw.items() if k in ("color", "markersize", "label")})


def fd_interval_chart(rows: Sequence[dict], path: str | Path, gate: dict | None = None,
                      metric_name: str = "FD") -> Path:
    """Each FD with its bootstrap interval, and the gate's metrics against their thresholds.

    Args:
        rows: One dict per comparison or configuration: ``label``, ``value`` and optionally
            ``ci`` (``[low, high]``) and ``fd_inf`` (the 1/N extrapolation, drawn as a cross).
        path: PNG file to write.
        gate: Optional ``{"passed", "checks": [{"label", "value", "ci", "threshold", "passed"}]}``:
            a second panel draws each gated metric (in %) with its interval and its threshold.
        metric_name: ``FD`` or ``FAD`` (axis label).

    Returns:
        ``path``.
    """
    checks = [c for c in (gate or {}).get("checks", []) if c.get("value") is not None]
    panels = 2 if checks else 1
    height = max(2.4, 0.55 * max(len(rows), 2 * len(checks)) + 1.4)
    fig = _figure(10.5 if panels == 2 else 6.4, height)
    axes = fig.subplots(1, panels, squeeze=False, width_ratios=[3, 2] if panels == 2 else None)[0]
    ax = axes[0]
    ys = np.arange(len(rows))[::-1]
    inf_labelled = False
    for y, r in zip(ys, rows):
        v = r.get("value")
        if v is None or not np.isfinite(v):
            ax.text(0, y, "  not computed", va="center", fontsize=8, color="0.4")
            continue
        _errorbar(ax, v, y, r.get("ci"), color="C0", label="estimate, 95 % interval" if y == ys[0] else None)
        ax.annotate(f"{v:.3g}", (v, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        if r.get("fd_inf") is not None:
            ax.plot([r["fd_inf"]], [y], "x", color="C3", markersize=8,
                    label=None if inf_labelled else f"{metric_name}∞ (1/N extrapolation)")
            inf_labelled = True
    ax.set_yticks(ys)
    ax.set_yticklabels([str(r["label"]) for r in rows], fontsize=8)
    ax.set_xlabel(metric_name, fontsize=9)
    ax.set_xlim(left=min(0.0, ax.get_xlim()[0]))
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.grid(True, axis="x", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{metric_name} with bootstrap interval (bias-shifted percentile, see report)", fontsize=9)

    if panels == 2:
        g = axes[1]
        gy = np.arange(len(checks))[::-1]
        span = [0.0]
        for y, c in zip(gy, checks):
            v, ci, thr = c["value"], c.get("ci"), c.get("threshold")
            color = "C2" if c.get("passed") else "C3"
            _errorbar(g, v, y, ci, color=color, markersize=8)
            g.annotate(f"{v:.1f} %", (v, y), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=9,
                       color=color)
            if thr is not None:
                g.plot([thr, thr], [y - 0.3, y + 0.3], color="0.2", linestyle="--", linewidth=1.2)
                g.annotate(f"max {thr:g} %", (thr, y - 0.3), fontsize=7, ha="center", va="top", xytext=(0, -2),
                           textcoords="offset points")
                span.append(thr)
            span += [v, *(ci if ci and None not in ci else [])]
        lo, hi = min(span), max(span)
        pad = 0.12 * max(hi - lo, 1.0)
        g.set_xlim(lo - pad, hi + pad)
        g.axvline(0, color="0.6", linewidth=0.8)
        g.set_yticks(gy)
        g.set_yticklabels([str(c.get("label", c.get("metric"))) for c in checks], fontsize=8)
        g.set_ylim(-0.8, len(checks) - 0.4)
        g.set_xlabel("% (gated metrics; dashed: threshold)", fontsize=8)
        g.grid(True, axis="x", alpha=0.3)
        passed = bool((gate or {}).get("passed"))
        g.set_title(f"Quality gate: {'PASSED' if passed else 'FAILED'}", fontsize=10,
                    color="C2" if passed else "C3", fontweight="bold")
    return _save(fig, path)


# The eval result's figures (what the eval stage draws) and the rows of its FD chart.

#: Clips shown in the spectrogram grid.
SPECTROGRAM_ROWS = 3


def write_figures(folder: Path, result: dict, baseline: Sequence[np.ndarray], quantized: Sequence[np.ndarray],
                  sr: int, prompts: Sequence[str]) -> dict[str, str]:
    """Draw the eval figures into ``folder/figures``; returns their paths relative to ``folder``."""
    fig_dir = Path(folder) / "figures"
    out = {}
    spectrogram_grid(baseline, quantized, sr, prompts, fig_dir / "spectrograms.png", rows=SPECTROGRAM_ROWS)
    out["spectrograms"] = "figures/spectrograms.png"
    median = result.get("latent_rel_l2_per_step_median") or []
    if median and None not in median:
        latent_error_curve(median, fig_dir / "latent_error.png", low=result["latent_rel_l2_per_step_p10"],
                                   high=result["latent_rel_l2_per_step_p90"], timesteps=result.get("timesteps"))
        out["latent_error"] = "figures/latent_error.png"
    fd_interval_chart(fd_rows(result), fig_dir / "fd.png", gate=gate_row(result),
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
