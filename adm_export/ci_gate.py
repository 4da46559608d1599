"""Quality-regression gate for CI: compare a build with a committed baseline report.

A *baseline* is a build's ``report.json`` (DESIGN.md §3) with one more section, ``ci_gate``, that
records how it was made: the ``adm-export build`` arguments, the evaluation protocol (clips,
steps, clip length, embedder, reference) and the model. ``docker/ci-gate.sh`` rebuilds with the
recorded arguments and calls :func:`compare` through ``adm-export compare``.

What is gated (each with a tolerance, see :class:`GateTolerances`):

* ``eval.fd_increase_pct``: may exceed the baseline's by at most ``fd_increase_pp`` percentage
  points (quality must not get worse);
* ``eval.paired_drift_pct`` (where reported): may exceed the baseline's by at most ``drift_pp``
  percentage points (paired per-clip drift of the engine from the full-precision baseline; less
  noisy than FD at few clips);
* ``eval.gate.passed``: the build's own absolute gate (``--max-fd-increase``, ``--max-drift``) must pass;
* ``size.unet_export_bytes``: may grow by at most ``size_pct`` percent;
* quantized compute layers (``engine.layer_precisions`` less its float entries): may drop by at
  most ``quantized_layers_pct`` percent (a change that silently leaves layers in float);
* ``parity.passed``: ONNX Runtime must still match the torch fake-quant model.

Builds whose evaluation protocol differs from the baseline's cannot be compared (FD depends on
the number of clips, the embedder and the reference set): that is a user error (exit 1), not a
failed gate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

from adm_export.errors import AdmExportError, ArtifactNotFoundError, InvalidInputError

logger = logging.getLogger(__name__)

BASELINE_FORMAT = 1
REPORT = "report.json"
# Layer-precision keys that mean "not quantized"; every other key counts as a quantized layer.
FLOAT_PRECISIONS = frozenset({"fp32", "fp16", "bf16", "tf32", "fp64", "float", "float32", "float16"})

# Protocol settings that must match for FDs to be comparable, with the build flag that sets each.
PROTOCOL_FLAGS = {
    "model": "--model",
    "precision": "--precision",
    "engine_backend": "--engine",
    "device": "--device",
    "eval.num_clips": "--num-clips",
    "eval.steps": "--eval-steps",
    "eval.audio_seconds": "--eval-seconds",
    "eval.embedder": "--embedder",
    "eval.reference": "--reference",
    "eval.reference_clips": "--reference / --num-clips",
    "eval.seed": "(fixed by adm-export build)",
    "eval.guidance_scale": "(fixed by adm-export build)",
}


class BaselineMismatchError(AdmExportError):
    """The build and the baseline were made with different evaluation protocols."""


@dataclasses.dataclass(frozen=True)
class GateTolerances:
    """How far a build may fall behind its baseline before the gate fails.

    Attributes:
        fd_increase_pp: Allowed rise of ``eval.fd_increase_pct`` over the baseline's, in
            percentage points. FD at a handful of clips is noisy across machines and thread
            counts; 10 points is well above the run-to-run spread seen on the tiny model.
        size_pct: Allowed growth of the exported U-Net, in percent of the baseline's bytes.
        quantized_layers_pct: Allowed drop of quantized compute layers, in percent of the
            baseline's count (TensorRT's tactic choice can move a few layers between runs).
        drift_pp: Allowed rise of ``eval.paired_drift_pct`` over the baseline's, in percentage points.
    """

    fd_increase_pp: float = 10.0
    size_pct: float = 1.0
    quantized_layers_pct: float = 5.0
    drift_pp: float = 5.0

    def __post_init__(self):
        for field, flag in (("fd_increase_pp", "--fd-tolerance"), ("size_pct", "--size-tolerance"),
                            ("quantized_layers_pct", "--layer-tolerance"), ("drift_pp", "--drift-tolerance")):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise InvalidInputError(f"invalid {flag} {value!r}: must be a number >= 0")


@dataclasses.dataclass
class Row:
    """One line of the diff table."""

    metric: str
    baseline: str
    current: str
    delta: str
    limit: str
    status: str  # "ok", "better", "FAIL" or "info"


@dataclasses.dataclass
class GateResult:
    """Outcome of :func:`compare`."""

    passed: bool
    rows: list[Row]
    notes: list[str]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "rows": [dataclasses.asdict(r) for r in self.rows], "notes": self.notes}


# -- reading builds and baselines ------------------------------------------------------------------
def _read_json(path: Path, what: str, flag: str) -> dict:
    from adm_export.artifacts import read_json

    return read_json(path, flag, what, error=InvalidInputError)


def build_settings(build_dir: str | Path) -> dict:
    """The evaluation protocol and identity of a build folder (compared with the baseline's).

    Args:
        build_dir: Output folder of ``adm-export build`` (``report.json``, ``eval/eval.json``).

    Returns:
        Flat settings keyed as in :data:`PROTOCOL_FLAGS`, plus ``model_fingerprint`` and
        ``calibration`` (the calibration config; informational).
    """
    try:
        return _build_settings(Path(build_dir))
    except PermissionError as exc:
        # Stage folders are created private (mkdtemp, mode 0700): a gate run as another user
        # than the build cannot read them.
        raise InvalidInputError(f"BUILD_DIR {str(build_dir)!r}: cannot read {exc.filename!r} "
                                f"({exc.strerror}); run the gate as the user that made the build") from None


def _build_settings(build_dir: Path) -> dict:
    report = _read_json(build_dir / REPORT, "build report (report.json)", "BUILD_DIR")
    ev_path = build_dir / "eval" / "eval.json"
    ev = _read_json(ev_path, "evaluation (eval/eval.json)", "BUILD_DIR") if ev_path.exists() else {}
    ev_cfg = ev.get("config") or {}
    calib_path = build_dir / "calibration" / "manifest.json"
    calib = (_read_json(calib_path, "calibration manifest", "BUILD_DIR").get("config")
             if calib_path.exists() else None)
    rep_eval = report.get("eval") or {}
    reference = rep_eval.get("reference") or ev.get("reference") or {}
    model = report.get("model") or {}
    return {
        "model": model.get("id"),
        "model_fingerprint": model.get("fingerprint"),
        "precision": report.get("precision"),
        "engine_backend": (report.get("engine") or {}).get("backend"),
        "device": report.get("device"),
        "eval.num_clips": rep_eval.get("num_clips"),
        "eval.steps": ev_cfg.get("steps", ev.get("steps")),
        "eval.audio_seconds": ev_cfg.get("audio_seconds", ev.get("audio_seconds")),
        "eval.embedder": rep_eval.get("embedder"),
        # The kind and size of the reference set, not its path (CI workspaces differ in paths).
        "eval.reference": reference.get("kind"),
        "eval.reference_clips": reference.get("clips"),
        "eval.seed": ev_cfg.get("seed"),
        "eval.guidance_scale": ev_cfg.get("guidance_scale"),
        "calibration": calib,
    }


def load_build(build_dir: str | Path) -> tuple[dict, dict]:
    """Read a build folder's report and settings; refuse a build without evaluation."""
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise ArtifactNotFoundError(f"BUILD_DIR {str(build_dir)!r} does not exist; run adm-export build first")
    report = _read_json(build_dir / REPORT, "build report (report.json)", "BUILD_DIR")
    if (report.get("eval") or {}).get("fd_increase_pct") is None:
        raise InvalidInputError(
            f"BUILD_DIR {str(build_dir)!r} was built without evaluation; the gate needs it "
            f"(drop --no-eval and --engine none from the build arguments)"
        )
    return report, build_settings(build_dir)


def load_baseline(path: str | Path) -> dict:
    """Read and check a baseline file (a report with a ``ci_gate`` section).

    Raises:
        ArtifactNotFoundError: The file does not exist.
        InvalidInputError: It is not JSON, not a report, or has no evaluation.
    """
    path = Path(path)
    baseline = _read_json(path, "baseline report", "--baseline")
    gate = baseline.get("ci_gate")
    if not isinstance(gate, dict) or "settings" not in gate:
        raise InvalidInputError(
            f"--baseline {str(path)!r} has no 'ci_gate' section; create baselines with "
            f"'ci-gate.sh --update-baseline' (or 'adm-export compare BUILD --baseline FILE --write-baseline')"
        )
    if gate.get("format") != BASELINE_FORMAT:
        raise InvalidInputError(
            f"--baseline {str(path)!r} has format {gate.get('format')!r}, this adm-export reads "
            f"{BASELINE_FORMAT}; regenerate it with --update-baseline"
        )
    if (baseline.get("eval") or {}).get("fd_increase_pct") is None or (baseline.get("size") or {}).get(
            "unet_export_bytes") is None:
        raise InvalidInputError(
            f"--baseline {str(path)!r} lacks eval.fd_increase_pct or size.unet_export_bytes; "
            f"regenerate it from a build with evaluation"
        )
    return baseline


def baseline_build_args(path: str | Path) -> list[str]:
    """The ``adm-export build`` arguments a baseline was made with (what the gate rebuilds with)."""
    args = load_baseline(path)["ci_gate"].get("build_args") or []
    if not all(isinstance(a, str) for a in args):
        raise InvalidInputError(f"--baseline {str(path)!r}: ci_gate.build_args must be a list of strings")
    return list(args)


def make_baseline(build_dir: str | Path, build_args: list[str] | tuple[str, ...] = ()) -> dict:
    """A baseline from a build folder: its report plus the ``ci_gate`` section.

    Args:
        build_dir: The build to freeze as the reference.
        build_args: The ``adm-export build`` arguments it was made with (without ``--out``).
    """
    report, settings = load_build(build_dir)
    return {
        **report,
        "ci_gate": {
            "format": BASELINE_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_args": list(build_args),
            "settings": settings,
        },
    }


# -- comparison -----------------------------------------------------------------------------------
def quantized_layers(report: dict) -> int | None:
    """Compute layers that run in a quantized precision (``engine.layer_precisions``, float excluded)."""
    precisions = (report.get("engine") or {}).get("layer_precisions")
    if not precisions:
        return None
    return int(sum(v for k, v in precisions.items() if str(k).lower() not in FLOAT_PRECISIONS))


def check_protocol(settings: dict, baseline: dict, baseline_path: str | Path = "baseline") -> None:
    """Refuse a build whose evaluation protocol differs from the baseline's.

    Raises:
        BaselineMismatchError: Naming every differing setting and the flag that sets it.
    """
    theirs = baseline["ci_gate"]["settings"]
    diffs = []
    for key, flag in PROTOCOL_FLAGS.items():
        a, b = theirs.get(key), settings.get(key)
        if a is None or b is None:  # older reports may lack a field: nothing to compare
            continue
        if isinstance(a, float) or isinstance(b, float):
            same = math.isclose(float(a), float(b), rel_tol=1e-9)
        else:
            same = a == b
        if not same:
            diffs.append(f"{key} {b!r} vs baseline {a!r} ({flag})")
    if diffs:
        raise BaselineMismatchError(
            f"the build's evaluation protocol differs from --baseline {str(baseline_path)!r}: "
            + "; ".join(diffs)
            + ". Rebuild with the baseline's arguments (ci-gate.sh uses them unless overridden) or "
              "regenerate the baseline with --update-baseline"
        )


def _f(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "passed" if v else "FAILED"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def compare(report: dict, settings: dict, baseline: dict, tol: GateTolerances = GateTolerances(),
            baseline_path: str | Path = "baseline") -> GateResult:
    """Compare a build's report with a baseline.

    Args:
        report: The build's ``report.json``.
        settings: :func:`build_settings` of the build.
        baseline: :func:`load_baseline` result.
        tol: Tolerances.
        baseline_path: For messages.

    Returns:
        The result; ``passed`` is False when any gated row fails.

    Raises:
        BaselineMismatchError: The evaluation protocols differ.
    """
    check_protocol(settings, baseline, baseline_path)
    rows: list[Row] = []
    notes: list[str] = []
    b_ev, c_ev = baseline.get("eval") or {}, report.get("eval") or {}

    # 1. Quality relative to the baseline: FD increase (percentage points).
    b_fd, c_fd = b_ev.get("fd_increase_pct"), c_ev.get("fd_increase_pct")
    if c_fd is None:
        rows.append(Row("FD increase (%)", _f(b_fd, ".2f"), "–", "", "", "FAIL"))
        notes.append("the build has no evaluation (eval.fd_increase_pct)")
    else:
        limit = b_fd + tol.fd_increase_pp
        status = "FAIL" if c_fd > limit else "better" if c_fd < b_fd - tol.fd_increase_pp else "ok"
        rows.append(Row("FD increase (%)", _f(b_fd, ".2f"), _f(c_fd, ".2f"), f"{c_fd - b_fd:+.2f} pp",
                        f"<= {limit:.2f}", status))

    # 2. Paired drift of the engine's clips from the baseline's (newer reports).
    b_dr, c_dr = b_ev.get("paired_drift_pct"), c_ev.get("paired_drift_pct")
    if b_dr is not None:
        if c_dr is None:
            rows.append(Row("paired drift (%)", _f(b_dr, ".2f"), "–", "", "", "FAIL"))
            notes.append("the build reports no eval.paired_drift_pct")
        else:
            limit = b_dr + tol.drift_pp
            status = "FAIL" if c_dr > limit else "better" if c_dr < b_dr - tol.drift_pp else "ok"
            rows.append(Row("paired drift (%)", _f(b_dr, ".2f"), _f(c_dr, ".2f"), f"{c_dr - b_dr:+.2f} pp",
                            f"<= {limit:.2f}", status))

    # 3. The build's own absolute gate (--max-fd-increase, --max-drift).
    gate = c_ev.get("gate") or {}
    if gate.get("passed") is not None:
        checks = gate.get("checks") or [{"metric": "fd_increase_pct", "threshold": gate.get("threshold")}]
        limit = ", ".join(f"{c.get('metric')} <= {_f(c.get('threshold'))}" for c in checks)
        rows.append(Row("build quality gate", _f((b_ev.get("gate") or {}).get("passed")), _f(gate.get("passed")),
                        "", limit, "ok" if gate.get("passed") else "FAIL"))

    # 4. Size of the exported U-Net.
    b_size = (baseline.get("size") or {}).get("unet_export_bytes")
    c_size = (report.get("size") or {}).get("unet_export_bytes")
    if c_size is None:
        rows.append(Row("U-Net export (MB)", _f(b_size / 1e6, ".3f"), "–", "", "", "FAIL"))
        notes.append("the build reports no size.unet_export_bytes")
    else:
        limit = b_size * (1 + tol.size_pct / 100)
        rel = 100 * (c_size - b_size) / b_size
        status = "FAIL" if c_size > limit else "better" if c_size < b_size * (1 - tol.size_pct / 100) else "ok"
        rows.append(Row("U-Net export (MB)", f"{b_size / 1e6:.3f}", f"{c_size / 1e6:.3f}", f"{rel:+.2f}%",
                        f"<= {limit / 1e6:.3f}", status))

    # 5. Quantized compute layers.
    b_q, c_q = quantized_layers(baseline), quantized_layers(report)
    if b_q is not None:
        floor = math.ceil(b_q * (1 - tol.quantized_layers_pct / 100))
        if c_q is None:
            rows.append(Row("quantized layers", str(b_q), "–", "", f">= {floor}", "FAIL"))
            notes.append("the build reports no engine.layer_precisions")
        else:
            status = "FAIL" if c_q < floor else "ok"
            rows.append(Row("quantized layers", str(b_q), str(c_q), f"{c_q - b_q:+d}", f">= {floor}", status))

    # 6. Parity of the ONNX export with the torch fake-quant model.
    c_par = (report.get("parity") or {}).get("passed")
    if c_par is not None:
        rows.append(Row("ONNX parity", _f((baseline.get("parity") or {}).get("passed")), _f(c_par), "", "passed",
                        "ok" if c_par else "FAIL"))

    # 7. Context, not gated: these move with the machine or are diagnostics.
    for label, key, spec in (("FD(engine, baseline)", "fd_quantized_vs_baseline", ".4g"),
                             ("final latent rel. L2", "final_latent_rel_l2", ".3e")):
        b, c = b_ev.get(key), c_ev.get(key)
        delta = f"{100 * (c - b) / b:+.1f}%" if isinstance(b, (int, float)) and isinstance(c, (int, float)) and b else ""
        rows.append(Row(label, _f(b, spec), _f(c, spec), delta, "", "info"))
    b_lat, c_lat = (baseline.get("engine") or {}).get("latency_ms"), (report.get("engine") or {}).get("latency_ms")
    rows.append(Row("ORT latency (ms/call)", _f(b_lat, ".1f"), _f(c_lat, ".1f"), "", "", "info"))
    if settings.get("model_fingerprint") != baseline["ci_gate"]["settings"].get("model_fingerprint"):
        notes.append("the model's weights differ from the baseline's (fingerprint changed)")
    if any(r.status == "better" for r in rows):
        notes.append("some metrics are better than the baseline beyond tolerance: consider --update-baseline")
    passed = not any(r.status == "FAIL" for r in rows)
    return GateResult(passed=passed, rows=rows, notes=notes)


# -- output ---------------------------------------------------------------------------------------
_HEADER = ("metric", "baseline", "current", "delta", "limit", "status")


def format_table(result: GateResult) -> str:
    """The diff table as fixed-width text (for CI logs)."""
    cells = [_HEADER] + [(r.metric, r.baseline, r.current, r.delta, r.limit, r.status) for r in result.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"note: {n}" for n in result.notes]
    lines.append(f"gate: {'PASSED' if result.passed else 'FAILED'}")
    return "\n".join(lines)


def format_markdown(result: GateResult, title: str = "adm-export quality gate") -> str:
    """The diff table as Markdown (for CI job summaries and merge-request comments)."""
    lines = [f"### {title}: {'PASSED' if result.passed else 'FAILED'}", "",
             "| " + " | ".join(_HEADER) + " |", "|---|---:|---:|---:|---|---|"]
    for r in result.rows:
        status = f"**{r.status}**" if r.status == "FAIL" else r.status
        lines.append(f"| {r.metric} | {r.baseline} | {r.current} | {r.delta} | {r.limit} | {status} |")
    lines += [""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines).rstrip() + "\n"


def check_outputs(summary: str | Path | None = None, json_out: str | Path | None = None,
                  baseline: str | Path | None = None) -> None:
    """Refuse output files that cannot be written before anything is compared or printed."""
    from adm_export.artifacts import check_file_out

    for path, flag in ((summary, "--summary"), (json_out, "--json-out"), (baseline, "--baseline")):
        if path is not None:
            check_file_out(path, flag)


def write_baseline(build_dir: str | Path, baseline: str | Path, build_args: list[str] | tuple[str, ...] = ()) -> None:
    """Write ``build_dir``'s report, with its protocol and ``build_args``, as the baseline file."""
    from adm_export.artifacts import write_json

    check_outputs(baseline=baseline)
    write_json(baseline, make_baseline(build_dir, build_args))


def run_gate(build_dir: str | Path, baseline: str | Path, tol: GateTolerances = GateTolerances(),
             summary: str | Path | None = None, json_out: str | Path | None = None) -> GateResult:
    """Compare a build folder with a baseline file; also write the Markdown table and the JSON result.

    Raises:
        ArtifactNotFoundError / InvalidInputError / BaselineMismatchError: one line each, before
            anything is written.
    """
    from adm_export.artifacts import write_json, write_text

    check_outputs(summary, json_out)
    base = load_baseline(baseline)
    report, settings = load_build(build_dir)
    result = compare(report, settings, base, tol, baseline_path=baseline)
    if summary is not None:
        write_text(summary, format_markdown(result))
    if json_out is not None:
        write_json(json_out, {**result.to_dict(), "baseline": str(baseline), "build": str(build_dir)})
    return result
