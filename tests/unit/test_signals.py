"""SIGINT and SIGTERM mid-run: one line, exit 130 / 143, no partial output or lock left, finished
shards kept; the same command then resumes and completes.

Each long stage runs as its own process (``python -m adm_export``); the signal is sent once the
stage has finished a unit of its sharded loop (a shard file appeared), or, for ``generate`` (no
shards), once the stage has started (it holds the output's lock).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adm_export.stages.runner import lock_path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "tiny-audioldm"]
SMALL_CAL = ["--num-prompts", "6", "--steps", "2", "--points", "4", "--seconds", "0.64", "--select", "uniform"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "ADM_EXPORT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "adm_export", *map(str, args)], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the process ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def _shards(out: Path) -> list[Path]:
    return sorted((out.parent / f".{out.name}.shards").glob("*/*.pt"))


def _interrupt(args: list[str], out: Path, signum: int, log: Path, after_start: bool = False) -> None:
    """Run, send ``signum`` mid-run, and check the interrupted run's outcome."""
    before = len(_shards(out))
    proc = _start(args, log)
    try:
        if after_start:
            lock = lock_path(out)
            _wait_for(proc, lock.exists, "the stage's start (its lock file)")
            time.sleep(1.0)
        else:
            _wait_for(proc, lambda: len(_shards(out)) > before, "a new shard")
        proc.send_signal(signum)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # pragma: no cover - only when an assertion fired first
            proc.kill()
    text = log.read_text()
    assert code == 128 + signum, text[-2000:]
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: interrupted by {signal.Signals(signum).name}: partial output removed; finished shards "
                     f"are kept, so the same command resumes"], text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p.name == out.name)
    assert left == ([f".{out.name}.shards"] if not after_start else []), left  # no out, .partial or .lock


def _complete(args: list[str], out: Path, log: Path, resumed: bool) -> str:
    proc = _start(args, log)
    code = proc.wait(timeout=900)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert out.is_dir() and (out / ("report.json" if (out / "report.json").exists() else "manifest.json")).exists() \
        or (out / "generate.json").is_file()
    left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))
    assert left == [], left  # shard area, lock and partial folders all gone
    if resumed:
        assert "reused from" in text, text[-2000:]
    return text


@pytest.mark.slow
def test_calibrate_interrupted_twice_then_resumed(tmp_path):
    out = tmp_path / "cal"
    args = ["calibrate", *TINY, *SMALL_CAL, "--out", out]
    _interrupt(args, out, signal.SIGINT, tmp_path / "1.log")
    _interrupt(args, out, signal.SIGTERM, tmp_path / "2.log")
    text = _complete(args, out, tmp_path / "3.log", resumed=True)
    assert "calibration cache: 4 points" in text


@pytest.mark.slow
def test_build_interrupted_then_resumed(tmp_path):
    out = tmp_path / "b"
    args = ["build", *TINY, *SMALL_CAL, "--engine", "none", "--no-eval", "--out", out]
    _interrupt(args, out, signal.SIGTERM, tmp_path / "1.log")
    _complete(args, out, tmp_path / "2.log", resumed=True)
    assert (out / "onnx" / "unet.onnx").is_file() and (out / "report.md").is_file()


@pytest.mark.slow
def test_eval_interrupted_then_resumed(tiny_build, tmp_path):
    out = tmp_path / "ev"
    args = ["eval", "--engine", tiny_build[0] / "engines", "--num-clips", "16", "--eval-steps", "2",
            "--eval-seconds", "0.64", "--bootstrap", "20", "--out", out]
    _interrupt(args, out, signal.SIGINT, tmp_path / "1.log")
    _complete(args, out, tmp_path / "2.log", resumed=True)
    assert (out / "eval.json").is_file()


@pytest.mark.slow
def test_generate_interrupted_then_rerun(tiny_build, tmp_path):
    out = tmp_path / "clips"
    args = ["generate", "--engine", tiny_build[0] / "engines", "--steps", "6", "--seconds", "1.28",
            "--batch-size", "1", *[a for i in range(12) for a in ("--prompt", f"a dog barks {i}")], "--out", out]
    _interrupt(args, out, signal.SIGTERM, tmp_path / "1.log", after_start=True)
    _complete(args, out, tmp_path / "2.log", resumed=False)
    assert len(list(out.glob("*.wav"))) == 12
