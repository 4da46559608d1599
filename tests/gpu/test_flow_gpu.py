"""The CLI flow at AudioLDM-S size on one GPU, on the saved-folder form a user has (issue 14, items 1-2).

An AudioLDM-S-sized pipeline (185 M-parameter U-Net, CLAP text encoder at RoBERTa-base size, VAE,
HiFi-GAN; random weights) is written with ``save_pretrained`` and used as ``--model DIR``:

1. ``adm-export build --model DIR --device cuda`` with the default settings, as a subprocess: every
   stage on the GPU, stage times in the report, the engine is the CUDA one (fused-op counts in
   ``engines/onnxruntime/layers.json``), parity passed, the eval clips written.
2. Each stage alone with ``--device cuda`` (calibrate at 10.24 s, quantize, export, engine, eval,
   generate with and without the engine, export-baseline FP16 + its engine), each reading the
   previous one's folder, as a user chains them.

Random weights: the quality gate's verdict means nothing here, so its thresholds are set out of
the way (``--max-fd-increase/--max-drift 1000``); the gate's numbers are still computed and checked
for presence. Expected time on one H200: about 4-5 minutes for the build (``-k build``; the first
quantize compiles ModelOpt's CUDA extension, ~50 s) and 5-6 for the stages alone (``-k "not build"``):
``benchmarks/gpu_session.sh`` runs them as two commands.
"""

from __future__ import annotations

import pytest

from tests.gpu.conftest import (DEVICE, DRY_BUILD, cli, cli_subprocess, cuda_only, fused_total, fusions, read_json,
                               rel_l2, wavs)
from tests.helpers import REPORT_KEYS, get_key

SECONDS = 10.24  # AudioLDM-S's clip length: the 8x256x16 latent
GATE_OFF = ["--max-fd-increase", "1000", "--max-drift", "1000"]
PROMPTS = ["a dog barks while rain falls on a tin roof", "a siren wails in the distance",
           "birds chirp in a quiet forest", "an engine idles, then revs"]


def _prompt_args(n):
    return [a for p in PROMPTS[:n] for a in ("-p", p)]


# -- 1. build ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def build_dir(audioldm_s_dir, gpu_workdir):
    out = gpu_workdir / "build-s"
    proc = cli_subprocess("build", "--model", audioldm_s_dir, "--device", DEVICE, "--out", out, "--force", *GATE_OFF,
                          *DRY_BUILD)
    return out, proc


def test_build_on_cuda_at_audioldm_s_size(build_dir, record_property):
    out, proc = build_dir
    report = read_json(out / "report.json")
    for key in REPORT_KEYS:
        get_key(report, key)
    assert report["device"] == DEVICE
    stages = {name: s["seconds"] for name, s in report["stages"].items()}
    record_property("stage_seconds", stages)
    record_property("build_seconds_total", round(sum(stages.values()), 1))
    assert set(stages) >= {"load model", "calibrate", "quantize", "export", "engine", "eval"}
    assert all(s > 0 for s in stages.values())
    # Every stage's summary line printed with its time.
    for name in ("calibrate", "quantize", "export", "engine", "eval"):
        assert name in proc.stdout
    assert report["size"]["reduction_vs_fp32"] < 0.3  # INT8 export of the 185 M U-Net
    assert report["parity"]["passed"] is True, report["parity"]
    assert report["eval"]["gate"]["passed"] is not None and report["eval"]["fd_quantized_vs_baseline"] is not None


def test_build_serves_the_cuda_engine(build_dir, record_property):
    out, _ = build_dir
    manifest = read_json(out / "engines" / "manifest.json")
    assert manifest["report"]["engines"]["onnxruntime"]["device"] == DEVICE
    counts = fusions(out / "engines")
    record_property("fusions_int8_build", counts)
    assert DEVICE == "cpu" or fused_total(counts) > 0, counts
    n = read_json(out / "eval" / "eval.json")["num_clips"]
    wavs(out / "eval" / "baseline", n, 2.56)
    wavs(out / "eval" / "quantized", n, 2.56)


# -- 2. each stage alone -----------------------------------------------------------------------------
# One module fixture per stage, each reading the previous one's folder as a user chains them; a
# stage that fails shows as an error in every test that needs its folder.
@pytest.fixture(scope="module")
def root(gpu_workdir):
    return gpu_workdir / "stages-s"


@pytest.fixture(scope="module")
def calibration(audioldm_s_dir, root):
    out = root / "calibration"
    cli("calibrate", "--model", audioldm_s_dir, "--device", DEVICE, "--out", out, "--force", "--num-prompts", 2,
        "--steps", 4, "--points", 4, "--seconds", SECONDS)
    return out


@pytest.fixture(scope="module")
def quantized(calibration, root):
    out = root / "quantized"
    cli("quantize", "--calibration", calibration, "--out", out, "--device", DEVICE, "--force")
    return out


@pytest.fixture(scope="module")
def onnx_dir(quantized, calibration, root):
    out = root / "onnx"
    cli("export", "--quantized", quantized, "--calibration", calibration, "--out", out, "--device", DEVICE,
        "--parity-points", 2, "--force")
    return out


@pytest.fixture(scope="module")
def engines(onnx_dir, root):
    out = root / "engines"
    cli("engine", "--onnx", onnx_dir, "--out", out, "--device", DEVICE, "--force")
    return out


