"""The public API at the package root: lazy, documented, typed, and the README's example runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("calibrate", "quantize_model", "export_onnx", "export_baseline", "build_engines", "evaluate", "build",
          "generate", "bundle", "serve")
HEAVY = ("torch", "click", "numpy", "onnx", "onnxruntime", "diffusers", "modelopt")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def readme_example() -> str:
    """The Python block under README's ``api-example`` marker."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```python", text.index("<!-- api-example"))
    return text[start + len("```python"):text.index("```", start + 3)]


def test_import_is_light_and_help_lists_the_stages():
    r = _python("import sys, adm_export\n"
                f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
                "help(adm_export)\n"
                f"heavy += sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
                "print('HEAVY', heavy)")
    assert r.returncode == 0, r.stderr
    functions = r.stdout[r.stdout.index("FUNCTIONS"):]
    for name in STAGES:
        assert re.search(rf"^    {name}\(", functions, re.M), f"help(adm_export) does not list {name}"
    for name in ("CalibrationConfig", "BuildConfig", "GenerateConfig", "ServeConfig", "EvalResult", "AdmExportError"):
        assert name in r.stdout
    assert r.stdout.strip().endswith("HEAVY []"), r.stdout[-300:]


def test_cli_help_works_without_torch():
    r = _python("import sys\n"
                "for m in ('torch', 'diffusers', 'modelopt', 'onnxruntime', 'tensorrt_rtx'): sys.modules[m] = None\n"
                "from adm_export.cli import cli\n"
                "cli(['--help'], prog_name='adm-export', standalone_mode=False)\n"
                "cli(['build', '--help'], prog_name='adm-export', standalone_mode=False)")
    assert r.returncode == 0, r.stderr
    assert "calibrate" in r.stdout and "--precision" in r.stdout


def test_api_names_survive_importing_the_subpackages():
    """``adm_export.quantize`` / ``adm_export.export`` are subpackages: the API's names must not be
    replaced when they are imported, before or after the API is used."""
    r = _python("import types, adm_export\n"
                "f = adm_export.quantize_model, adm_export.export_onnx\n"
                "import adm_export.quantize.stage, adm_export.export.onnx, adm_export.stages.build\n"
                "import adm_export.stages.generate, adm_export.stages.bundle\n"
                "assert isinstance(adm_export.quantize, types.ModuleType) and isinstance(adm_export.export, types.ModuleType)\n"
                "assert (adm_export.quantize_model, adm_export.export_onnx) == f\n"
                "import adm_export.serving.server\n"
                "for n in ('build', 'generate', 'bundle', 'serve', 'calibrate', 'evaluate', 'build_engines'):\n"
                "    assert callable(getattr(adm_export, n)) and not isinstance(getattr(adm_export, n), types.ModuleType), n\n"
                "print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_unknown_name_is_an_attribute_error():
    import adm_export

    with pytest.raises(AttributeError, match="no attribute 'quantize_everything'"):
        adm_export.quantize_everything  # noqa: B018


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    """The README's example, as it stands (the optional TensorRT-RTX plan is skipped: ~20 s here)."""
    from adm_export.errors import MissingDependencyError

    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with mock.patch("adm_export.engines.tensorrt.import_nvinfer",
                    side_effect=MissingDependencyError("TensorRT-RTX plan skipped in this test")):
        exec(compile(readme_example(), "README.md", "exec"), ns)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"INT8 error 0\.\d{3}, U-Net \d+% of FP32, gate (passed|failed), 1 clip\(s\)", line), line
    import adm_export as ae

    assert isinstance(ns["cal"], ae.CalibrateResult) and ns["cal"].points == 4
    assert isinstance(ns["q"], ae.QuantizeResult) and 0 < ns["q"].error_mean <= ns["q"].error_max
    assert isinstance(ns["onnx"], ae.ExportResult) and ns["onnx"].parity_passed is True
    assert 0 < ns["onnx"].reduction_vs_fp32 < 0.5 and (tmp_path / "work" / "onnx" / "unet.onnx").is_file()
    assert "onnxruntime" in ns["engines"].engines and ns["engines"].layer_precisions
    assert ns["ev"].out is None and ns["ev"].result["num_clips"] == 2
    assert [p.name for p in ns["clips"].files] == ["0000.wav"] and (tmp_path / "work" / "clips" / "0000.wav").is_file()
    for result in (ns["cal"], ns["q"], ns["onnx"], ns["engines"], ns["ev"], ns["clips"]):
        data = json.loads(json.dumps(result.to_dict()))
        assert data["seconds"] > 0 and "out" in data
    # A result is accepted wherever its folder is, and the folders are locked and checked as in the CLI.
    with pytest.raises(ae.OutputExistsError, match="--force"):
        ae.export_onnx(ae.ExportConfig(parity_points=1), ns["q"], ns["cal"], "work/onnx")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["calibration", "clips", "engines", "onnx",
                                                                    "quantized"]


def test_api_error_is_typed_and_leaves_nothing(tmp_path):
    import adm_export as ae

    with pytest.raises(ae.ArtifactNotFoundError, match="--calibration"):
        ae.quantize_model(ae.QuantizeConfig(), tmp_path / "missing", tmp_path / "new" / "q")
    assert list(tmp_path.iterdir()) == []
