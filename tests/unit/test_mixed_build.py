"""`adm-export build --precision mixed --size-budget 0.2` end to end on the embedded model."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture(scope="module")
def mixed_build(tmp_path_factory):
    from click.testing import CliRunner

    from adm_export.cli import cli

    out = tmp_path_factory.mktemp("mixed") / "build"
    args = ["--quiet", "build", "--model", "tiny-audioldm", "--out", str(out), "--precision", "mixed", "--size-budget", "0.2",
            "--sensitivity-granularity", "block", "--sensitivity-points", "2", "--trajectory-check", "1",
            "--num-prompts", "4", "--steps", "4", "--points", "8", "--seconds", "1.28",
            "--num-clips", "4", "--eval-steps", "4", "--eval-seconds", "1.28"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, json.loads((out / "report.json").read_text())


def test_mixed_build_fits_the_budget_and_mixes_formats(mixed_build):
    out, report = mixed_build
    # The real exported file, not only the prediction, is within 20% of the FP32 bytes.
    assert report["size"]["reduction_vs_fp32"] <= 0.2
    search = report["quantization"]["search"]
    sol = search["solution"]
    assert sol["predicted_fraction"] <= 0.2 and sol["granularity"] == "block"
    assert sol["measured_rel_l2"] > 0 and sol["predicted_rel_l2"] > 0
    formats = report["quantization"]["formats"]
    assert len([f for f in formats if f != "fp16"]) >= 1 and len(formats) >= 2
    # Parity of the mixed export in ONNX Runtime, and the quality gate ran.
    assert report["parity"]["passed"] is True
    assert report["eval"]["gate"]["passed"] is not None


def test_mixed_report_has_ranking_and_trajectory_check(mixed_build):
    out, report = mixed_build
    search = report["quantization"]["search"]
    ranking = search["ranking"]
    checked = [r for r in ranking if r.get("trajectory_rel_l2")]
    # One item per measured format got the short-trajectory check, on final latents.
    measured_formats = {f for r in ranking for f in r["sensitivity"] if f != "fp16"}
    assert {f for r in checked for f in r["trajectory_rel_l2"]} == measured_formats
    assert all(v > 0 for r in checked for v in r["trajectory_rel_l2"].values())
    assert search["solution"]["trajectory_check"]["compared"].startswith("final latents")
    # Items are blocks (several layers each), ranked by their worst error.
    worst = [max(v for k, v in r["sensitivity"].items() if k != "fp16") for r in ranking if len(r["sensitivity"]) > 1]
    assert worst == sorted(worst, reverse=True) and any(r["layers"] > 1 for r in ranking)
    # ModelOpt's own search ran side by side on the same points.
    aq = search["modelopt_auto_quantize"]
    assert aq["ran"] is True, aq
    assert aq["measured_rel_l2"] > 0 and sum(aq["recipes"].values()) > 0
    md = (out / "report.md").read_text()
    assert "## Mixed-precision search" in md and "trajectory check" in md
