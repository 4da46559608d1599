"""``report.json`` (stable keys, DESIGN.md §3) and ``report.md`` (for people) of a build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adm_export.artifacts import library_versions, write_json


def make_report(model: dict, precision: str, device: str, timings: dict, onnx_manifest: dict | None,
                engine_manifest: dict | None, eval_result: dict | None, quant_manifest: dict | None = None,
                calib_manifest: dict | None = None) -> dict:
    """Assemble the report from the stages' manifests.

    Keys of DESIGN.md §3 are always present (``None`` when a stage did not run); more may be added.
    """
    sizes = (onnx_manifest or {}).get("sizes", {})
    parity = (onnx_manifest or {}).get("parity", {})
    engine = (engine_manifest or {}).get("report", {})
    ev = eval_result or {}
    report: dict[str, Any] = {
        "model": model,
        "precision": precision,
        "device": device,
        "versions": library_versions(),
        "stages": {name: {"seconds": s} for name, s in timings.items()},
        "size": {
            "unet_fp32_bytes": sizes.get("unet_fp32_bytes"),
            "unet_fp16_bytes": sizes.get("unet_fp16_bytes"),
            "unet_export_bytes": sizes.get("unet_export_bytes"),
            "reduction_vs_fp32": sizes.get("reduction_vs_fp32"),
            "reduction_vs_fp16": sizes.get("reduction_vs_fp16"),
        },
        "parity": {
            "onnx_vs_torch_rel_l2": parity.get("onnx_vs_torch_max"),
            "onnx_vs_torch_mean_rel_l2": parity.get("onnx_vs_torch_mean"),
            "rounding_floor_rel_l2": parity.get("rounding_floor_max"),
            "rounding_floor_mean_rel_l2": parity.get("rounding_floor_mean"),
            "quant_error_rel_l2": parity.get("quant_error_max"),
            "quant_error_mean_rel_l2": parity.get("quant_error_mean"),
            "passed": parity.get("passed"),
        },
        "engine": {
            "backend": engine.get("backend"),
            "layer_precisions": engine.get("layer_precisions"),
            "latency_ms": (engine.get("engines", {}).get("onnxruntime", {}).get("latency") or {}).get("median_ms"),
            "engines": engine.get("engines"),
        },
        "calibration": None if calib_manifest is None else {
            "points": calib_manifest["selection"]["points"],
            "select": calib_manifest["selection"]["method"],
            "prompts": len(calib_manifest["prompts"]["prompts"]),
            "coverage": (calib_manifest["prompts"].get("coverage") or {}).get("summary"),
        },
        "quantization": None if quant_manifest is None else {
            "quantizers": quant_manifest.get("quantizers"),
            "high_precision": quant_manifest.get("recipe", {}).get("high_precision"),
            "qdq": (onnx_manifest or {}).get("qdq", {}).get("ops"),
        },
        "eval": {
            "num_clips": ev.get("num_clips"),
            "embedder": ev.get("embedder"),
            "reference": ev.get("reference"),
            "fd_baseline_vs_ref": ev.get("fd_baseline_vs_ref"),
            "fd_quantized_vs_ref": ev.get("fd_quantized_vs_ref"),
            "fd_quantized_vs_baseline": ev.get("fd_quantized_vs_baseline"),
            "fd_quantized_vs_baseline_ci": ev.get("fd_quantized_vs_baseline_ci"),
            "fd_increase_pct": ev.get("fd_increase_pct"),
            "final_latent_rel_l2": ev.get("final_latent_rel_l2"),
            "latent_rel_l2_per_step": ev.get("latent_rel_l2_per_step"),
            "gate": {
                "passed": (ev.get("gate") or {}).get("passed"),
                "threshold": (ev.get("gate") or {}).get("threshold"),
                "metric": (ev.get("gate") or {}).get("metric"),
            },
        },
    }
    return report


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def render_markdown(report: dict) -> str:
    """A readable summary of a report."""
    size, parity, engine, ev = report["size"], report["parity"], report["engine"], report["eval"]
    mb = lambda b: "–" if b is None else f"{b / 1e6:.2f} MB"  # noqa: E731
    lines = [
        f"# adm-export report: {report['model'].get('id')} ({report['precision']})",
        "",
        f"Device: {report['device']} · adm-export {report['versions'].get('adm-export')} · "
        f"torch {report['versions'].get('torch', '–')} · ModelOpt {report['versions'].get('nvidia-modelopt', '–')}",
        "",
        "## Stages",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {name} | {v['seconds']:.1f} |" for name, v in report["stages"].items()],
        "",
        "## Size of the U-Net",
        "",
        "| form | size | vs FP32 |",
        "|---|---:|---:|",
        f"| FP32 | {mb(size['unet_fp32_bytes'])} | 100% |",
        f"| FP16 | {mb(size['unet_fp16_bytes'])} | 50% |",
        f"| exported ({report['precision']}) | {mb(size['unet_export_bytes'])} | "
        f"{_fmt(None if size['reduction_vs_fp32'] is None else 100 * size['reduction_vs_fp32'], '.1f')}% |",
        "",
        "## Parity (relative L2 of one denoiser call on cached calibration inputs, worst point)",
        "",
        f"- ONNX Runtime vs torch fake-quant: {_fmt(parity['onnx_vs_torch_rel_l2'], '.2e')} "
        f"(mean {_fmt(parity['onnx_vs_torch_mean_rel_l2'], '.2e')})",
        f"- rounding floor (torch fake-quant, float64 vs float32): {_fmt(parity['rounding_floor_rel_l2'], '.2e')} "
        f"(mean {_fmt(parity['rounding_floor_mean_rel_l2'], '.2e')})",
        f"- quantization error (fake-quant vs full precision): {_fmt(parity['quant_error_rel_l2'], '.2e')} "
        f"(mean {_fmt(parity['quant_error_mean_rel_l2'], '.2e')})",
        f"- parity check: {'passed' if parity['passed'] else 'FAILED' if parity['passed'] is False else '–'}",
        "",
        "## Engine",
        "",
        f"- backend: {engine['backend']}; layer precisions: {json.dumps(engine['layer_precisions'])}",
        f"- ONNX Runtime latency per denoiser call: {_fmt(engine['latency_ms'], '.1f')} ms",
    ]
    for name, e in (engine.get("engines") or {}).items():
        if name != "onnxruntime":
            lines.append(f"- {name}: " + (f"built, layer precisions {json.dumps(e.get('layer_precisions'))} "
                                          f"(source: {e.get('source')})" if e.get("built") else f"not built ({e.get('reason')})"))
    lines += ["", "## Quality", ""]
    if ev.get("num_clips") is None:
        lines.append("Evaluation was not run (--no-eval).")
    else:
        gate = ev["gate"]
        lines += [
            f"- clips: {ev['num_clips']}, embedder: {ev['embedder']}, reference: "
            f"{(ev.get('reference') or {}).get('kind')}",
            f"- FD(quantized, baseline): {_fmt(ev['fd_quantized_vs_baseline'])} "
            f"(95% bootstrap interval {', '.join(_fmt(x) for x in ev.get('fd_quantized_vs_baseline_ci') or [])})",
            f"- FD(baseline, reference): {_fmt(ev['fd_baseline_vs_ref'])}; FD(quantized, reference): "
            f"{_fmt(ev['fd_quantized_vs_ref'])}",
            f"- FD increase: {_fmt(ev['fd_increase_pct'], '.1f')}% (gate: at most {_fmt(gate['threshold'])}%) → "
            f"**{'PASSED' if gate['passed'] else 'FAILED'}**",
            f"- final-latent relative L2 (engine vs baseline trajectory): {_fmt(ev['final_latent_rel_l2'], '.3e')}",
        ]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, report: dict) -> None:
    """Write ``report.json`` and ``report.md`` into ``folder`` (each atomically)."""
    write_json(folder / "report.json", report)
    md = folder / "report.md"
    tmp = md.with_name(".report.md.tmp")
    tmp.write_text(render_markdown(report))
    tmp.replace(md)


def load_report(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
