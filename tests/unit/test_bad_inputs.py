"""Every command x every kind of bad input: exit 1, one line naming the flag, nothing left behind.

Conditions (README "Output and report": exit codes): a missing input, the artifact of another stage,
an artifact of another model, a ``manifest.json`` that is not JSON, a file changed since its manifest,
an output folder that cannot be created (under ``/proc``: refused for root too), an output path that
is a file, NaN / infinite / negative / zero numbers, and an output folder another process is writing
(its lock held). Inputs come from the session's tiny build; every case fails before any stage work.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_ARGS
from tests.helpers import one_error_line, run

UNWRITABLE = "/proc/adm-export-test/out"  # cannot be created, whoever runs the tests
SMALL_CAL = ["--model", "tiny-audioldm", "--num-prompts", "1", "--steps", "2", "--points", "2", "--seconds", "0.64"]

#: Each command with valid inputs; ``{name}`` is replaced by a path of the ``inputs`` fixture.
COMMANDS: dict[str, list[str]] = {
    "calibrate": ["calibrate", *SMALL_CAL],
    "quantize": ["quantize", "--calibration", "{calibration}"],
    "export": ["export", "--quantized", "{quantized}", "--calibration", "{calibration}"],
    "export-baseline": ["export-baseline", "--model", "tiny-audioldm"],
    "engine": ["engine", "--onnx", "{onnx}"],
    "eval": ["eval", "--engine", "{engines}", "--num-clips", "2", "--eval-steps", "2", "--eval-seconds", "0.64"],
    "generate": ["generate", "--engine", "{engines}", "--prompt", "a dog barks", "--steps", "2", "--seconds", "0.64"],
    "bundle": ["bundle", "{engines}"],
    "build": ["build", *TINY_ARGS],
}

#: (command, condition, arguments replacing or extending the valid ones, the flag the line must name).
INPUT_CASES: list[tuple[str, str, list[str], str]] = [
    # missing input
    ("calibrate", "missing input", ["--captions", "{missing}"], "--captions"),
    ("quantize", "missing input", ["--calibration", "{missing}"], "--calibration"),
    ("export", "missing input", ["--quantized", "{missing}"], "--quantized"),
    ("export-baseline", "missing input", ["--model", "{empty_dir}"], "--model"),
    ("engine", "missing input", ["--onnx", "{missing}"], "--onnx"),
    ("eval", "missing input", ["--engine", "{missing}"], "--engine"),
    ("eval", "missing input", ["--reference", "{missing}"], "--reference"),
    ("generate", "missing input", ["--engine", "{missing}"], "--engine"),
    ("generate", "missing input", ["--prompts", "{missing}"], "--prompts"),
    ("bundle", "missing input", ["{missing}"], "BUILD_DIR"),
    ("build", "missing input", ["--captions", "{missing}"], "--captions"),
    ("build", "missing input", ["--policy", "{missing}"], "--policy"),
    # the artifact of another stage
    ("quantize", "wrong stage", ["--calibration", "{onnx}"], "--calibration"),
    ("export", "wrong stage", ["--quantized", "{calibration}"], "--quantized"),
    ("export", "wrong stage", ["--calibration", "{quantized}"], "--calibration"),
    ("engine", "wrong stage", ["--onnx", "{quantized}"], "--onnx"),
    ("eval", "wrong stage", ["--engine", "{onnx}"], "--engine"),
    ("generate", "wrong stage", ["--engine", "{onnx}"], "--engine"),
    ("bundle", "wrong stage", ["{onnx}"], "BUILD_DIR"),
    # an artifact of another model
    ("quantize", "other model", ["--model", "{other_model}"], "--calibration"),
    ("eval", "other model", ["--model", "{other_model}"], "--engine"),
    ("generate", "other model", ["--model", "{other_model}"], "--engine"),
    ("bundle", "other model", ["--model", "{other_model}"], "BUILD_DIR"),
    # manifest.json that is not JSON
    ("quantize", "corrupt manifest", ["--calibration", "{corrupt_calibration}"], "--calibration"),
    ("export", "corrupt manifest", ["--quantized", "{corrupt_quantized}"], "--quantized"),
    ("engine", "corrupt manifest", ["--onnx", "{corrupt_onnx}"], "--onnx"),
    ("eval", "corrupt manifest", ["--engine", "{corrupt_engines}"], "--engine"),
    ("generate", "corrupt manifest", ["--engine", "{corrupt_engines}"], "--engine"),
    ("bundle", "corrupt manifest", ["{corrupt_engines}"], "BUILD_DIR"),
    # a file changed since the manifest was written
    ("quantize", "changed file", ["--calibration", "{changed_calibration}"], "--calibration"),
    ("export", "changed file", ["--quantized", "{changed_quantized}"], "--quantized"),
    ("engine", "changed file", ["--onnx", "{changed_onnx}"], "--onnx"),
    ("eval", "changed file", ["--engine", "{changed_engines}"], "--engine"),
    ("generate", "changed file", ["--engine", "{changed_engines}"], "--engine"),
    ("bundle", "changed file", ["{changed_engines}"], "BUILD_DIR"),
    # NaN, infinity, negative and zero numbers
    ("calibrate", "nan", ["--guidance-scale", "nan"], "--guidance-scale"),
    ("calibrate", "inf", ["--seconds", "inf"], "--seconds"),
    ("calibrate", "negative", ["--seconds", "-1"], "--seconds"),
    ("calibrate", "zero", ["--num-prompts", "0"], "--num-prompts"),
    ("calibrate", "zero", ["--points", "0"], "--points"),
    ("calibrate", "zero", ["--nproc", "0"], "--nproc"),
    ("quantize", "nan", ["--precision", "mixed", "--size-budget", "nan"], "--size-budget"),
    ("quantize", "negative", ["--sensitivity-frames", "-1"], "--sensitivity-frames"),
    ("quantize", "zero", ["--sensitivity-points", "0"], "--sensitivity-points"),
    ("export", "zero", ["--parity-points", "0"], "--parity-points"),
    ("export", "negative", ["--opset", "-1"], "--opset"),
    ("export-baseline", "zero", ["--opset", "0"], "--opset"),
    ("engine", "negative", ["--threads", "-1"], "--threads"),
    ("eval", "nan", ["--max-fd-increase", "nan"], "--max-fd-increase"),
    ("eval", "negative", ["--max-drift", "-1"], "--max-drift"),
    ("eval", "zero", ["--eval-seconds", "0"], "--eval-seconds"),
    ("eval", "zero", ["--eval-steps", "0"], "--eval-steps"),
    ("eval", "zero", ["--bootstrap", "0"], "--bootstrap"),
    ("generate", "nan", ["--seconds", "nan"], "--seconds"),
    ("generate", "inf", ["--guidance-scale", "inf"], "--guidance-scale"),
    ("generate", "negative", ["--guidance-scale", "-1"], "--guidance-scale"),
    ("generate", "zero", ["--batch-size", "0"], "--batch-size"),
    ("generate", "zero", ["--steps", "0"], "--steps"),
    # 10000 s: the U-Net's attention alone would need tens of terabytes, on any machine
    ("generate", "too long", ["--seconds", "10000"], "--seconds"),
    ("bundle", "nan", ["--max-seconds", "nan"], "--max-seconds"),
    ("bundle", "zero", ["--max-seconds", "0"], "--max-seconds"),
    ("build", "nan", ["--precision", "mixed", "--size-budget", "nan"], "--size-budget"),
    ("build", "inf", ["--max-fd-increase", "inf"], "--max-fd-increase"),
    ("build", "negative", ["--eval-seconds", "-1"], "--eval-seconds"),
    ("build", "zero", ["--num-clips", "1"], "--num-clips"),
    ("build", "zero", ["--steps", "0"], "--steps"),
]

#: Commands that write no folder (inspect, compare, serve): their bad inputs (the same expectations, no
#: --out; serve fails before it listens).
OTHER_CASES: list[tuple[str, list[str], str]] = [
    ("serve", ["serve", "{missing}"], "bundle"),
    ("serve", ["serve", "{engines}"], "bundle"),  # another stage's artifact
    ("serve", ["serve", "{corrupt_engines}"], "bundle"),
    ("serve", ["serve", "{engines}", "--max-wait-ms", "nan"], "--max-wait-ms"),
    ("serve", ["serve", "{engines}", "--port", "-1"], "--port"),
    ("serve", ["serve", "{engines}", "--timeout", "0"], "--timeout"),
    ("inspect", ["inspect", "{missing}"], "FOLDER"),
    ("inspect", ["inspect", "{corrupt_calibration}"], "FOLDER"),
    ("compare", ["compare", "{build}", "--baseline", "{missing}"], "--baseline"),
    ("compare", ["compare", "{build}", "--baseline", "{corrupt_calibration}/manifest.json"], "--baseline"),
    ("compare", ["compare", "{missing}", "--baseline", "{baseline}"], "BUILD_DIR"),
    ("compare", ["compare", "{build}", "--baseline", "{baseline}", "--fd-tolerance", "nan"],
     "--fd-tolerance"),
    ("compare", ["compare", "{build}", "--baseline", "{baseline}", "--size-tolerance", "-1"],
     "--size-tolerance"),
    ("compare", ["compare", "{build}", "--baseline", "{baseline}", "--json-out", UNWRITABLE + ".json"],
     "--json-out"),
    ("compare", ["compare", "{build}", "--baseline", "{baseline}", "--summary", UNWRITABLE + ".md"],
     "--summary"),
]


@pytest.fixture(scope="module")
def inputs(tiny_build, tmp_path_factory) -> dict[str, str]:
    """Valid stage folders (the session's build), broken copies of them, another model, missing paths."""
    from adm_export.models.embedded import build_tiny_audioldm

    out, result, _ = tiny_build
    assert result.exit_code == 0, result.output
    root = tmp_path_factory.mktemp("bad-inputs")
    paths = {"build": out, "missing": root / "no-such-path", "empty_dir": root / "empty"}
    paths["empty_dir"].mkdir()
    for stage in ("calibration", "quantized", "onnx", "engines"):
        paths[stage] = out / stage
        corrupt = shutil.copytree(out / stage, root / f"corrupt-{stage}")
        (corrupt / "manifest.json").write_text('{"stage": "' + stage + '", "files": ')
        paths[f"corrupt_{stage}"] = corrupt
        changed = shutil.copytree(out / stage, root / f"changed-{stage}")
        victim = max((p for p in changed.rglob("*") if p.is_file() and p.name != "manifest.json"),
                     key=lambda p: p.stat().st_size)
        with open(victim, "ab") as f:
            f.write(b"\0")
        paths[f"changed_{stage}"] = changed
    assert run("compare", out, "--baseline", root / "baseline.json", "--write-baseline").exit_code == 0
    paths["baseline"] = root / "baseline.json"
    build_tiny_audioldm(seed=7).save_pretrained(str(root / "other-model"))
    paths["other_model"] = root / "other-model"
    return {k: str(v) for k, v in paths.items()}


def _args(template: list[str], inputs: dict[str, str]) -> list[str]:
    return [a.format(**inputs) for a in template]


def _merge(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with the options of ``extra`` replacing its own (a bare path replaces the argument)."""
    args = list(base)
    i = 0
    while i < len(extra):
        if not extra[i].startswith("--"):  # a positional argument (bundle's BUILD_DIR)
            args[1] = extra[i]
            i += 1
            continue
        if extra[i] in args:
            j = args.index(extra[i])
            args[j + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
        i += 2
    return args


def _assert_refused(result, flag: str, out_parent: Path, expected_left: list[str]) -> None:
    assert result.exit_code == 1, result.output
    line = one_error_line(result)
    assert flag in line, line
    left = sorted(p.name for p in out_parent.iterdir())
    assert left == expected_left, f"left behind: {left}"


@pytest.mark.parametrize("command, condition, extra, flag", INPUT_CASES,
                         ids=[f"{c}-{cond}-{e[0].lstrip('-') if e[0].startswith('--') else 'arg'}"
                              for c, cond, e, _ in INPUT_CASES])
def test_bad_input(inputs, tmp_path, command, condition, extra, flag):
    args = _merge(_args(COMMANDS[command], inputs), _args(extra, inputs))
    r = run(*args, "--out", tmp_path / "out")
    _assert_refused(r, flag, tmp_path, [])


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("condition", ["unwritable out", "out is a file", "locked out"])
def test_bad_output(inputs, tmp_path, command, condition):
    from adm_export.stages.runner import OutputLock

    args = _args(COMMANDS[command], inputs)
    out = tmp_path / "out"
    lock = None
    if condition == "unwritable out":
        out = Path(UNWRITABLE)
    elif condition == "out is a file":
        out.write_text("mine")
    else:  # another process is writing it (the lock is per open file, so this process counts as one)
        lock = OutputLock(out)
        lock.acquire()
    try:
        r = run(*args, "--out", out)
    finally:
        if lock is not None:
            lock.release()
    _assert_refused(r, "--out", tmp_path, ["out"] if condition == "out is a file" else [])
    if condition == "out is a file":
        assert out.read_text() == "mine"
    if condition == "locked out":
        assert "being written by another adm-export process" in r.output


@pytest.mark.parametrize("command, template, flag", OTHER_CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(OTHER_CASES)])
def test_bad_input_of_commands_without_out(inputs, tmp_path, command, template, flag):
    r = run(*_args(template, inputs))
    _assert_refused(r, flag, tmp_path, [])


def test_points_over_the_available_pairs_is_one_warning_line(tmp_path, caplog):
    """``--points 1000`` with 1 prompt x 2 steps keeps the 2 points there are, and says so once."""
    import logging

    import adm_export as ae

    with caplog.at_level(logging.WARNING, logger="adm_export"):
        result = ae.calibrate(ae.CalibrationConfig(model="tiny-audioldm", num_prompts=1, steps=2, points=1000,
                                                   audio_seconds=0.64, select="uniform"), tmp_path / "cal")
    assert result.points == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["--points 1000 is more than the 2 (prompt, step) pairs of 1 prompt(s) x 2 steps: keeping 2; "
                        "raise --num-prompts or --steps for more"]