@pytest.fixture(scope="module")
def torch_clips(audioldm_s_dir, root):
    """The torch pipeline (no engine) on the four prompts: what the engines are compared with."""
    out = root / "gen-torch"
    cli("generate", "--model", audioldm_s_dir, "--out", out, *_prompt_args(4), "--seconds", SECONDS, "--steps", 4,
        "--device", DEVICE, "--force")
    return out


def test_calibrate_alone(calibration, record_property):
    from adm_export.calibration.cache import load_cache

    cache = load_cache(calibration)
    assert len(cache) == 4 and tuple(cache.point(0)["sample"].shape) == (2, 8, 256, 16)
    assert cache.manifest["config"]["device"] == DEVICE
    record_property("replay", cache.manifest["selection"].get("replay"))


def test_quantize_alone(quantized, record_property):
    m = read_json(quantized / "manifest.json")
    record_property("quant_error_mean", m["quant_error_rel_l2"]["mean"])
    assert 0 < m["quant_error_rel_l2"]["mean"] < 0.5 and m["quantizers"]["weight"] > 100
    assert m["config"]["device"] == DEVICE


def test_export_alone(onnx_dir, record_property):
    m = read_json(onnx_dir / "manifest.json")
    record_property("parity", {k: m["parity"][k] for k in ("onnx_vs_torch_mean", "rounding_floor_mean", "passed")})
    assert m["parity"]["passed"], m["parity"]
    assert m["sizes"]["reduction_vs_fp32"] < 0.3
    assert m["config"]["device"] == DEVICE


def test_engine_alone_is_the_cuda_engine(engines, record_property):
    cuda_only("the fused engine")
    counts = fusions(engines)
    record_property("fusions", counts)
    assert fused_total(counts) > 0, counts


def test_eval_alone(engines, root, record_property):
    out = root / "eval"
    cli("eval", "--engine", engines, "--out", out, "--device", DEVICE, "--force", "--num-clips", 4,
        "--eval-steps", 4, "--eval-seconds", SECONDS, *GATE_OFF)
    result = read_json(out / "eval.json")
    record_property("final_latent_rel_l2", result["final_latent_rel_l2"])
    assert result["engine_calls"] > 0 and result["fd_quantized_vs_baseline"] is not None
    assert result["final_latent_rel_l2"] is not None and result["final_latent_rel_l2"] < 1.0  # not diverged
    wavs(out / "baseline", 4, SECONDS)
    wavs(out / "quantized", 4, SECONDS)


def test_generate_with_and_without_the_engine(engines, torch_clips, root, record_property):
    out = root / "gen-int8"
    cli("generate", "--engine", engines, "--out", out, *_prompt_args(4), "--seconds", SECONDS, "--steps", 4,
        "--device", DEVICE, "--force")
    engine_run = read_json(out / "generate.json")
    torch_run = read_json(torch_clips / "generate.json")
    record_property("seconds_per_clip", {"int8 engine": engine_run["seconds_per_clip"],
                                         "torch": torch_run["seconds_per_clip"]})
    record_property("startup_seconds", engine_run.get("startup_seconds"))
    assert engine_run["engine"]["ort_options"]["provider"] == DEVICE
    assert "startup_seconds" in engine_run and engine_run["seconds_per_clip"] > 0
    wavs(out, 4, SECONDS)
    wavs(torch_clips, 4, SECONDS)


def test_int8_engine_with_cuda_graph_and_nhwc(engines, root):
    """The issue's crash: ``--cuda-graph --prefer-nhwc`` on the INT8 engine died in ONNX Runtime's
    NHWC transform of the Q/DQ graph ("Input channels C is not equal to kernel channels * group")."""
    cuda_only("--cuda-graph --prefer-nhwc")
    out = root / "gen-int8-graph-nhwc"
    cli("generate", "--engine", engines, "--out", out, *_prompt_args(2), "--seconds", SECONDS, "--steps", 4,
        "--device", DEVICE, "--cuda-graph", "--prefer-nhwc", "--force")
    wavs(out, 2, SECONDS)


def test_export_baseline_fp16_and_its_fused_engine(audioldm_s_dir, torch_clips, root, record_property):
    cuda_only("the FP16 engine")
    cli("export-baseline", "--model", audioldm_s_dir, "--dtype", "fp16", "--device", DEVICE, "--out", root / "fp16",
        "--force")
    m = read_json(root / "fp16" / "manifest.json")
    assert m["parity"]["passed"], m["parity"]
    cli("engine", "--onnx", root / "fp16", "--out", root / "fp16-engines", "--device", DEVICE, "--force")
    counts = fusions(root / "fp16-engines")
    record_property("fusions_fp16", counts)
    assert fused_total(counts) > 0, counts
    # Served with the fastest options, against the torch pipeline (FP32) on the same prompts and seeds.
    out = root / "gen-fp16"
    cli("generate", "--engine", root / "fp16-engines", "--out", out, *_prompt_args(2), "--seconds", SECONDS,
        "--steps", 4, "--device", DEVICE, "--cuda-graph", "--prefer-nhwc", "--force")
    got = wavs(out, 2, SECONDS)
    ref = wavs(torch_clips, 4, SECONDS)[:2]
    errs = [rel_l2(a, b) for a, b in zip(got, ref)]
    record_property("fp16_engine_vs_torch_wav_rel_l2", errs)
    assert max(errs) < 0.1, errs
