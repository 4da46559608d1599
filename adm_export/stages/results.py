"""Typed results of the public stages (:mod:`adm_export.stages.api`), the same objects the CLI prints.

Each result names the folder the stage wrote (``out``), keeps the full record it wrote there (the
artifact's ``manifest``, the eval result, the build report) and lifts out the numbers a caller
usually wants as typed fields. ``to_dict()`` gives plain JSON-serialisable data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class StageResult:
    """Fields every stage result has.

    Attributes:
        out: The folder the stage wrote (``None``: it wrote none).
        seconds: Wall time of the stage.
    """

    out: Path | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain data (paths as strings), e.g. for ``json.dumps``."""
        from adm_export.config import to_dict

        return to_dict(self)


@dataclasses.dataclass(frozen=True)
class CalibrateResult(StageResult):
    """What ``calibrate`` wrote: the calibration cache.

    Attributes:
        manifest: The cache's manifest.
        points: Calibration points kept.
        method: Selection method.
        prompts: Prompts the sampler ran on.
        estimated_input_error: Estimated input error of the selection (activation statistics).
    """

    manifest: dict
    points: int
    method: str
    prompts: int
    estimated_input_error: float | None

    @classmethod
    def from_manifest(cls, out: Path, seconds: float, manifest: dict) -> "CalibrateResult":
        sel = manifest["selection"]
        return cls(out, seconds, manifest, int(sel["points"]), str(sel["method"]),
                   len(manifest["prompts"]["prompts"]), sel.get("estimated_input_error"))


@dataclasses.dataclass(frozen=True)
class QuantizeResult(StageResult):
    """What ``quantize`` wrote: the quantized denoiser (ModelOpt state).

    Attributes:
        manifest: The artifact's manifest.
        precision: The preset.
        quantized_layers: Layers with a weight quantizer.
        error_mean: Mean relative L2 error vs full precision on the calibration points.
        error_max: Largest of those errors.
    """

    manifest: dict
    precision: str
    quantized_layers: int
    error_mean: float
    error_max: float

    @classmethod
    def from_manifest(cls, out: Path, seconds: float, manifest: dict) -> "QuantizeResult":
        err = manifest["quant_error_rel_l2"]
        return cls(out, seconds, manifest, str(manifest["config"]["precision"]),
                   int(manifest["quantizers"]["weight"]), float(err["mean"]), float(err["max"]))


@dataclasses.dataclass(frozen=True)
class ExportResult(StageResult):
    """What ``export`` (and ``export-baseline``) wrote: ``unet.onnx``.

    Attributes:
        manifest: The artifact's manifest (sizes, Q/DQ report, parity).
        precision: Precision of the export (the quantization preset, or fp16/fp32).
        export_bytes: Bytes of the exported U-Net.
        reduction_vs_fp32: ``export_bytes`` over the FP32 size.
        parity_passed: ONNX Runtime matches torch within the tolerance.
    """

    manifest: dict
    precision: str
    export_bytes: int
    reduction_vs_fp32: float
    parity_passed: bool | None

    @classmethod
    def from_manifest(cls, out: Path, seconds: float, manifest: dict) -> "ExportResult":
        sizes, parity = manifest["sizes"], manifest.get("parity") or {}
        return cls(out, seconds, manifest, str(manifest.get("precision")), int(sizes["unet_export_bytes"]),
                   float(sizes["reduction_vs_fp32"]), parity.get("passed"))


@dataclasses.dataclass(frozen=True)
class EngineResult(StageResult):
    """What ``engine`` wrote: the engines folder.

    Attributes:
        manifest: The folder's manifest (``report``: every engine built or why not).
        backend: The backend asked for.
        engines: ``{name: report}`` of every engine (``built`` False with a ``reason`` if not built).
        layer_precisions: Compute layers by precision, of the primary engine.
    """

    manifest: dict
    backend: str
    engines: dict
    layer_precisions: dict

    @classmethod
    def from_manifest(cls, out: Path, seconds: float, manifest: dict) -> "EngineResult":
        report = manifest["report"]
        return cls(out, seconds, manifest, str(report["backend"]), dict(report["engines"]),
                   dict(report.get("layer_precisions") or {}))


@dataclasses.dataclass(frozen=True)
class EvalResult(StageResult):
    """What ``eval`` measured (and wrote, with ``out``).

    Attributes:
        result: The full eval record (``eval.json``; the ``eval`` section of a build's report).
        gate_passed: The quality gate's verdict (the CLI exits 2 when False).
        gate_message: Why.
        fd_quantized_vs_baseline: FD (or FAD) of the engine's clips vs the baseline's.
        fd_increase_pct: FD increase of the engine over the baseline, against the reference.
    """

    result: dict
    gate_passed: bool
    gate_message: str
    fd_quantized_vs_baseline: float | None
    fd_increase_pct: float | None

    @classmethod
    def from_result(cls, out: Path | None, seconds: float, result: dict) -> "EvalResult":
        gate = result["gate"]
        return cls(out, seconds, result, bool(gate["passed"]), str(gate.get("message", "")),
                   result.get("fd_quantized_vs_baseline"), result.get("fd_increase_pct"))


@dataclasses.dataclass(frozen=True)
class BuildResult(StageResult):
    """What ``build`` wrote: every stage's folder, ``report.json`` and ``report.md``.

    Attributes:
        report: The report (``report.json``; keys in README "Output and report").
        gate_passed: The quality gate's verdict; ``None`` when eval did not run.
    """

    report: dict

    @property
    def gate_passed(self) -> bool | None:
        return ((self.report.get("eval") or {}).get("gate") or {}).get("passed")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "gate_passed": self.gate_passed}


@dataclasses.dataclass(frozen=True)
class GenerateResult(StageResult):
    """What ``generate`` wrote: one WAV per prompt (and PNGs with ``plot``).

    Attributes:
        files: The WAV files, in prompt order.
        record: ``generate.json`` (settings, engine, timings).
    """

    files: tuple[Path, ...]
    record: dict


@dataclasses.dataclass(frozen=True)
class BundleResult(StageResult):
    """What ``bundle`` wrote: the folder for the torch-free runtime.

    Attributes:
        manifest: The bundle's manifest.
        files: Bytes of every file, by path in the bundle.
        parity: Each component's ONNX Runtime vs torch check.
    """

    manifest: dict
    files: dict[str, int]
    parity: dict[str, dict]
