"""The quality gate of the eval stage: each gated metric against its threshold, and the verdict.

A metric passes when its estimate is within its flag's threshold; the message gives the margin or
the excess, the bootstrap interval, and warns when the threshold lies inside the interval.
"""

from __future__ import annotations

import numpy as np

from adm_export.config import EvalConfig


#: Gated metrics: (result key, config field, CLI flag, what it measures).
GATED = (
    ("fd_increase_pct", "max_fd_increase", "--max-fd-increase",
     "how much further from the reference the engine's clips are than the baseline's (FD)"),
    ("paired_drift_pct", "max_drift", "--max-drift",
     "how far each engine clip is from its own baseline clip, relative to the spread of the set"),
)


def check_metric(metric: str, flag: str, interval: dict, thr: float) -> dict:
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


def gate_verdict(cfg: EvalConfig, intervals: dict, nonfinite: list[int], num_clips: int) -> dict:
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
                checks.append(check_metric(metric, flag, intervals.get(metric) or {}, thr))
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
