"""Serving on the CPU: ``generate`` through the ONNX Runtime engine, FP16 baseline export, session options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from adm_export.errors import InvalidInputError, MissingDependencyError
from tests.helpers import one_error_line, run

SECONDS = 1.28  # 32 latent frames: 20480 samples at 16 kHz
STEPS = 2


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, tiny_adapter):
    """An ONNX Runtime engine of the unquantized tiny U-Net (FP32 export -> engine stage, no TensorRT)."""
    from adm_export.config import EngineConfig
    from adm_export.engines import stage
    from adm_export.config import FullPrecisionExportConfig
    from adm_export.export.fp16 import export_full_precision

    root = tmp_path_factory.mktemp("serving")
    m = export_full_precision(FullPrecisionExportConfig(fp16=False, audio_seconds=SECONDS), root / "onnx",
                              adapter=tiny_adapter)
    # Unquantized FP32: ONNX Runtime matches torch to float rounding.
    assert m["parity"]["passed"] and m["parity"]["onnx_vs_torch_max"] < 1e-4

    def no_tensorrt(*a, **k):
        raise MissingDependencyError("TensorRT is not part of this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("adm_export.engines.tensorrt.import_nvinfer", no_tensorrt)
        stage.build_engines(EngineConfig(threads=1), root / "onnx", root / "engines", adapter=tiny_adapter,
                            frames=32)
    return root / "engines"


@pytest.fixture(scope="module")
def generated(engine_dir, tmp_path_factory):
    """``adm-export generate`` through the CLI: 3 prompts in batches of 2, with --plot."""
    out = tmp_path_factory.mktemp("gen") / "clips"
    prompts = ["a dog barks", "rain on a tin roof", "a car passes by"]
    args = ["generate", "--engine", engine_dir, "--seconds", SECONDS, "--steps", STEPS, "--batch-size", 2,
            "--plot", "--seed", 7, "--threads", 1, "-o", out]
    for p in prompts:
        args += ["-p", p]
    result = run(*args)
    return out, result, prompts


def test_generate_writes_wavs_of_the_right_length_and_rate(generated):
    out, result, prompts = generated
    assert result.exit_code == 0, result.output
    wavs = sorted(out.glob("*.wav"))
    assert [w.name for w in wavs] == ["0000.wav", "0001.wav", "0002.wav"]
    for w in wavs:
        info = sf.info(str(w))
        assert info.samplerate == 16000 and info.channels == 1
        assert info.frames == int(SECONDS * 16000)
        audio, _ = sf.read(str(w))
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0  # not silence
    index = json.loads((out / "prompts.json").read_text())
    assert [e["prompt"] for e in index] == prompts and [e["seed"] for e in index] == [7, 8, 9]
    record = json.loads((out / "generate.json").read_text())
    assert record["engine"]["precision"] == "fp32" and record["engine"]["ort_options"]["provider"] == "cpu"
    assert record["clips"] == 3 and len(record["batch_seconds"]) == 2  # batches of 2 and 1
    assert record["samples_per_clip"] == [int(SECONDS * 16000)] * 3
    # Start-up (model load, engine session) is reported apart from the per-clip time; no warm-up on the CPU.
    # (each value is rounded to 4 decimals on its own: the parts may add up to 1e-4 over the total)
    parts = record["startup"]["model_load"] + record["startup"]["engine_load"]
    assert record["startup_seconds"] >= parts - 1e-4 and parts > 0
    assert "warmup" not in record["startup"] and record["warmup_steps"] == 0
    assert record["seconds_per_clip"] == pytest.approx(record["seconds"] / 3, rel=1e-3)
    assert record["engine"]["graph"] == "export" and record["engine"]["ort_options"]["cuda_graph"] is False


def test_plot_writes_a_valid_png_per_clip(generated):
    import matplotlib.image as mpimg

    out, _, prompts = generated
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(prompts)
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(str(p))
        assert img.shape[0] >= 200 and img.shape[1] >= 600  # an 8x3 inch figure at 100 dpi
        assert img[..., :3].std() > 0.05  # a drawn spectrogram, not a blank canvas


def test_batching_gives_the_same_audio_as_one_by_one(engine_dir, tiny_adapter, tmp_path):
    from adm_export.stages.generate import GenerateConfig, generate

    prompts = ("a dog barks", "rain on a tin roof", "a car passes by")
    common = dict(engine_dir=str(engine_dir), prompts=prompts, audio_seconds=SECONDS, steps=STEPS, seed=3, threads=1)
    generate(GenerateConfig(batch_size=3, **common), tmp_path / "batched", adapter=tiny_adapter)
    generate(GenerateConfig(batch_size=1, **common), tmp_path / "single", adapter=tiny_adapter)
    # A clip depends on its prompt and seed only: the last prompt alone with its seed.
    generate(GenerateConfig(**{**common, "prompts": prompts[2:], "seed": 5}), tmp_path / "alone",
             adapter=tiny_adapter)
    read = lambda d, i: sf.read(str(tmp_path / d / f"{i:04d}.wav"))[0]  # noqa: E731
    lsb = 2 / 32768  # 16-bit PCM rounding
    for i in range(3):
        np.testing.assert_allclose(read("batched", i), read("single", i), atol=lsb)
    np.testing.assert_allclose(read("alone", 0), read("batched", 2), atol=lsb)
    # Random weights make clips alike, but other prompts and seeds still differ far above rounding.
    assert np.abs(read("batched", 0) - read("batched", 1)).max() > 20 * lsb


def test_engine_matches_the_full_precision_pipeline(engine_dir, tiny_adapter):
    """The FP32 engine in diffusers' sampler reproduces the torch pipeline (same seeds)."""
    from adm_export.engines.stage import load_ort_denoiser

    base = tiny_adapter.generate(["wind in trees"], [11], STEPS, SECONDS, 2.5)[0]
    denoiser, manifest = load_ort_denoiser(engine_dir, tiny_adapter, threads=1)
    with tiny_adapter.using_denoiser(denoiser):
        served = tiny_adapter.generate(["wind in trees"], [11], STEPS, SECONDS, 2.5)[0]
    assert denoiser.calls == STEPS and manifest["precision"] == "fp32"
    assert np.linalg.norm(served - base) / np.linalg.norm(base) < 1e-3


