"""The GPU suite's result file: ``python -m pytest tests/gpu --gpu-report PATH`` writes PATH.json and PATH.md.

What it records: date, card (name, memory, compute capability, driver, CUDA and cuDNN versions),
the commit (``git rev-parse HEAD``; on a copy that is not a git checkout, ``$ADM_COMMIT``), the
versions of the packages the suite exercises, ONNX Runtime's providers, and every test's outcome
(passed / failed / skipped / error), seconds and first line of its failure or skip reason, plus
what a test recorded with ``record_property`` (stage times, fused-op counts, seconds per clip).

Results of several calls (the suite split to fit a 10-minute command) are combined with::

    python -m tests.gpu.report merge part1.json part2.json --out benchmarks/results/gpu_suite

The option is registered in ``tests/conftest.py`` so that it exists for any ``pytest tests...``
invocation; the plugin itself is registered only when it is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("torch", "onnxruntime", "onnx", "diffusers", "transformers", "modelopt", "numpy", "click",
            "tensorrt", "tensorrt_rtx")


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def commit() -> dict:
    """The code's commit: git where the tree is a checkout, else ``$ADM_COMMIT`` (the device copy)."""
    root = Path(__file__).resolve().parents[2]
    head = _run(["git", "-C", str(root), "rev-parse", "HEAD"])
    if head:
        dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
        return {"commit": head, "source": "git", "uncommitted_changes": bool(dirty)}
    env = os.environ.get("ADM_COMMIT")
    return {"commit": env or "unknown", "source": "ADM_COMMIT" if env else "none"}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", None)
        except Exception:  # noqa: BLE001 - a missing or broken optional package is recorded, not fatal
            out[name] = None
    for dist in ("onnxruntime-gpu", "onnxruntime", "nvidia-modelopt"):
        try:
            out[f"dist:{dist}"] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def card() -> dict:
    """The GPU and its software stack (empty values where there is none)."""
    info: dict = {"cuda_available": False}
    try:
        import torch
    except ImportError:
        return info
    info.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(),
                    memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if smi:
        info["nvidia_smi"] = smi.splitlines()
        parts = [p.strip() for p in smi.splitlines()[0].split(",")]
        if len(parts) > 1:
            info["driver"] = parts[1]
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return info


class GpuReport:
    """pytest plugin: collects per-test outcomes and writes ``PATH.json`` and ``PATH.md`` at the end."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.base = path.with_suffix("") if path.suffix in (".json", ".md") else path
        self.tests: dict[str, dict] = {}
        self.started = time.time()
        self.environment: dict | None = None

    def pytest_runtest_logreport(self, report):
        entry = self.tests.setdefault(report.nodeid, {"test": report.nodeid, "outcome": "passed", "seconds": 0.0})
        entry["seconds"] = round(entry["seconds"] + float(report.duration), 2)
        if report.user_properties:
            entry.setdefault("properties", {}).update({k: v for k, v in report.user_properties})
        if report.skipped:
            entry["outcome"] = "skipped"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            entry["message"] = str(reason).removeprefix("Skipped: ")[:300]
        elif report.failed:
            # A failure outside the test body (fixture set-up or tear-down) is an error.
            entry["outcome"] = "failed" if report.when == "call" else "error"
            text = getattr(report, "longreprtext", "") or str(report.longrepr)
            lines = [ln for ln in text.splitlines() if ln.startswith("E ")] or text.splitlines()[-1:]
            entry["message"] = " ".join(ln[1:].strip() for ln in lines[:3])[:500]
        if report.when == "teardown":
            # After every test: a run killed at its deadline still leaves the results so far.
            self.write(None)

    def pytest_sessionfinish(self, session, exitstatus):
        self.write(int(exitstatus))

    def write(self, exitstatus: int | None) -> None:
        if self.environment is None:
            self.environment = environment()
        write(self.base, collect(list(self.tests.values()), time.time() - self.started, exitstatus, self.environment))


def environment() -> dict:
    """Card, code and versions (read once per run)."""
    return {"host": platform.node(), "card": card(), "code": commit(), "versions": versions()}


def collect(tests: list[dict], seconds: float, exitstatus: int | None = None, env: dict | None = None) -> dict:
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        **(env or environment()),
        "command": " ".join(sys.argv),
        "seconds": round(seconds, 1),
        "exitstatus": exitstatus,  # None: written before the end (after a test), or merged
        "counts": counts,
        "tests": tests,
    }


def markdown(result: dict) -> str:
    c = result["card"]
    code = result["code"]
    v = result["versions"]
    counts = ", ".join(f"{n} {k}" for k, n in sorted(result["counts"].items()))
    lines = [
        "# GPU acceptance suite (`tests/gpu`)",
        "",
        f"- **Date**: {result['date']}",
        f"- **Card**: {c.get('name', 'no CUDA GPU')} ({c.get('memory_gib', '?')} GiB, compute capability "
        f"{c.get('compute_capability', '?')}); driver {c.get('driver', '?')}, CUDA (torch) {c.get('torch_cuda')}, "
        f"cuDNN {c.get('cudnn')}; ONNX Runtime providers: {', '.join(c.get('onnxruntime_providers', [])) or '—'}",
        f"- **Commit**: {code['commit']} ({code['source']}"
        f"{', with uncommitted changes' if code.get('uncommitted_changes') else ''})",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- **Result**: {counts} in {result['seconds']:.0f} s" + (
            f" (parts: {', '.join(result['parts'])})" if result.get("parts") else ""),
        "",
        "| test | outcome | s | notes |",
        "| --- | --- | ---: | --- |",
    ]
    for t in result["tests"]:
        notes = []
        if t.get("message"):
            notes.append(t["message"].replace("|", "\\|"))
        for k, val in (t.get("properties") or {}).items():
            text = val if isinstance(val, str) else json.dumps(val, default=str)
            notes.append(f"{k}: {text}".replace("|", "\\|"))
        name = t["test"].replace("|", "\\|")
        lines.append(f"| `{name}` | {t['outcome']} | {t['seconds']:.1f} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def write(base: Path, result: dict) -> None:
    base.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{base}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    Path(f"{base}.md").write_text(markdown(result))


def merge(paths: list[Path]) -> dict:
    """One result from several calls' JSON files (same card and commit expected; both are kept if not)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    tests = [t for p in parts for t in p["tests"]]
    merged = collect(tests, sum(p["seconds"] for p in parts), env={k: first[k] for k in ("host", "card", "code",
                                                                                          "versions")})
    merged.update(date=first["date"], parts=[f"{Path(p).name} ({r['date']}, {r['seconds']:.0f} s)"
                                                     for p, r in zip(paths, parts)])
    codes = {p["code"]["commit"] for p in parts}
    if len(codes) > 1:
        merged["code"] = {**first["code"], "commit": " + ".join(sorted(codes))}
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Combine GPU suite result files (tests/gpu --gpu-report).")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge several PATH.json into OUT.json and OUT.md")
    m.add_argument("files", nargs="+", type=Path)
    m.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = p.parse_args(argv)
    write(args.out.with_suffix("") if args.out.suffix in (".json", ".md") else args.out, merge(args.files))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
