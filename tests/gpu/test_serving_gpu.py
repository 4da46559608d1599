"""Serving on CUDA: FP16 export, IO binding, CUDA graphs, generate --device cuda (skipped without a GPU).

Needs torch with CUDA and onnxruntime-gpu (CUDAExecutionProvider).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.gpu.conftest import CUDA_ONLY

torch = pytest.importorskip("torch")

pytestmark = CUDA_ONLY

SECONDS = 1.28


@pytest.fixture(scope="module")
def adapter():
    from adm_export.models import load_model

    return load_model("tiny-audioldm", "cuda")


@pytest.fixture(scope="module")
def fp16_onnx(adapter, tmp_path_factory):
    from adm_export.config import FullPrecisionExportConfig
    from adm_export.export.fp16 import export_full_precision

    out = tmp_path_factory.mktemp("fp16") / "onnx"
    m = export_full_precision(FullPrecisionExportConfig(fp16=True, device="cuda", audio_seconds=SECONDS), out,
                              adapter=adapter)
    assert m["parity"]["passed"], m["parity"]
    return out


def _inputs(adapter, batch, frames, seed):
    x = adapter.denoiser_spec().dummy_inputs(batch, frames, seed=seed)
    return {k: (v.cuda() if k == "timestep" else v.cuda().half()) for k, v in x.items()}


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_io_binding_matches_torch_fp16(adapter, fp16_onnx):
    from adm_export.engines.onnxruntime import OrtEngine, OrtOptions

    engine = OrtEngine(fp16_onnx / "unet.onnx", adapter.denoiser_spec(), OrtOptions(provider="cuda"))
    assert engine.session.get_providers()[0] == "CUDAExecutionProvider"
    import copy

    half = adapter.export_module(copy.deepcopy(adapter.denoiser).half())  # a copy: the adapter stays FP32
    for batch in (1, 2):
        x = _inputs(adapter, batch, 32, seed=batch)
        out = engine(x)
        assert out.is_cuda and out.dtype == torch.float16 and out.shape == x["sample"].shape
        with torch.inference_mode():
            ref = half(*x.values())
        assert _rel(out, ref) < 1e-2


def test_cuda_graph_replays_new_inputs(adapter, fp16_onnx):
    from adm_export.engines.onnxruntime import OrtEngine, OrtOptions

    spec = adapter.denoiser_spec()
    bound = OrtEngine(fp16_onnx / "unet.onnx", spec, OrtOptions(provider="cuda"))
    graph = OrtEngine(fp16_onnx / "unet.onnx", spec, OrtOptions(provider="cuda", cuda_graph=True))
    outs = []
    for seed in (1, 2, 3, 1):  # capture, then replays with other data, then the first again
        x = _inputs(adapter, 2, 32, seed)
        got = graph(x)
        assert _rel(got, bound(x)) < 1e-3
        outs.append(got)
    assert _rel(outs[0], outs[1]) > 0.05  # a replay reads the new input, not the captured one
    assert _rel(outs[0], outs[3]) < 1e-3
    graph(_inputs(adapter, 1, 32, 5))  # another shape: its own session and graph
    assert len(graph._slots) == 2


def test_generate_on_cuda_with_cuda_graph(adapter, fp16_onnx, tmp_path):
    import soundfile as sf

    from adm_export.config import EngineConfig
    from adm_export.engines.stage import build_engines
    from adm_export.stages.generate import GenerateConfig, generate

    engines = tmp_path / "engines"
    build_engines(EngineConfig(device="cuda"), fp16_onnx, engines, adapter=adapter, frames=32)
    files = generate(GenerateConfig(engine_dir=str(engines), prompts=("a dog barks", "rain"), audio_seconds=SECONDS,
                                    steps=3, device="cuda", cuda_graph=True, batch_size=2, plot=True),
                     tmp_path / "clips", adapter=adapter)
    assert len(files) == 2
    for f in files:
        audio, sr = sf.read(str(f))
        assert sr == 16000 and len(audio) == int(SECONDS * 16000) and np.isfinite(audio).all()
    record = json.loads((tmp_path / "clips" / "generate.json").read_text())
    assert record["engine"]["ort_options"]["cuda_graph"] is True
