"""The engine option matrix through the CLI, on the trained reference model (issue 14, items 1-2).

Engines: the FP16 baseline (``export-baseline --dtype fp16`` + ``engine``) and the quantized
builds INT8, FP8, W4A8 and mixed (``build --precision P --device cuda``; mixed runs the sensitivity
trials, the trajectory check and ModelOpt's ``auto_quantize`` comparison on the GPU). The model is
``reference-audioldm`` because its clips depend on what the U-Net computes: on the random-weight
tiny models a clip of another *prompt* differs by only 3.5 % (their VAE and vocoder barely respond
to the latents), too little to tell a broken engine from a working one. For each engine:

* parity against torch through the CLI: ``eval --engine E`` runs the same prompts and seeds
  through the FP32 torch pipeline and the engine and reports the final latents' relative L2; and
  ``generate --engine E`` against ``generate`` without an engine, as the clips' relative L2.
  Measured here on the CPU (ONNX Runtime CPU provider, FP32 compute; 4 steps, 2.56 s): INT8 build
  final latents 0.076, clips 0.13 / 0.36; the FP16 U-Net in torch moves the clips by 0.008 / 0.017;
  clips of another seed differ by 2.6 / 4.4. The bounds below sit a few times above what a
  working engine gives and far below an unrelated result;
* every combination of ``--io-binding/--no-io-binding``, ``--cuda-graph/--no-cuda-graph`` and
  ``--prefer-nhwc`` (all 8 on INT8, whose ``--cuda-graph --prefer-nhwc`` crashed in issue 14; the
  fastest and the plainest on the others) either works, giving the clips of the default options up
  to FP16 kernel rounding (a 1e-3 relative change of every U-Net output moves these clips by
  ~0.02), or is refused with one ``error:`` line before any work.

``tests/gpu/test_cuda_engine.py`` has the engine-level side: every family's FP16 and INT8 engine
(exported on the CPU) checked against its FP32 reference on the GPU, the option matrix on the tiny
INT8 engine, the one-line refusals (``--ort-provider tensorrt`` without TensorRT's libraries, a CPU
engine on ``--device cuda``) and ``eval`` serving like ``generate``. Here every quantized build runs
its torch stages on the GPU. About 3 minutes on an H200.
"""

from __future__ import annotations

import itertools

import pytest

from tests.gpu.conftest import DEVICE, cli, cuda_only, fused_total, fusions, read_json, rel_l2, wavs
from tests.helpers import one_error_line

MODEL = "reference-audioldm"
SECONDS = 2.56  # the reference model's training length
PROMPTS = ["-p", "a dog barks", "-p", "rain on a tin roof"]
GEN = [*PROMPTS, "--seconds", SECONDS, "--steps", 4, "--device", DEVICE, "--force"]
QUICK = ["--num-prompts", 2, "--steps", 3, "--points", 4, "--seconds", SECONDS, "--no-eval"]
BUILD_ARGS = {"int8": [], "fp8": [], "w4a8": [],
              "mixed": ["--size-budget", 0.25, "--sensitivity-granularity", "block", "--sensitivity-points", 2]}
#: Engine vs the torch pipeline, relative L2 bounds per engine (see the module doc): final latents
#: (``eval``) and clips (``generate``).
LATENT_PARITY = {"fp16": 0.02, "int8": 0.3, "fp8": 0.3, "w4a8": 0.3, "mixed": 0.4}
CLIP_PARITY = {"fp16": 0.06, "int8": 0.8, "fp8": 0.8, "w4a8": 0.8, "mixed": 0.8}
#: Clips with other execution options vs the engine's default options (FP16 kernels differ slightly).
OPTION_PARITY = 0.05
#: (io binding, CUDA graph, NHWC) -> flags, every one explicit (the defaults may change).
FLAGS = {"io": ("--io-binding", "--no-io-binding"), "graph": ("--cuda-graph", "--no-cuda-graph")}



@pytest.fixture(scope="module")
def built(gpu_workdir):
    """``{precision: engines folder}``, each built on first use."""
    cache: dict = {}
    root = gpu_workdir / "matrix"

    def get(precision: str):
        if precision == "fp16":
            cuda_only("the FP16 engine")
        if precision not in cache:
            try:
                if precision == "fp16":
                    cli("export-baseline", "--model", MODEL, "--dtype", "fp16", "--device", DEVICE, "--out",
                        root / "fp16-onnx", "--force")
                    cli("engine", "--onnx", root / "fp16-onnx", "--out", root / "fp16" / "engines", "--device",
                        DEVICE, "--force")
                else:
                    cli("build", "--model", MODEL, "--precision", precision, "--device", DEVICE, "--out",
                        root / precision, "--force", *QUICK, *BUILD_ARGS[precision])
                cache[precision] = root / precision / "engines"
            except AssertionError as exc:  # built once: later tests of this engine fail fast, same message
                cache[precision] = exc
        if isinstance(cache[precision], AssertionError):
            raise AssertionError(f"building the {precision} engine failed:\n{cache[precision]}")
        return cache[precision]

    return get


