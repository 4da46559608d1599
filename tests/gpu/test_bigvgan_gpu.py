"""Make-An-Audio's BigVGAN vocoder on CUDA (skipped without a GPU).

Needs torch with CUDA, onnxruntime-gpu (CUDAExecutionProvider) and NVIDIA's ``bigvgan`` wheel
(``pip install --no-deps bigvgan==2.4.1``; librosa is not needed).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu.conftest import CUDA_ONLY

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

pytestmark = CUDA_ONLY


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_tiny_make_an_audio_generates_on_cuda():
    """The whole tiny pipeline (U-Net, VAE, BigVGAN) on CUDA gives the CPU clip."""
    from adm_export.models import load_model

    cuda = load_model("tiny-make-an-audio", "cuda")
    assert cuda.pipeline.vocoder.device.type == "cuda"
    got = cuda.generate(["birds chirp", "a dog barks"], [0, 1], 4, 1.0, 3.0)
    ref = load_model("tiny-make-an-audio", "cpu").generate(["birds chirp", "a dog barks"], [0, 1], 4, 1.0, 3.0)
    for g, r in zip(got, ref):
        assert g.shape == r.shape == (16000,)
        assert np.isfinite(g).all() and float(np.abs(g).max()) > 1e-3
        # TF32 convolutions (cuDNN's default) and kernel order: a few 1e-3 at most.
        assert _rel(g, r) < 2e-2


def test_bigvgan_on_cuda_equals_cpu_and_its_onnx_runs_on_the_cuda_ep(tmp_path):
    """Same mel through the vocoder on CPU, on CUDA (FP32, TF32 off), and exported through ORT's CUDA EP."""
    from adm_export.models.make_an_audio.tiny import TINY_MAKE_AN_AUDIO_BIGVGAN_CONFIG
    from adm_export.models.make_an_audio.vocoder import build_bigvgan

    torch.manual_seed(0)
    vocoder = build_bigvgan(TINY_MAKE_AN_AUDIO_BIGVGAN_CONFIG)
    mel = torch.randn(2, 50, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vocoder(mel).numpy()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            got = vocoder.to("cuda")(mel.cuda()).cpu().numpy()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert _rel(got, ref) < 1e-4

    path = tmp_path / "vocoder.onnx"
    torch.onnx.export(vocoder.cpu(), (mel,), str(path), input_names=["mel"], output_names=["waveform"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"mel": {0: "batch", 1: "frames"}, "waveform": {0: "batch", 1: "samples"}})
    # FP32 convolutions (the CUDA EP may otherwise use TF32, ~1e-3 relative per layer).
    session = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", {"use_tf32": 0})])
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    out = session.run(None, {"mel": mel.numpy()})[0]
    assert out.shape == ref.shape and _rel(out, ref) < 1e-3
