"""Bad input: one line, exit code 1, nothing half-written."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import one_error_line, run


def test_help_works():
    r = run("--help")
    assert r.exit_code == 0 and "build" in r.output and "calibrate" in r.output
    assert run("build", "--help").exit_code == 0


def test_unknown_model(tmp_path):
    out = tmp_path / "o"
    r = run("build", "--model", "no-such-org/no-such-model", "--out", out)
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "no-such-org/no-such-model" in line and "tiny-audioldm" in line
    assert not out.exists()


def test_local_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "m").mkdir()
    r = run("build", "--model", tmp_path / "m", "--out", tmp_path / "o")
    assert r.exit_code == 1
    assert "model_index.json" in one_error_line(r)


def test_invalid_precision(tmp_path):
    r = run("build", "--precision", "int3", "--out", tmp_path / "o")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "int3" in line and "--precision" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value", [("--num-prompts", "0"), ("--seconds", "-1"), ("--num-clips", "1")])
def test_invalid_numbers(tmp_path, flag, value):
    r = run("build", flag, value, "--out", tmp_path / "o")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert flag in line and value in line
    assert not (tmp_path / "o").exists()


def test_non_empty_out_without_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run("build", "--out", out)
    assert r.exit_code == 1
    assert "--force" in one_error_line(r)
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_captions_file(tmp_path):
    r = run("calibrate", "--captions", tmp_path / "nope.txt", "--out", tmp_path / "c")
    assert r.exit_code == 1
    assert "--captions" in one_error_line(r)
    assert not (tmp_path / "c").exists()


def test_stage_input_that_is_not_an_artifact(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run("quantize", "--calibration", tmp_path / "empty", "--out", tmp_path / "q")
    assert r.exit_code == 1
    assert "--calibration" in one_error_line(r)
    assert not (tmp_path / "q").exists()


def test_artifact_of_another_stage(tiny_build, tmp_path):
    out, _, _ = tiny_build
    r = run("quantize", "--calibration", out / "onnx", "--out", tmp_path / "q")
    assert r.exit_code == 1
    assert "'onnx'" in one_error_line(r)


def test_cache_of_another_model_is_refused(tiny_build, tmp_path):
    """A calibration cache made from tiny-audioldm does not quantize a different model."""
    from adm_export.models.embedded import build_tiny_audioldm

    other = tmp_path / "other-model"
    build_tiny_audioldm(seed=7).save_pretrained(str(other))
    out, _, _ = tiny_build
    r = run("quantize", "--model", other, "--calibration", out / "calibration", "--out", tmp_path / "q")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "tiny-audioldm" in line and "fingerprint" in line
    assert not (tmp_path / "q").exists()


def test_changed_artifact_file_is_refused(tiny_build, tmp_path):
    out, _, _ = tiny_build
    copy = tmp_path / "cal"
    shutil.copytree(out / "calibration", copy)
    with open(copy / "points.safetensors", "ab") as f:
        f.write(b"\0")
    r = run("quantize", "--calibration", copy, "--out", tmp_path / "q")
    assert r.exit_code == 1
    assert "points.safetensors" in one_error_line(r)


def test_unavailable_engine_backend_names_the_extra(tmp_path, monkeypatch):
    import adm_export.engines.tensorrt as trt

    def missing(flavor="auto"):
        from adm_export.errors import MissingDependencyError

        raise MissingDependencyError("building engines needs TensorRT; install pip install 'adm-export[tensorrt-rtx]'")

    monkeypatch.setattr(trt, "import_nvinfer", missing)
    r = run("build", "--engine", "tensorrt", "--out", tmp_path / "o")
    assert r.exit_code == 1
    assert "adm-export[tensorrt-rtx]" in one_error_line(r)
    assert not (tmp_path / "o").exists()
