"""``report.json`` (stable keys, DESIGN.md §3) and ``report.md`` (for people) of a build."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

from adm_export.artifacts import library_versions, write_json, write_text


def make_report(model: dict, precision: str, device: str, timings: dict, onnx_manifest: dict | None,
                engine_manifest: dict | None, eval_result: dict | None, quant_manifest: dict | None = None,
                calib_manifest: dict | None = None, eval_dir: str = "eval") -> dict:
    """Assemble the report from the stages' manifests.

    Keys of DESIGN.md §3 are always present (``None`` when a stage did not run); more may be added.

    Args:
        model: Model identity.
        precision: Quantization preset name.
        device: Device the stages ran on.
        timings: Seconds by stage name.
        onnx_manifest: Manifest of the ``export`` stage, or ``None``.
        engine_manifest: Manifest of the ``engine`` stage, or ``None``.
        eval_result: Result of :func:`adm_export.eval.harness.evaluate`, or ``None``.
        quant_manifest: Manifest of the ``quantize`` stage, or ``None``.
        calib_manifest: Manifest of the ``calibrate`` stage, or ``None``.
        eval_dir: Where the eval folder (with ``figures/``) lies relative to the report: ``eval``
            in a build folder, ``""`` for the report ``adm-export eval`` writes into its own folder.
    """
    sizes = (onnx_manifest or {}).get("sizes", {})
    parity = (onnx_manifest or {}).get("parity", {})
    engine = (engine_manifest or {}).get("report", {})
    ev = eval_result or {}
    gate = ev.get("gate") or {}
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
            # The verdict's measure (export.parity): torch fed ONNX Runtime's codes at every quantizer.
            "teacher_forced_rel_l2": (parity.get("teacher_forced") or {}).get("forced_max"),
            "codes_one_step_fraction": (parity.get("teacher_forced") or {}).get("one_step_fraction"),
            "codes_more_steps": (parity.get("teacher_forced") or {}).get("codes_more_steps"),
            "passed": parity.get("passed"),
        },
        "engine": {
            "backend": engine.get("backend"),
            "layer_precisions": engine.get("layer_precisions"),
            "latency_ms": (engine.get("engines", {}).get("onnxruntime", {}).get("latency") or {}).get("median_ms"),
            # The CPU engine raced against the same model in FP32 on the same machine (engines.speedup).
            "fp32_latency_ms": (_vs_fp32(engine).get("fp32_reference") or {}).get("median_ms"),
            "speedup_vs_fp32": _vs_fp32(engine).get("speedup_vs_fp32"),
            # The ONNX Runtime engine: which graph it serves (the export, or the fused FP16 CUDA
            # engine), the optimizer's fused-op counts, and what computes in what.
            "onnxruntime_graph": engine.get("engines", {}).get("onnxruntime", {}).get("graph"),
            "fusions": engine.get("engines", {}).get("onnxruntime", {}).get("fusions"),
            "summary": engine.get("engines", {}).get("onnxruntime", {}).get("summary"),
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
            "fd_increase_pct_ci": ev.get("fd_increase_pct_ci"),
            "paired_drift_pct": ev.get("paired_drift_pct"),
            "paired_drift_pct_ci": ev.get("paired_drift_pct_ci"),
            "fd_kind": ev.get("fd_kind"),
            "fd_warning": ev.get("fd_warning"),
            "intervals": ev.get("intervals"),
            "bootstrap": ev.get("bootstrap"),
            "fd_inf": _fd_inf_values(ev.get("fd_inf")),
            "fd_inf_increase_pct": ev.get("fd_inf_increase_pct"),
            "kl": ev.get("kl"),
            "inception_score": ev.get("inception_score"),
            "clap_score": ev.get("clap_score"),
            "embedder_weight_free": ev.get("embedder_weight_free"),
            "embedder_description": ev.get("embedder_description"),
            "steps": ev.get("steps"),
            "audio_seconds": ev.get("audio_seconds"),
            "final_latent_rel_l2": ev.get("final_latent_rel_l2"),
            "latent_rel_l2_per_step": ev.get("latent_rel_l2_per_step"),
            "nonfinite_quantized_clips": ev.get("nonfinite_quantized_clips"),
            "figures": {name: posixpath.join(eval_dir, rel) if eval_dir else rel
                        for name, rel in (ev.get("figures") or {}).items()},
            "gate": {
                "passed": gate.get("passed"),
                "threshold": gate.get("threshold"),
                "metric": gate.get("metric"),
                "value": gate.get("value"),
                "ci": gate.get("ci"),
                "failed": gate.get("failed"),
                "message": gate.get("message"),
                "checks": gate.get("checks"),
            },
        },
    }
    return report


def _vs_fp32(engine: dict) -> dict:
    return (engine.get("engines") or {}).get("onnxruntime", {}).get("vs_fp32") or {}


def _fd_inf_values(fd_inf: dict | None) -> dict | None:
    """FD-inf per comparison without the per-size points (those stay in ``eval/eval.json``)."""
    if not fd_inf:
        return None
    return {k: {"fd_inf": v.get("fd_inf"), "r2": v.get("r2"), "warning": v.get("warning")} for k, v in fd_inf.items()}


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _interval_txt(ci: Any, spec: str = ".4g", unit: str = "") -> str:
    if not ci or None in ci:
        return "–"
    return f"{format(ci[0], spec)}{unit} to {format(ci[1], spec)}{unit}"


_REF_NAMES = {"folder": "reference folder", "baseline_other_seeds": "reference draw (baseline, other seeds)"}


def render_quality(ev: dict) -> list[str]:
    """The ``Quality`` section of ``report.md``: gate verdict, metric table, warnings, figures."""
    if ev.get("num_clips") is None:
        return ["Evaluation was not run (--no-eval, or no engine was built)."]
    gate = ev.get("gate") or {}
    ref = ev.get("reference") or {}
    ref_name = _REF_NAMES.get(ref.get("kind"), str(ref.get("kind")))
    metric = "FAD" if str(ev.get("fd_kind") or "").startswith("FAD") else "FD"
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    lines = [f"**Quality gate: {verdict}**", ""]
    for c in gate.get("checks") or []:
        lines.append(f"- {'pass' if c.get('passed') else '**FAIL**'}: {c.get('message')}")
    if not gate.get("checks"):
        lines.append("- no gate threshold set")
    lines.append("")

    weight_free = " (weight-free)" if ev.get("embedder_weight_free") else ""
    lines += [
        f"- clips: {ev['num_clips']} per set ({_fmt(ev.get('steps'))} sampler steps, "
        f"{_fmt(ev.get('audio_seconds'))} s); the baseline and the engine use the same prompts and seeds",
        f"- embedder: `{ev.get('embedder')}`{weight_free}: {ev.get('embedder_description') or ''}",
        f"- distance: {ev.get('fd_kind') or metric}; reference: {ref_name}"
        + (f" `{ref.get('path')}`" if ref.get("path") else "") + f", {ref.get('clips', '–')} clips",
        "",
    ]
    if ev.get("embedder_weight_free"):
        lines += [
            f"> The default embedder has no learned weights: it detects signal-level drift (noise, spectral tilt, "
            f"loudness, temporal texture) but not whether the sound still matches its prompt, and its {metric} values "
            "are not comparable with published FD/FAD numbers. Give `--embedder panns-cnn14 --embedder-checkpoint "
            "FILE` for PANNs FD, KL and IS.",
            "",
        ]

    iv = ev.get("intervals") or {}
    inf = ev.get("fd_inf") or {}
    rows = [
        ("fd_quantized_vs_baseline", f"{metric}(quantized, baseline)", ".4g", ""),
        ("fd_baseline_vs_ref", f"{metric}(baseline, reference)", ".4g", ""),
        ("fd_quantized_vs_ref", f"{metric}(quantized, reference)", ".4g", ""),
        ("fd_increase_pct", f"{metric} increase vs reference (gated)", ".1f", "%"),
        ("paired_drift_pct", "paired drift (gated)", ".1f", "%"),
    ]
    lines += [
        "| metric | estimate | 95% interval | bootstrap bias | raw percentile interval | " + f"{metric}∞ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label, spec, unit in rows:
        i = iv.get(key) or {}
        est = ev.get(key)
        raw = _interval_txt(i.get("percentile_ci"), spec, unit)
        if i.get("estimate_in_percentile_ci") is False:
            raw += " (excludes the estimate)"
        fd_inf = {"fd_increase_pct": ev.get("fd_inf_increase_pct"), "paired_drift_pct": None}.get(
            key, (inf.get(key) or {}).get("fd_inf"))
        lines.append(
            f"| {label} | {'–' if est is None else format(est, spec) + unit} "
            f"| {_interval_txt(i.get('ci'), spec, unit)} "
            f"| {_fmt(i.get('bias'), spec)} | {raw} | {_fmt(fd_inf, spec)}{unit if fd_inf is not None else ''} |"
        )
    boot = ev.get("bootstrap") or {}
    lines += [
        "",
        f"Intervals: {boot.get('n_boot', '–')} bootstrap replicates resampling {boot.get('resampling', 'clips')}. "
        "Resampling duplicates clips, which inflates FD; the interval shown is the percentile interval shifted by "
        "the bootstrap's median bias (`bias` column) so that it is centred on the estimate. It describes the "
        "spread of the estimate at this number of clips, not the distance at infinitely many clips. "
        f"{metric} increase = 100 × ({metric}(quantized, reference) − {metric}(baseline, reference)) / "
        f"{metric}(baseline, reference). Paired drift = 100 × mean ‖e(quantized clip) − e(its baseline clip)‖² / "
        "mean ‖e(baseline clip) − e(other baseline clip)‖²: 0 is identical output, about 100 is unrelated output.",
        "",
    ]

    kl, is_, clap = ev.get("kl"), ev.get("inception_score"), ev.get("clap_score")
    if kl:
        lines.append(f"- KL(baseline ‖ quantized), softmax over class logits, paired by prompt and seed: "
                     f"{_fmt(kl.get('quantized_vs_baseline'))} "
                     f"(sigmoid variant {_fmt(kl.get('quantized_vs_baseline_sigmoid'))})"
                     + (f"; baseline vs reference draw (same prompts, other seeds): {_fmt(kl.get('baseline_vs_ref'))}"
                        if kl.get("baseline_vs_ref") is not None else ""))
    else:
        lines.append(f"- KL and inception score: not computed (embedder `{ev.get('embedder')}` has no class head; "
                     "they need PANNs Cnn14 logits)")
    if is_:
        lines.append("- inception score: " + ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in is_.items()))
    if clap:
        lines.append("- CLAP score (mean text-audio cosine): "
                     + ", ".join(f"{k} {_fmt(v, '.4f')}" for k, v in clap.items()))
    else:
        lines.append("- CLAP score: not computed (give `--clap-checkpoint DIR`)")
    lines.append("- final-latent relative L2 (engine vs baseline trajectory): "
                 f"{_fmt(ev.get('final_latent_rel_l2'), '.3e')}")

    warnings = []
    if ev.get("nonfinite_quantized_clips"):
        warnings.append(f"the engine produced NaN/inf audio in clips {ev['nonfinite_quantized_clips']}")
    if ev.get("fd_warning"):
        warnings.append(ev["fd_warning"])
    for key, i in iv.items():
        if (i or {}).get("estimate_in_percentile_ci") is False:
            warnings.append(f"{key}: the raw bootstrap percentile interval excludes the estimate (resampling bias "
                            f"{_fmt(i.get('bias'))}); read the bias-shifted interval")
    inf_warnings = {(v or {}).get("warning") for v in inf.values()} - {None}
    for w in sorted(inf_warnings):
        warnings.append(f"{metric}∞: {w}")
    if warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in warnings]

    figures = ev.get("figures") or {}
    captions = {
        "fd": f"{metric} per comparison with its interval, and the gate",
        "spectrograms": "Log-mel spectrograms, baseline vs quantized, same prompt and seed",
        "latent_error": "Per-step latent error between the engine's and the baseline's trajectories",
    }
    if figures:
        lines += ["", "### Figures", ""]
        for name in ("fd", "spectrograms", "latent_error"):
            if name in figures:
                lines += [f"![{captions[name]}]({figures[name]})", "", f"*{captions[name]}.*", ""]
    return lines


def render_markdown(report: dict) -> str:
    """A readable summary of a report (what ``report.md`` holds)."""
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
    ]
    if size.get("unet_export_bytes") is not None:
        lines += [
            "## Size of the U-Net",
            "",
            "| form | size | vs FP32 |",
            "|---|---:|---:|",
            f"| FP32 | {mb(size['unet_fp32_bytes'])} | 100% |",
            f"| FP16 | {mb(size['unet_fp16_bytes'])} | 50% |",
            f"| exported ({report['precision']}) | {mb(size['unet_export_bytes'])} | "
            f"{_fmt(None if size['reduction_vs_fp32'] is None else 100 * size['reduction_vs_fp32'], '.1f')}% |",
            "",
        ]
    if parity.get("onnx_vs_torch_rel_l2") is not None:
        lines += [
            "## Parity (relative L2 of one denoiser call on cached calibration inputs, worst point)",
            "",
            f"- ONNX Runtime vs torch fake-quant: {_fmt(parity['onnx_vs_torch_rel_l2'], '.2e')} "
            f"(mean {_fmt(parity['onnx_vs_torch_mean_rel_l2'], '.2e')})",
            f"- rounding floor (torch fake-quant, float64 vs float32): {_fmt(parity['rounding_floor_rel_l2'], '.2e')} "
            f"(mean {_fmt(parity['rounding_floor_mean_rel_l2'], '.2e')})",
            f"- quantization error (fake-quant vs full precision): {_fmt(parity['quant_error_rel_l2'], '.2e')} "
            f"(mean {_fmt(parity['quant_error_mean_rel_l2'], '.2e')})",
            *([f"- stage by stage (torch fed ONNX Runtime's codes at every quantizer; the verdict): output "
               f"{_fmt(parity['teacher_forced_rel_l2'], '.2e')}, codes one step apart "
               f"{_fmt(parity.get('codes_one_step_fraction'), '.1e')} of all, more than one step "
               f"{parity.get('codes_more_steps')}"] if parity.get("teacher_forced_rel_l2") is not None else []),
            f"- parity check: {'passed' if parity['passed'] else 'FAILED' if parity['passed'] is False else '–'}",
            "",
        ]
    lines += render_quantization(report.get("quantization") or {})
    lines += [
        "## Engine",
        "",
        f"- backend: {engine['backend']}; layer precisions: {json.dumps(engine['layer_precisions'])}",
        f"- ONNX Runtime latency per denoiser call: {_fmt(engine['latency_ms'], '.1f')} ms",
    ]
    vs = _vs_fp32(engine)
    if vs.get("speedup_vs_fp32") is not None:
        lines.append(f"- speed-up over FP32 on this CPU: **{vs['speedup_vs_fp32']:.2f}x** ({_fmt(engine['latency_ms'], '.1f')} "
                     f"vs {_fmt(vs['fp32_reference']['median_ms'], '.1f')} ms per call, batch {vs['batch']}, "
                     f"{vs['frames']} latent frames, {vs['threads']} threads, median of {vs['engine']['runs']} "
                     f"round-robin calls; load average {vs.get('load_average')}; FP32 reference: "
                     f"{vs['fp32_reference'].get('graph')})")
    lines += render_ort_engine((engine.get("engines") or {}).get("onnxruntime") or {})
    for name, e in (engine.get("engines") or {}).items():
        if name != "onnxruntime":
            lines.append(f"- {name}: " + (f"built, layer precisions {json.dumps(e.get('layer_precisions'))} "
                                          f"(source: {e.get('source')})" if e.get("built") else f"not built ({e.get('reason')})"))
    lines += ["", "## Quality", "", *render_quality(ev)]
    return "\n".join(lines).rstrip("\n") + "\n"


def render_ort_engine(ort: dict) -> list[str]:
    """Markdown lines for the ONNX Runtime engine: graph kind, fused ops, weights/activations, parity."""
    if not ort or ort.get("graph") in (None, "export"):
        return ["- ONNX Runtime graph: the export as it is (built for the CPU; no diffusion fusions)"] if ort else []
    lines = [f"- ONNX Runtime CUDA engine ({ort['graph']}): {ort.get('summary')}"]
    if (ort.get("weights") or {}).get("note"):
        lines.append(f"  - weights: {ort['weights']['note']}")
    lines.append(f"  - activations: {(ort.get('activations') or {}).get('note')}")
    lines.append(f"  - kept FP32: {(ort.get('fp32_kept') or {}).get('nodes')} nodes "
                 f"({(ort.get('fp32_kept') or {}).get('why')})")
    p = ort.get("parity") or {}
    if p:
        where = "the served graph on CUDA" if p.get("served_graph_checked") else \
            f"not the served graph ({p.get('reason')}); checked: {p.get('checked')}"
        lines.append(f"  - parity: max relative L2 {_fmt(p.get('max'), '.2e')} vs {p.get('reference')} "
                     f"(tolerance {_fmt(p.get('tolerance'), '.1e')}; {where})")
    if ort.get("fusion_error"):
        lines.append(f"  - the optimizer failed ({ort['fusion_error']}): the FP16 graph is served unfused")
    return lines


def render_quantization(quant: dict, top: int = 10) -> list[str]:
    """Markdown lines for the per-layer formats and, for ``mixed``, the sensitivity search."""
    lines: list[str] = []
    placement = quant.get("placement") or {}
    if isinstance(placement, dict) and placement.get("value"):
        lines += ["## Q/DQ placement", "", f"- {placement['value']}: {placement.get('reason') or '–'}", ""]
    formats = quant.get("formats") or {}
    if formats:
        lines += ["## Formats", "", "| format | layers | parameters |", "|---|---:|---:|"]
        lines += [f"| {k} | {v.get('layers')} | {v.get('params'):,} |" for k, v in sorted(formats.items())]
        changes = (quant.get("capability") or {}).get("changes") or []
        if changes:
            lines += ["", f"{len(changes)} layer(s) changed for the target (--allow-adjust): see report.json "
                      "`quantization.capability.changes`."]
        lines.append("")
    search = quant.get("search")
    if not search:
        return lines
    sol = search.get("solution") or {}
    traj = sol.get("trajectory_check") or {}
    lines += [
        "## Mixed-precision search",
        "",
        f"- budget: {_fmt(100 * sol['budget_fraction'], '.0f')}% of the FP32 bytes; predicted weights "
        f"{_fmt(100 * sol.get('predicted_fraction', 0.0), '.1f')}% of FP32",
        f"- items searched: {sol.get('items', '–')} ({sol.get('granularity', 'layer')} granularity), "
        f"sensitivity measured on {sol.get('eval_points', '–')} cached point(s)",
        f"- U-Net output error vs full precision: predicted {_fmt(sol.get('predicted_rel_l2'), '.4f')}, "
        f"measured {_fmt(sol.get('measured_rel_l2'), '.4f')} (relative L2)",
    ]
    if traj.get("top_k"):
        lines.append(f"- trajectory check: the {traj['top_k']} most sensitive items per format re-measured on "
                     f"{traj.get('steps', '–')}-step sampler runs of {traj.get('prompts', '–')} prompt(s), "
                     f"comparing {traj.get('compared', 'final latents')}")
    aq = search.get("modelopt_auto_quantize")
    if aq:
        if aq.get("ran"):
            lines.append(f"- ModelOpt `mtq.auto_quantize` side by side (effective bits {_fmt(aq.get('effective_bits'), '.1f')}): "
                         f"measured error {_fmt(aq.get('measured_rel_l2'), '.4f')}, formats {json.dumps(aq.get('recipes'))}")
        else:
            lines.append(f"- ModelOpt `mtq.auto_quantize`: did not run ({aq.get('reason')})")
    ranking = search.get("ranking") or []
    fmts = sorted({f for r in ranking for f in r.get("sensitivity", {}) if f != "fp16"})
    if ranking:
        lines += ["", f"Most sensitive items (of {len(ranking)}; squared relative L2 of one U-Net call, "
                  "trajectory: relative L2 of the final latents):", "",
                  "| item | layers | params | " + " | ".join(fmts) + " | trajectory | chosen |",
                  "|---|---:|---:|" + "---:|" * len(fmts) + "---|---|"]
        for r in ranking[:top]:
            sens = r.get("sensitivity", {})
            tr = ", ".join(f"{k} {v:.3g}" for k, v in sorted((r.get("trajectory_rel_l2") or {}).items())) or "–"
            lines.append(f"| `{r['layer']}` | {r.get('layers', 1)} | {r.get('params', 0):,} | "
                         + " | ".join(_fmt(sens.get(f), '.3g') for f in fmts) + f" | {tr} | {r.get('chosen')} |")
    return lines + [""]


def write_report(folder: Path, report: dict) -> None:
    """Write ``report.json`` and ``report.md`` into ``folder`` (each atomically)."""
    write_json(folder / "report.json", report)
    write_text(folder / "report.md", render_markdown(report))


def load_report(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
