"""Helpers shared by the unit tests: the report contract and the CLI's one-line error check."""

from __future__ import annotations

from click.testing import CliRunner

from adm_export.cli import cli

# DESIGN.md §3: report.json keys that tests and CI read; they must stay stable.
REPORT_KEYS = [
    "model", "precision", "device", "versions", "stages",
    "size.unet_fp32_bytes", "size.unet_fp16_bytes", "size.unet_export_bytes",
    "size.reduction_vs_fp32", "size.reduction_vs_fp16",
    "parity.onnx_vs_torch_rel_l2", "engine.backend", "engine.layer_precisions",
    "eval.num_clips", "eval.embedder", "eval.fd_baseline_vs_ref", "eval.fd_quantized_vs_baseline",
    "eval.fd_increase_pct", "eval.gate.passed", "eval.gate.threshold",
]


def get_key(d, dotted):
    """``d["a"]["b"]`` for ``"a.b"``, asserting every part exists."""
    for part in dotted.split("."):
        assert isinstance(d, dict) and part in d, f"missing report key {dotted!r}"
        d = d[part]
    return d


def run(*args):
    """Invoke the CLI quietly with ``args`` (converted to strings)."""
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


def one_error_line(result) -> str:
    """Assert the command printed exactly one ``error: ...`` line and no traceback; return it."""
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]