@pytest.mark.parametrize("args,needle", [
    ([], "--prompt"),
    (["-p", "x", "--seconds", "0"], "--seconds"),
    (["-p", "x", "--batch-size", "0"], "--batch-size"),
    (["-p", "x", "--steps", "0"], "--steps"),
    (["--prompts", "no/such/file.txt"], "--prompts"),
    (["-p", "x", "--engine", "no/such/engines"], "--engine"),
    (["-p", "x", "--cuda-graph"], "--cuda-graph"),
    (["-p", "x", "--ort-provider", "cuda"], "--device cuda"),
    (["-p", "x", "--ort-provider", "fpga"], "--ort-provider"),
])
def test_bad_generate_input_is_one_line(tmp_path, args, needle):
    out = tmp_path / "o"
    r = run("generate", *args, "-o", out)
    assert r.exit_code == 1, r.output
    assert needle in one_error_line(r)
    assert not out.exists()


def test_empty_prompts_file_and_non_empty_out(tmp_path, engine_dir):
    empty = tmp_path / "p.txt"
    empty.write_text("\n\n")
    r = run("generate", "--prompts", empty, "-o", tmp_path / "o")
    assert r.exit_code == 1 and "--prompts" in one_error_line(r)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    r = run("generate", "-p", "x", "--engine", engine_dir, "-o", busy)
    assert r.exit_code == 1 and "--force" in one_error_line(r)
    assert (busy / "keep.txt").exists()


