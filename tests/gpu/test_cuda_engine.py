"""The fused FP16 CUDA engine on a GPU: parity per family and per export kind, the option matrix, start-up.

Skipped without CUDA (torch with CUDA and onnxruntime-gpu's CUDA provider). What it checks:

* ``adm-export engine --device cuda`` builds the fused engine for every family's FP16 baseline and
  INT8 export (and FP32 / FP8 / W4A8 / mixed on tiny-audioldm); the build's own parity check ran
  on the served graph on CUDA (the build fails above ``--parity-tolerance``); the fused-op counts
  are non-zero where the family has the pattern;
* the INT8 engine serves the same FP16 graph as the FP16 engine (same op counts), so it costs the
  same per step (the ratio is printed; the benchmark in benchmarks/ times it properly);
* every serving option combination ``generate`` accepts works and agrees, or is refused in one
  line (CPU provider on a CUDA engine, TensorRT provider without TensorRT's libraries, a CPU engine
  on --device cuda); ``eval --device cuda`` serves with ``generate``'s options;
* ``generate.json`` reports start-up apart from the per-clip time.

Run: ``python -m pytest -q tests/gpu/test_cuda_engine.py`` (about 5 minutes on an H200; the
ModelOpt exports run on the CPU, only the engines need the GPU).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.gpu.conftest import CUDA_ONLY
from tests.helpers import one_error_line, run

ort = pytest.importorskip("onnxruntime")

pytestmark = CUDA_ONLY

SECONDS = 1.28
FAMILIES = ["tiny-audioldm", "tiny-audioldm2", "tiny-tango", "tiny-make-an-audio", "reference-audioldm"]
BUILD_ARGS = ["--num-prompts", "2", "--steps", "3", "--points", "4", "--seconds", str(SECONDS)]


def _export(tmp, model: str, kind: str):
    """An ``onnx/`` folder of ``kind``: ``fp16``/``fp32`` baseline, or a quantized precision (made on the CPU)."""
    out = tmp / f"{model}-{kind}"
    if kind in ("fp16", "fp32"):
        r = run("export-baseline", "--model", model, "--dtype", kind, "--device", "cuda" if kind == "fp16" else "cpu",
                "-o", out / "onnx")
    else:
        mixed = ["--size-budget", "0.2", "--sensitivity-granularity", "block", "--sensitivity-points", "2",
                 "--trajectory-check", "1"] if kind == "mixed" else []
        r = run("build", "--model", model, "--precision", kind, *mixed, *BUILD_ARGS, "--engine", "none",
                "--no-eval", "--out", out)
    assert r.exit_code == 0, r.output
    return out / "onnx"


def _engine(onnx_dir, out):
    r = run("engine", "--onnx", onnx_dir, "--out", out, "--device", "cuda", "--backend", "onnxruntime")
    assert r.exit_code == 0, r.output
    layers = json.loads((out / "onnxruntime" / "layers.json").read_text())
    print(f"\n{onnx_dir.parent.name}: {layers['summary']}; parity {layers['parity']['max']:.2e}; "
          f"{layers['latency']['median_ms']} ms/step (batch 2)")
    return layers


CASES = [(f, "fp16") for f in FAMILIES] + [(f, "int8") for f in FAMILIES] + [
    ("tiny-audioldm", "fp32"), ("tiny-audioldm", "fp8"), ("tiny-audioldm", "w4a8"), ("tiny-audioldm", "mixed")]


@pytest.mark.parametrize("model,kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_cuda_engine_parity_on_the_gpu(model, kind, tmp_path):
    layers = _engine(_export(tmp_path, model, kind), tmp_path / "engines")
    parity = layers["parity"]
    # The build checked the served graph on CUDA against the FP32 reference (torch for a baseline,
    # the weight-dequantized FP32 graph for a quantized export) and would have failed above tolerance.
    assert parity["served_graph_checked"] is True and parity["device"] == "cuda"
    assert parity["passed"] and parity["max"] <= parity["tolerance"]
    assert ("torch" in parity["reference"]) == (kind in ("fp16", "fp32"))
    assert layers["graph"] == "cuda-fused-fp16" and list(layers["layer_precisions"]) == ["fp16"]
    f = layers["fusions"]
    assert f["NhwcConv"] > 0 and f["GroupNorm"] + f["SkipGroupNorm"] > 0 and f["MultiHeadAttention"] > 0
    assert layers["latency"]["median_ms"] > 0 and layers["latency"]["cuda_graph"] is True
    if kind not in ("fp16", "fp32"):
        assert layers["activations"]["quantized"] is False and layers["weights"]["quantization_grid"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """tiny-audioldm: the CUDA engines of the INT8 build and of the FP16 baseline, and the CPU engine."""
    tmp = tmp_path_factory.mktemp("matrix")
    int8 = _export(tmp, "tiny-audioldm", "int8")
    fp16 = _export(tmp, "tiny-audioldm", "fp16")
    _engine(int8, tmp / "int8-cuda")
    _engine(fp16, tmp / "fp16-cuda")
    r = run("engine", "--onnx", int8, "--out", tmp / "int8-cpu", "--device", "cpu", "--backend", "onnxruntime")
    assert r.exit_code == 0, r.output
    return tmp


def test_int8_engine_is_the_fp16_engine_graph(engines):
    """INT8 build on ONNX Runtime CUDA: the same fused FP16 graph as the FP16 engine, so the same step cost."""
    a = json.loads((engines / "int8-cuda" / "onnxruntime" / "layers.json").read_text())
    b = json.loads((engines / "fp16-cuda" / "onnxruntime" / "layers.json").read_text())
    assert a["fusions"] == b["fusions"] and a["compute_ops"] == b["compute_ops"]
    ratio = a["latency"]["median_ms"] / b["latency"]["median_ms"]
    print(f"\nINT8 / FP16 CUDA engine step: {a['latency']['median_ms']:.3f} / {b['latency']['median_ms']:.3f} ms "
          f"= {ratio:.3f} (target <= 1.05; timed properly in benchmarks/)")


OPTIONS = [[], ["--no-cuda-graph"], ["--no-io-binding"], ["--prefer-nhwc"], ["--cudnn-search", "heuristic"],
           ["--no-cuda-graph", "--no-io-binding"]]


def _generate(engine, out, *args):
    r = run("generate", "--engine", engine, "--device", "cuda", "-p", "a loud siren", "-p", "rain on a roof",
            "--seconds", SECONDS, "--steps", 4, "--batch-size", 2, "-o", out, *args)
    assert r.exit_code == 0, r.output
    import soundfile as sf

    audio = np.stack([sf.read(str(out / f"{i:04d}.wav"))[0] for i in range(2)])
    return audio, json.loads((out / "generate.json").read_text())


@pytest.mark.parametrize("args", OPTIONS, ids=["default"] + ["_".join(a).strip("-") for a in OPTIONS[1:]])
def test_generate_option_matrix_agrees(engines, tmp_path, args):
    base, _ = _generate(engines / "int8-cuda", tmp_path / "base")
    audio, record = _generate(engines / "int8-cuda", tmp_path / "o", *args)
    assert np.isfinite(audio).all()
    assert np.linalg.norm(audio - base) / np.linalg.norm(base) < 2e-2
    opts = record["engine"]["ort_options"]
    assert opts["provider"] == "cuda"
    assert opts["cuda_graph"] is ("--no-cuda-graph" not in args and "--no-io-binding" not in args)
    assert record["engine"]["graph"] == "cuda-fused-fp16"
    # Start-up apart from the per-clip time; the warm-up ran each shape before the clock.
    assert record["startup_seconds"] > 0 and record["startup"]["warmup"] > 0 and record["warmup_steps"] == 3
    assert record["seconds_per_clip"] > 0


def test_fp16_and_int8_cuda_engines_serve_the_same_way(engines, tmp_path):
    a, ra = _generate(engines / "int8-cuda", tmp_path / "a")
    b, rb = _generate(engines / "fp16-cuda", tmp_path / "b")
    assert ra["engine"]["ort_options"] == rb["engine"]["ort_options"]
    assert np.isfinite(a).all() and np.isfinite(b).all()


@pytest.mark.parametrize("engine,args,needle", [
    ("int8-cpu", [], "adm-export engine --onnx ONNX_DIR --out DIR --device cuda"),
    ("int8-cuda", ["--ort-provider", "cpu"], "CUDA engine"),
    ("int8-cuda", ["--ort-provider", "tensorrt"], "--ort-provider tensorrt"),
    ("int8-cpu", ["--ort-provider", "tensorrt", "--prefer-nhwc"], "--ort-provider tensorrt"),
])
def test_refusals_on_the_gpu_are_one_line(engines, tmp_path, engine, args, needle):
    """A CPU engine on CUDA, a CUDA engine on the CPU provider, TensorRT without its libraries."""
    if "tensorrt" in args and "TensorrtExecutionProvider" in ort.get_available_providers():
        from adm_export.engines.onnxruntime import tensorrt_provider_problem

        if tensorrt_provider_problem() is None:
            pytest.skip("TensorRT's libraries load here: the provider is usable, nothing to refuse")
    r = run("generate", "--engine", engines / engine, "--device", "cuda", "-p", "x", *args, "-o", tmp_path / "o")
    assert r.exit_code == 1, r.output
    assert needle in one_error_line(r)
    assert not (tmp_path / "o").exists()


def test_cpu_engine_with_cpu_provider_on_a_gpu_pipeline(engines, tmp_path):
    audio, record = _generate(engines / "int8-cpu", tmp_path / "o", "--ort-provider", "cpu")
    assert np.isfinite(audio).all() and record["engine"]["ort_options"]["provider"] == "cpu"
    assert record["engine"]["ort_options"]["cuda_graph"] is False


def test_eval_serves_like_generate(engines, tmp_path):
    from adm_export.config import EvalConfig
    from adm_export.engines.onnxruntime import OrtOptions
    from adm_export.eval.harness import evaluate

    _, record = _generate(engines / "int8-cuda", tmp_path / "g")
    calls = []
    import adm_export.engines.stage as stage

    real = stage.load_ort_denoiser

    def spy(*a, **k):
        calls.append(k.get("options"))
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage, "load_ort_denoiser", spy)
        result = evaluate(EvalConfig(num_clips=2, steps=3, audio_seconds=SECONDS, device="cuda"), engines / "int8-cuda")
    assert calls and isinstance(calls[0], OrtOptions)
    from adm_export.config import to_dict

    assert to_dict(calls[0]) == record["engine"]["ort_options"]
    assert result["gate"] is not None
