"""The public API and the stage runner on CUDA (skipped without a GPU): free GPU memory is read, a
clip length the GPU cannot hold is one line (exit 1, nothing written), and a CUDA engine built and
served through ``adm_export.build_engines`` / ``adm_export.generate``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs a CUDA GPU and onnxruntime-gpu",
)

SECONDS = 1.28


@pytest.fixture(scope="module")
def cuda_engine(tmp_path_factory):
    """The tiny model's FP16 export and its fused CUDA engine, through the public API."""
    import adm_export as ae

    root = tmp_path_factory.mktemp("gpu-stages")
    onnx = ae.export_baseline(ae.FullPrecisionExportConfig(model="tiny-audioldm", fp16=True, device="cuda",
                                                           audio_seconds=SECONDS), root / "onnx")
    assert onnx.parity_passed, onnx.manifest["parity"]
    return ae.build_engines(ae.EngineConfig(device="cuda"), onnx, root / "engines")


def test_free_gpu_memory_is_read():
    from adm_export.engines.memory import available_bytes

    free = available_bytes("cuda")
    assert free is not None and 0 < free <= torch.cuda.get_device_properties(0).total_memory


def test_generate_through_the_api_on_cuda(cuda_engine, tmp_path):
    import adm_export as ae

    clips = ae.generate(ae.GenerateConfig(engine_dir=str(cuda_engine.out), device="cuda", prompts=("a dog barks",),
                                          steps=2, audio_seconds=SECONDS), tmp_path / "clips")
    assert [p.name for p in clips.files] == ["0000.wav"] and clips.record["engine"]["ort_options"]["provider"] == "cuda"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips"]  # no lock, no partial folder


def test_too_long_a_clip_is_one_line_on_the_gpu(cuda_engine, tmp_path):
    """600 s: one attention map of the U-Net alone is 115 GB. Refused before the engine runs when the
    GPU has less free, else ONNX Runtime's failed allocation becomes the runner's one line; either
    way exit 1 naming --seconds, nothing written."""
    from tests.helpers import one_error_line, run

    r = run("generate", "--device", "cuda", "--engine", cuda_engine.out, "--prompt", "a dog barks", "--seconds", "600",
            "--steps", "2", "--batch-size", "1", "--out", tmp_path / "o")
    assert r.exit_code == 1, r.output
    line = one_error_line(r)
    assert "--seconds" in line and ("needs" in line or "out of memory" in line), line
    assert list(tmp_path.iterdir()) == []
