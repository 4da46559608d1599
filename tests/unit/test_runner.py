"""The stage runner (adm_export.stages.runner): lock, output probe, signals, memory errors, atomic runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from adm_export.errors import InvalidInputError, OutOfMemoryError, OutputExistsError, OutputLockedError
from adm_export.stages import runner
from adm_export.stages.runner import Interrupted, OutputLock, StageRun, run_stage


def _leftovers(parent):
    """Names beside an output folder that a stage must not leave behind."""
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_second_lock_is_refused_with_the_holder(tmp_path):
    out = tmp_path / "out"
    first = OutputLock(out)
    first.acquire()
    with pytest.raises(OutputLockedError, match=rf"--out '{out}' is being written by another adm-export process "
                                                rf"\(pid {os.getpid()}\)"):
        OutputLock(out).acquire()
    first.release()
    assert _leftovers(tmp_path) == []  # the lock file goes with the lock
    again = OutputLock(out)
    again.acquire()
    again.release()


def test_lock_held_by_another_process(tmp_path):
    """Two processes: the second is refused while the first holds the lock, and may go once it is gone."""
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys, time
        from adm_export.stages.runner import OutputLock
        lock = OutputLock({str(out)!r}); lock.acquire(); print("locked", flush=True); sys.stdin.readline()
        lock.release()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid}"):
            OutputLock(out).acquire()
    finally:
        proc.communicate("go\n", timeout=30)
    lock = OutputLock(out)
    lock.acquire()
    lock.release()


@pytest.mark.parametrize("where", ["/proc/adm-export-no/such/out", "file/out"])
def test_uncreatable_out_is_one_line_and_leaves_nothing(tmp_path, where):
    if where.startswith("file"):
        (tmp_path / "file").write_text("x")
        where = str(tmp_path / where)
    lock = OutputLock(where)
    with pytest.raises(InvalidInputError, match=r"--out .* cannot be written: .*choose a folder on a writable disk"):
        lock.acquire()
    assert not os.path.exists(os.path.dirname(where)) or os.path.isfile(os.path.dirname(where))


def test_run_stage_failure_removes_made_parents_lock_and_partial(tmp_path):
    out = tmp_path / "a" / "b" / "out"

    def work(folder):
        from adm_export.artifacts import atomic_dir

        with atomic_dir(folder) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise InvalidInputError("bad input found mid-stage")

    with pytest.raises(InvalidInputError, match="mid-stage"):
        run_stage(StageRun("test", out), work)
    assert _leftovers(tmp_path) == []


def test_run_stage_atomic_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    seen = {}

    def work(folder):
        seen["folder"] = folder
        assert folder != out and folder.name.endswith(".partial") and not out.exists()
        (folder / "report.json").write_text("{}")
        return {"ok": True}

    assert run_stage(StageRun("test", out, atomic=True), work) == {"ok": True}
    assert (out / "report.json").is_file() and not seen["folder"].exists()
    assert _leftovers(tmp_path) == ["out"]
    with pytest.raises(OutputExistsError, match="--force"):
        run_stage(StageRun("test", out, atomic=True), work)


def test_run_stage_refuses_a_file(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(OutputExistsError, match="exists and is not a folder"):
        run_stage(StageRun("test", tmp_path / "out"), lambda folder: None)
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_becomes_interrupted_and_cleans_up(tmp_path, signum):
    out = tmp_path / "out"
    before = signal.getsignal(signum)

    def work(folder):
        with runner.atomic_dir(out, force=False) as tmp:
            (tmp / "x").write_text("half")
            os.kill(os.getpid(), signum)
            raise AssertionError("the signal did not interrupt")  # pragma: no cover

    with pytest.raises(Interrupted) as info:
        run_stage(StageRun("test", out, atomic=True), work)
    assert info.value.exit_code == 128 + signum
    assert runner.exit_code(info.value) == 128 + signum
    assert "partial output removed" in runner.error_line(info.value)
    assert _leftovers(tmp_path) == []
    assert signal.getsignal(signum) == before


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("[ONNXRuntimeError] : 6 : Failed to allocate memory for "
                                                               "requested buffer of size 115200000000"),
                                 RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 8 GB")])
def test_out_of_memory_is_one_line_naming_what_to_lower(tmp_path, exc):
    def work(folder):
        raise exc

    with pytest.raises(OutOfMemoryError, match=r"generate: out of memory \(.*\); lower --seconds or --batch-size"):
        run_stage(StageRun("generate", tmp_path / "out", lower=("--seconds", "--batch-size")), work)
    assert _leftovers(tmp_path) == []


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(ZeroDivisionError):
        run_stage(StageRun("test", tmp_path / "out"), lambda folder: 1 / 0)
    assert _leftovers(tmp_path) == []


def test_attention_memory_refuses_a_length_that_cannot_fit(tiny_adapter, monkeypatch):
    from adm_export.engines import memory

    need = tiny_adapter.attention_bytes(2, 600.0)
    assert need == max(2 * 4 * (-(-15000 // 2 ** i) * (16 // 2 ** i)) ** 2 * 4 for i in (1, 2))  # CrossAttn levels
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * 10 ** 9)
    with pytest.raises(OutOfMemoryError, match=r"--seconds 600 needs .* GB .* lower --seconds \(at most ([\d.]+) s "
                                               r"here\) or --batch-size") as info:
        memory.check_attention_memory(tiny_adapter, 600.0, 2, "cpu", "--seconds", "--batch-size")
    import re

    fits = float(re.search(r"at most ([\d.]+) s", str(info.value)).group(1))
    assert tiny_adapter.attention_bytes(2, fits) <= 2e9 < tiny_adapter.attention_bytes(2, fits + 0.5)
    memory.check_attention_memory(tiny_adapter, 2.56, 2, "cpu", "--seconds")  # fits: no error


def test_which_engines_hold_attention_scores():
    """The CPU engine (the export as it is) holds score matrices; the fused CUDA engine does not."""
    from adm_export.engines.memory import attention_materialized, score_bytes

    cpu = {"precision": "int8", "report": {"engines": {"onnxruntime": {"graph": "export"}}}}
    fused = {"precision": "fp16", "report": {"engines": {"onnxruntime": {"fusions": {"MultiHeadAttention": 32}}}}}
    unfused = {"precision": "fp16", "report": {"engines": {"onnxruntime": {"fusions": {"MultiHeadAttention": 0}}}}}
    assert attention_materialized(cpu, "cpu") and attention_materialized(unfused, "cuda")
    assert not attention_materialized(fused, "cuda")
    assert (score_bytes(cpu, "cpu"), score_bytes(fused, "cuda"), score_bytes(unfused, "cpu")) == (4, 2, 2)
