"""The public API and the stage runner on CUDA (skipped without a GPU): free GPU memory is read, a
clip length the GPU cannot hold is one line (exit 1, nothing written), and a CUDA engine built and
served through ``adm_export.build_engines`` / ``adm_export.generate``."""

from __future__ import annotations

import pytest

from tests.gpu.conftest import CUDA_ONLY

torch = pytest.importorskip("torch")

pytestmark = CUDA_ONLY

SECONDS = 1.28


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    import adm_export as ae

    root = tmp_path_factory.mktemp("gpu-stages")
    onnx = ae.export_baseline(ae.FullPrecisionExportConfig(model="tiny-audioldm", fp16=True, device="cuda",
                                                           audio_seconds=SECONDS), root / "onnx")
    assert onnx.parity_passed, onnx.manifest["parity"]
    return onnx


@pytest.fixture(scope="module")
def cuda_engine(fp16_export):
    """The tiny model's fused CUDA engine, through the public API."""
    import adm_export as ae

    return ae.build_engines(ae.EngineConfig(device="cuda"), fp16_export, fp16_export.out.parent / "engines")


@pytest.fixture(scope="module")
def unfused_engine(fp16_export):
    """The same FP16 graph unfused: attention as MatMul -> Softmax -> MatMul, holding its score matrices."""
    import adm_export as ae

    return ae.build_engines(ae.EngineConfig(device="cuda", cuda_fusions=False), fp16_export,
                            fp16_export.out.parent / "unfused")


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


def test_too_long_a_clip_is_one_line_on_the_gpu(unfused_engine, tmp_path):
    """3000 s on the unfused engine: one FP16 attention map of the U-Net alone is 360 GB, more than any
    GPU has free: refused before the engine runs, exit 1 naming --seconds, nothing written."""
    from tests.helpers import one_error_line, run

    r = run("generate", "--device", "cuda", "--engine", unfused_engine.out, "--prompt", "a dog barks", "--seconds",
            "3000", "--steps", "2", "--batch-size", "1", "--out", tmp_path / "o")
    assert r.exit_code == 1, r.output
    line = one_error_line(r)
    assert "--seconds 3000 needs" in line and "at most" in line, line
    assert list(tmp_path.iterdir()) == []


def test_fused_attention_is_not_refused_for_its_length(cuda_engine, unfused_engine):
    """The fused engine's MultiHeadAttention (flash / memory-efficient kernels) holds no score matrix."""
    from adm_export.engines.memory import attention_materialized

    assert not attention_materialized(cuda_engine.manifest, "cuda")
    assert attention_materialized(unfused_engine.manifest, "cuda")