@pytest.fixture(scope="module")
def torch_clips(gpu_workdir):
    out = gpu_workdir / "matrix" / "torch-clips"
    cli("generate", "--model", MODEL, "--out", out, *GEN)
    return wavs(out, 2, SECONDS)


@pytest.fixture(scope="module")
def default_clips(built, gpu_workdir):
    """``{precision: clips}`` of ``generate --engine E`` with the default options, made on first use."""
    cache: dict = {}

    def get(precision: str):
        if precision not in cache:
            out = gpu_workdir / "matrix" / f"clips-{precision}-default"
            cli("generate", "--engine", built(precision), "--out", out, *GEN)
            run = read_json(out / "generate.json")
            assert run["engine"]["ort_options"]["provider"] == DEVICE
            cache[precision] = wavs(out, 2, SECONDS)
        return cache[precision]

    return get


@pytest.mark.parametrize("precision", ["int8", "fp8", "w4a8", "mixed"])
def test_quantized_build_on_cuda(precision, built, gpu_workdir, record_property):
    engines = built(precision)
    report = read_json(engines.parent / "report.json")
    assert report["device"] == DEVICE and report["parity"]["passed"] is True, report["parity"]
    record_property("formats", (report.get("quantization") or {}).get("formats"))
    record_property("fusions", fusions(engines))
    if precision == "mixed":
        search = report["quantization"]["search"]
        comparison = search["modelopt_auto_quantize"]
        record_property("auto_quantize", comparison)
        assert comparison["ran"], comparison  # on the GPU: its batches, forward and loss on the model's device
        assert any("trajectory_rel_l2" in r for r in search["ranking"])  # the trajectory check ran
        assert report["size"]["reduction_vs_fp32"] <= 0.25


def test_fp16_engine_is_fused(built, record_property):
    counts = fusions(built("fp16"))
    record_property("fusions", counts)
    assert fused_total(counts) > 0, counts


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8", "w4a8", "mixed"])
def test_engine_matches_torch(precision, built, default_clips, torch_clips, gpu_workdir, record_property):
    out = gpu_workdir / "matrix" / f"eval-{precision}"
    cli("eval", "--engine", built(precision), "--out", out, "--device", DEVICE, "--num-clips", 2, "--eval-steps", 4,
        "--eval-seconds", SECONDS, "--max-fd-increase", 1000, "--max-drift", 1000, "--force")
    latent = read_json(out / "eval.json")["final_latent_rel_l2"]
    clips = [rel_l2(a, b) for a, b in zip(default_clips(precision), torch_clips)]
    record_property("final_latent_rel_l2_vs_torch", latent)
    record_property("clip_rel_l2_vs_torch", [round(e, 5) for e in clips])
    assert latent is not None and latent < LATENT_PARITY[precision], latent
    assert max(clips) < CLIP_PARITY[precision], clips


def _combos(precision):
    full = itertools.product((True, False), (True, False), (False, True))
    fast = [(True, True, True), (False, False, False)]
    return [(precision, *c) for c in (full if precision == "int8" else fast)]


@pytest.mark.parametrize("precision,io,graph,nhwc", [c for p in ("fp16", "int8", "fp8", "w4a8", "mixed")
                                                     for c in _combos(p)])
def test_option_combination_works_or_is_refused(precision, io, graph, nhwc, built, default_clips, gpu_workdir,
                                                record_property):
    cuda_only("the execution options")
    flags = [FLAGS["io"][0 if io else 1], FLAGS["graph"][0 if graph else 1]] + (["--prefer-nhwc"] if nhwc else [])
    out = gpu_workdir / "matrix" / f"clips-{precision}-{'-'.join(f.strip('-') for f in flags)}"
    result = cli("--quiet", "generate", "--engine", built(precision), "--out", out, *GEN, *flags, expect=None)
    # Every combination must work except --no-io-binding --cuda-graph, which may be refused (a CUDA
    # graph replays bound device buffers).
    if result.exit_code == 1 and graph and not io:
        record_property("refused", one_error_line(result))
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output[-3000:]
    errs = [rel_l2(a, b) for a, b in zip(wavs(out, 2, SECONDS), default_clips(precision))]
    record_property("wav_rel_l2_vs_default_options", [round(e, 5) for e in errs])
    assert max(errs) < OPTION_PARITY, errs
    assert read_json(out / "generate.json")["engine"]["ort_options"]["cuda_graph"] is graph
