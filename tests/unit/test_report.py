"""report.json keys, report.md content and links, and the PNG figures (synthetic eval results, no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adm_export.eval import figures
from adm_export.eval.report import make_report, render_markdown, write_report
from tests.helpers import REPORT_KEYS as CONTRACT
from tests.helpers import get_key as _get

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SR = 16000


def _interval(est, lo, hi, bias=0.5):
    return {"estimate": est, "ci": [lo, hi], "percentile_ci": [lo + bias, hi + bias], "bias": bias,
            "boot_median": est + bias, "boot_std": 1.0, "estimate_in_percentile_ci": True}


def _clip(seed, seconds=1.0, amp=0.1):
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    return (amp * rng.normal(size=t.size) + 0.2 * np.sin(2 * np.pi * (200 + 50 * seed) * t)).astype(np.float32)


def _eval_result(passed=True, figures_=None):
    """An eval result shaped like harness.evaluate's, with a failing drift check when ``passed`` is False."""
    drift = 3.0 if passed else 41.0
    checks = [
        {"metric": "fd_increase_pct", "flag": "--max-fd-increase", "value": 4.0, "threshold": 50.0, "ci": [-2.0, 9.0],
         "passed": True, "excess": -46.0, "message": "fd_increase_pct 4.0% (95% interval -2.0 to 9.0%) is within "
                                                     "--max-fd-increase 50% (margin 46.0 points)"},
        {"metric": "paired_drift_pct", "flag": "--max-drift", "value": drift, "threshold": 25.0, "ci": [1.0, 60.0],
         "passed": passed, "excess": drift - 25.0,
         "message": f"paired_drift_pct {drift:.1f}% (95% interval 1.0 to 60.0%) "
                    + ("is within --max-drift 25% (margin 22.0 points)" if passed
                       else "exceeds --max-drift 25% by 16.0 points")},
    ]
    return {
        "num_clips": 4, "steps": 4, "audio_seconds": 1.0, "embedder": "logmel", "embedder_weight_free": True,
        "embedder_description": "weight-free log-mel statistics", "fd_kind": "FD on logmel clip embeddings",
        "reference": {"kind": "baseline_other_seeds", "clips": 4},
        "fd_quantized_vs_baseline": 1.5, "fd_baseline_vs_ref": 30.0, "fd_quantized_vs_ref": 31.2,
        "fd_increase_pct": 4.0, "paired_drift_pct": drift,
        "fd_quantized_vs_baseline_ci": [1.0, 2.0], "fd_increase_pct_ci": [-2.0, 9.0],
        "paired_drift_pct_ci": [1.0, 60.0],
        "intervals": {"fd_quantized_vs_baseline": _interval(1.5, 1.0, 2.0),
                      "fd_baseline_vs_ref": {**_interval(30.0, 25.0, 36.0, bias=4.0),
                                             "estimate_in_percentile_ci": False},
                      "fd_quantized_vs_ref": _interval(31.2, 26.0, 37.0),
                      "fd_increase_pct": _interval(4.0, -2.0, 9.0),
                      "paired_drift_pct": _interval(drift, 1.0, 60.0)},
        "bootstrap": {"n_boot": 200, "resampling": "whole clips"},
        "fd_warning": "only 4 clips for 200-dimensional embeddings",
        "fd_inf": {"fd_quantized_vs_baseline": {"fd_inf": 0.9, "r2": 0.9, "warning": "not linear", "points": []}},
        "fd_inf_increase_pct": 3.0,
        "kl": {"quantized_vs_baseline": 0.012, "quantized_vs_baseline_sigmoid": 0.3, "baseline_vs_ref": 0.4},
        "inception_score": {"baseline": 1.7, "quantized": 1.6},
        "clap_score": None,
        "latent_rel_l2_per_step": [0.0, 0.02, 0.03, 0.031], "final_latent_rel_l2": 0.031,
        "figures": figures_ if figures_ is not None else {"fd": "figures/fd.png",
                                                         "spectrograms": "figures/spectrograms.png",
                                                         "latent_error": "figures/latent_error.png"},
        "gate": {"metric": "fd_increase_pct", "value": 4.0, "ci": [-2.0, 9.0], "threshold": 50.0, "passed": passed,
                 "failed": [] if passed else ["paired_drift_pct"], "checks": checks,
                 "message": "; ".join(c["message"] for c in checks if not c["passed"]) or checks[0]["message"]},
    }


def _report(ev, **kw):
    return make_report({"id": "tiny-audioldm"}, "int8", "cpu", {"eval": 3.0}, None, None, ev, **kw)


def _valid_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


def test_contract_keys_present_with_and_without_eval():
    for ev in (None, _eval_result()):
        report = _report(ev)
        for key in CONTRACT:
            _get(report, key)
        json.dumps(report)  # JSON-serialisable as written
    report = _report(_eval_result())
    assert report["eval"]["gate"]["passed"] is True and report["eval"]["gate"]["threshold"] == 50.0
    assert report["eval"]["fd_increase_pct"] == 4.0 and report["eval"]["paired_drift_pct"] == 3.0
    assert _report(None)["eval"]["gate"]["passed"] is None