def test_engine_of_another_model_is_refused(tmp_path, engine_dir):
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    other = tmp_path / "engines"
    import shutil

    shutil.copytree(engine_dir, other)
    manifest["model"]["fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    r = run("generate", "-p", "x", "--engine", other, "--steps", 1, "-o", tmp_path / "o")
    assert r.exit_code == 1 and "fingerprint" in one_error_line(r)


def test_fp16_export_keeps_resize_scales_fp32_and_serves_an_fp32_pipeline(tiny_adapter, tmp_path):
    import onnx

    from adm_export.engines.onnxruntime import make_ort_denoiser
    from adm_export.config import FullPrecisionExportConfig
    from adm_export.export.fp16 import check_fp16_graph, export_full_precision

    # Short example, no torch-side parity run: torch's FP16 kernels are very slow on the CPU (the
    # engine is compared with torch FP32 below instead).
    m = export_full_precision(FullPrecisionExportConfig(fp16=True, audio_seconds=0.32, parity=False),
                              tmp_path / "fp16", adapter=tiny_adapter)
    check = m["fp16_check"]
    assert check["inputs"] == {"sample": "float16", "timestep": "float", "class_labels": "float16"}
    assert check["outputs"] == {"noise_pred": "float16"} and check["resize_nodes"] >= 1
    assert check["large_fp32_initializers"] == 0
    assert m["precision"] == "fp16"
    assert m["sizes"]["unet_export_bytes"] < 0.6 * m["sizes"]["unet_fp32_bytes"]
    # The FP16 engine called as the FP32 pipeline calls its U-Net: FP32 comes back, close to torch.
    import torch

    path = tmp_path / "fp16" / "unet.onnx"
    denoiser = make_ort_denoiser(tiny_adapter, None, path=path)
    x = tiny_adapter.denoiser_spec().dummy_inputs(2, 16, seed=4)  # frames are dynamic in the export
    t = torch.tensor(x["timestep"][0].item())  # the pipeline passes one scalar timestep
    with torch.inference_mode():
        ref = tiny_adapter.denoiser(x["sample"], t, encoder_hidden_states=None, class_labels=x["class_labels"]).sample
        got = denoiser(x["sample"], t, encoder_hidden_states=None, class_labels=x["class_labels"]).sample
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert float((got - ref).norm() / ref.norm()) < 1e-2
    # What DESIGN.md §6 warns about: FP16 Resize scales are caught.
    model = onnx.load(str(path))
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    from onnx import TensorProto, helper

    model.graph.initializer.append(helper.make_tensor("bad_scales", TensorProto.FLOAT16, [4], [1, 1, 2, 2]))
    resize.input[2] = "bad_scales"
    with pytest.raises(ValueError, match="FP16"):
        check_fp16_graph(model)


def test_static_dims_fold_every_shape_op(tmp_path, engine_dir):
    """The CUDA-graph precondition, checked on the CPU: pinned dimensions leave no Shape op behind."""
    import onnx

    from adm_export.engines.onnxruntime import OrtOptions, make_session

    path = engine_dir / "onnxruntime" / "unet.onnx"
    counts = {}
    for label, dims in (("dynamic", None), ("static", {"batch": 2, "frames": 32})):
        opt = tmp_path / f"{label}.onnx"
        make_session(path, options=OrtOptions(threads=1), static_dims=dims, optimized_path=opt)
        counts[label] = sum(n.op_type == "Shape" for n in onnx.load(str(opt)).graph.node)
    assert counts["dynamic"] > 0 and counts["static"] == 0


def test_ort_options_validation_and_providers():
    from adm_export.engines.onnxruntime import OrtOptions, providers_for

    with pytest.raises(InvalidInputError, match="--ort-provider"):
        OrtOptions(provider="fpga")
    with pytest.raises(InvalidInputError, match="--cuda-graph"):
        OrtOptions(provider="cpu", cuda_graph=True)
    with pytest.raises(InvalidInputError, match="optimization level"):
        OrtOptions(optimization_level="max")
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        cuda = dict(providers_for(OrtOptions(provider="cuda", cuda_graph=True, prefer_nhwc=True))[0][1])
        assert cuda["enable_cuda_graph"] == "1" and cuda["prefer_nhwc"] == "1"
    else:
        with pytest.raises(InvalidInputError, match="onnxruntime-gpu"):
            providers_for("cuda")


def test_any_length_runs_through_the_engine(engine_dir, tiny_adapter, tmp_path):
    """--seconds 0.7 gives 18 latent frames, not a multiple of the U-Net's 4: the engine could not run
    it (skip concatenation 9 vs 10); generate samples 0.72 s and cuts each clip to 0.7 s."""
    spec = tiny_adapter.denoiser_spec()
    for s in (0.7, 1.0, 2.56, 5.0, 10.0):
        longer = tiny_adapter.engine_seconds(s)
        assert longer >= s and tiny_adapter.pipeline_latent_frames(longer) % spec.frame_multiple == 0
        assert longer - s < spec.frame_multiple * 4 * 160 / 16000  # at most one frame multiple more
    assert tiny_adapter.engine_seconds(2.56) == 2.56  # already fits: unchanged
    out = tmp_path / "clips"
    result = run("generate", "--engine", engine_dir, "--seconds", 0.7, "--steps", STEPS, "--threads", 1,
                 "-p", "a loud siren", "-o", out)
    assert result.exit_code == 0, result.output
    assert sf.info(str(out / "0000.wav")).frames == int(0.7 * 16000)
