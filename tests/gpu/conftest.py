"""The GPU acceptance suite's fixtures and helpers.

Every test here is skipped (at collection, with the reason) unless torch sees a CUDA GPU and
ONNX Runtime has its CUDAExecutionProvider (onnxruntime-gpu): on a CPU machine ``python -m pytest
tests/gpu`` collects and skips everything, and nothing heavy is imported.

Commands run the way a user runs them: ``build`` as a subprocess (``python -m adm_export``), the
other commands through click's CliRunner in this process (same code path, no interpreter start-up
and no second load of ModelOpt's CUDA extension per command: GPU time is scarce).

``ADM_GPU_SUITE_DRY_RUN=cpu`` runs the suite's own code on the CPU (``--device cpu``, the
tiny-audioldm pipeline saved in place of the AudioLDM-S-sized one, CUDA-only checks and options
skipped): a check of the tests before GPU time is spent on them, not a GPU result.

``ADM_GPU_WORKDIR=DIR`` keeps the suite's folders (the saved AudioLDM-S-sized pipeline, builds,
engines) in ``DIR`` instead of pytest's temporary folders, so a later command on the same machine
(``benchmarks/gpu_session.sh``) can reuse them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DRY_RUN = os.environ.get("ADM_GPU_SUITE_DRY_RUN") == "cpu"
#: ``--device`` of every command (``cpu`` only in the dry run).
DEVICE = "cpu" if DRY_RUN else "cuda"
#: Extra ``build`` settings of the dry run: fewer prompts, steps and clips (the CPU is slow).
DRY_BUILD = ["--num-prompts", 2, "--steps", 2, "--points", 2, "--num-clips", 2, "--eval-steps", 2] if DRY_RUN else []


#: ``pytestmark`` of a module whose every test needs CUDA itself (device tensors, CUDA graphs, the
#: CUDA provider's options): outside the dry run the collection hook below already skips the whole
#: suite without a GPU; this also keeps such a module out of the CPU dry run.
CUDA_ONLY = pytest.mark.skipif(DRY_RUN, reason="dry run on the CPU: this module is CUDA-only")


def cuda_only(what: str) -> None:
    """Skip the rest of a test in the CPU dry run (a CUDA-only option or check)."""
    if DRY_RUN:
        pytest.skip(f"dry run on the CPU: {what} is CUDA-only")


def gpu_ready() -> tuple[bool, str]:
    """Whether the suite can run here, and why not."""
    if DRY_RUN:
        return True, ""
    try:
        import torch
    except ImportError:
        return False, "needs torch"
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "needs onnxruntime-gpu (pip install 'adm-export[gpu]')"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "needs onnxruntime-gpu's CUDAExecutionProvider (pip install 'adm-export[gpu]')"
    return True, ""


def pytest_collection_modifyitems(config, items):
    ready, why = gpu_ready()
    if ready:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


# -- running the CLI -----------------------------------------------------------------------------
def _output(result) -> str:
    text = result.output
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        text += "".join(traceback.format_exception(*result.exc_info))
    return text[-6000:]


def cli(*args, expect: int | None = 0):
    """Run ``adm-export ARGS`` in this process; assert the exit code (``None``: any) and return the result."""
    from click.testing import CliRunner

    from adm_export.cli import cli as group

    result = CliRunner().invoke(group, [*map(str, args)])
    if expect is not None:
        command = " ".join(map(str, args))
        assert result.exit_code == expect, f"adm-export {command} -> {result.exit_code}\n{_output(result)}"
    return result


def cli_subprocess(*args, timeout: float = 590, expect: int | None = 0) -> subprocess.CompletedProcess:
    """Run ``python -m adm_export ARGS`` as its own process (exactly what a user types)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ADM_EXPORT_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "adm_export", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))
    if expect is not None:
        assert proc.returncode == expect, (f"adm-export {' '.join(map(str, args))} -> {proc.returncode}\n"
                                           f"{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def wavs(folder: Path, count: int, seconds: float, rate: int = 16000) -> list:
    """The ``count`` WAV files of a folder, each ``seconds`` long and finite; returns the arrays."""
    import numpy as np
    import soundfile as sf

    files = sorted(Path(folder).glob("*.wav"))
    assert len(files) == count, f"{folder}: {len(files)} WAV files, expected {count}"
    out = []
    for f in files:
        audio, sr = sf.read(str(f), dtype="float32")
        assert sr == rate and len(audio) == int(seconds * rate), (f, sr, len(audio))
        assert np.isfinite(audio).all(), f
        out.append(audio)
    return out


def rel_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def fusions(engines: Path) -> dict | None:
    """The fused-op counts the CUDA engine stage writes (``onnxruntime/layers.json``, key ``fusions``);
    ``None`` in the CPU dry run (the CPU engine fuses nothing)."""
    if DRY_RUN:
        return None
    layers = read_json(Path(engines) / "onnxruntime" / "layers.json")
    assert "fusions" in layers, f"{engines}/onnxruntime/layers.json has no 'fusions' ({list(layers)}): no CUDA engine"
    return layers["fusions"]


def fused_total(counts) -> int:
    """Sum of the fused-op counts (nested dicts allowed)."""
    if isinstance(counts, dict):
        return sum(fused_total(v) for v in counts.values())
    return int(counts) if isinstance(counts, (int, float)) and not isinstance(counts, bool) else 0


# -- shared folders -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def gpu_workdir(tmp_path_factory) -> Path:
    env = os.environ.get("ADM_GPU_WORKDIR")
    if env:
        path = Path(env)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("gpu")


@pytest.fixture(scope="session")
def audioldm_s_dir(gpu_workdir) -> Path:
    """An AudioLDM-S-sized ``AudioLDMPipeline`` with seeded random weights, written by ``save_pretrained``
    exactly like a downloaded checkpoint (``benchmarks/speed_common.build_audioldm_s_pipeline``)."""
    return saved_pipeline(gpu_workdir)


def saved_pipeline(workdir: Path) -> Path:
    """Write the suite's saved pipeline folder under ``workdir`` unless it is there; return it.

    ``benchmarks/gpu_session.sh suite-all`` calls this once before it starts the suite's parts side by side,
    so that they do not all write the same folder at once."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed_common

    if DRY_RUN:
        return speed_common.saved_pipeline(Path(workdir) / "tiny-audioldm-dir", "tiny")
    return speed_common.saved_pipeline(Path(workdir) / "audioldm-s", "audioldm-s")