def test_figure_links_are_relative_to_the_report():
    in_build = _report(_eval_result())
    assert in_build["eval"]["figures"]["fd"] == "eval/figures/fd.png"
    own = _report(_eval_result(), eval_dir="")
    assert own["eval"]["figures"]["spectrograms"] == "figures/spectrograms.png"
    md = render_markdown(in_build)
    for rel in in_build["eval"]["figures"].values():
        assert f"]({rel})" in md


def test_markdown_states_the_failed_metric_by_how_much_with_interval():
    md = render_markdown(_report(_eval_result(passed=False)))
    assert "**Quality gate: FAILED**" in md
    assert "**FAIL**: paired_drift_pct 41.0% (95% interval 1.0 to 60.0%) exceeds --max-drift 25% by 16.0 points" in md
    assert "- pass: fd_increase_pct 4.0%" in md
    # The table: estimate, bias-shifted interval, bias, raw interval (flagged when it misses the estimate).
    assert "| FD(baseline, reference) | 30 | 25 to 36 | 4 | 29 to 40 (excludes the estimate) | – |" in md
    assert "| FD(quantized, baseline) | 1.5 | 1 to 2 | 0.5 | 1.5 to 2.5 | 0.9 |" in md
    assert "shifted by the bootstrap's median bias" in md
    assert "weight-free" in md and "not comparable with published FD/FAD" in md
    assert "KL(baseline ‖ quantized)" in md and "0.012" in md
    assert "only 4 clips for 200-dimensional embeddings" in md


def test_markdown_without_eval_and_without_class_head():
    md = render_markdown(_report(None))
    assert "Evaluation was not run" in md
    ev = _eval_result()
    ev.update(kl=None, inception_score=None, figures={})
    md = render_markdown(_report(ev))
    assert "KL and inception score: not computed" in md
    assert "![" not in md


def test_write_figures_makes_valid_pngs_and_report_links_them(tmp_path):
    base = [_clip(i) for i in range(4)]
    quant = [b + 0.01 * _clip(10 + i) for i, b in enumerate(base)]
    quant[1] = quant[1].copy()
    quant[1][:100] = np.nan  # a broken clip must still draw
    ev = _eval_result(figures_={})
    ev.update(latent_rel_l2_per_step_median=[0.0, 0.02, 0.03, 0.031],
              latent_rel_l2_per_step_p10=[0.0, 0.01, 0.02, 0.02], latent_rel_l2_per_step_p90=[0.0, 0.03, 0.04, 0.05],
              timesteps=[751.0, 501.0, 251.0, 1.0])
    ev["figures"] = figures.write_figures(tmp_path, ev, base, quant, SR, ["rain", "a dog barks", "wind", "engine"])
    assert set(ev["figures"]) == {"fd", "spectrograms", "latent_error"}
    sizes = {name: _valid_png(tmp_path / rel) for name, rel in ev["figures"].items()}
    assert sizes["spectrograms"][1] > 600  # three rows
    report = _report(ev, eval_dir="")
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    for rel in ev["figures"].values():
        assert f"]({rel})" in md and (tmp_path / rel).is_file()
    assert json.loads((tmp_path / "report.json").read_text())["eval"]["figures"] == ev["figures"]


def test_latent_curve_skipped_when_undefined(tmp_path):
    ev = _eval_result(figures_={})
    ev["latent_rel_l2_per_step_median"] = [0.0, None]
    out = figures.write_figures(tmp_path, ev, [_clip(0)], [_clip(0)], SR, ["x"])
    assert "latent_error" not in out and (tmp_path / out["fd"]).is_file()


def test_fd_chart_several_configurations(tmp_path):
    rows = figures.fd_rows(_eval_result(), prefix="int8: ") + figures.fd_rows(_eval_result(False), prefix="w4a8: ")
    rows.append({"label": "fp8: quantized vs baseline", "value": None})
    path = figures.fd_interval_chart(rows, tmp_path / "configs.png")
    assert _valid_png(path)[1] >= 400
    gate = figures.gate_row(_eval_result(passed=False))
    assert [c["label"] for c in gate["checks"]] == ["FD increase", "paired drift"] and gate["passed"] is False
    _valid_png(figures.fd_interval_chart(rows[:3], tmp_path / "gate.png", gate=gate, metric_name="FAD"))


def test_log_mel_of_a_tone_peaks_at_its_band():
    t = np.arange(SR) / SR
    low, high = (figures.log_mel_db(np.sin(2 * np.pi * f * t), SR) for f in (300.0, 3000.0))
    assert low.shape[0] == figures.SPEC_MELS
    assert np.argmax(low.mean(axis=1)) < np.argmax(high.mean(axis=1))
    # Resampled input gives the same frame rate (10 ms hop at 16 kHz).
    assert figures.log_mel_db(np.zeros(32000), 32000).shape[1] == pytest.approx(low.shape[1], abs=1)
