"""The bundle runtime on CUDA (skipped without a GPU): CUDA provider for every component, IO binding,
CUDA graphs, an FP16 engine built for CUDA, and torch blocked from import on the GPU too.

Needs onnxruntime-gpu (CUDAExecutionProvider); torch with CUDA only for the FP16 export.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.gpu.conftest import CUDA_ONLY

pytestmark = CUDA_ONLY


@pytest.fixture(scope="module")
def adapter():
    from adm_export.models import load_model

    return load_model("tiny-audioldm")


@pytest.fixture(scope="module")
def fp32_bundle(adapter, tmp_path_factory):
    """tiny-audioldm's FP32 engine (built on the CPU), bundled."""
    from adm_export.config import BundleConfig
    from adm_export.stages.bundle import bundle
    from tests.bundle_helpers import fp32_engines

    root = tmp_path_factory.mktemp("bundle32")
    fp32_engines(adapter, root / "build")
    return bundle(BundleConfig(build_dir=str(root / "build"), out=str(root / "bundle")), adapter=adapter).out


@pytest.fixture(scope="module")
def fp16_cuda_bundle(tmp_path_factory):
    """An FP16 engine exported and built for CUDA (the GPU serving export), bundled."""
    from adm_export.config import BundleConfig
    from adm_export.stages.bundle import bundle
    from adm_export.config import EngineConfig
    from adm_export.engines.stage import build_engines
    from adm_export.config import FullPrecisionExportConfig
    from adm_export.export.fp16 import export_full_precision
    from adm_export.models import load_model

    root = tmp_path_factory.mktemp("bundle16")
    gpu_adapter = load_model("tiny-audioldm", "cuda")
    export_full_precision(FullPrecisionExportConfig(model="tiny-audioldm", fp16=True, device="cuda",
                                                    audio_seconds=1.28), root / "onnx", adapter=gpu_adapter)
    build_engines(EngineConfig(device="cuda"), root / "onnx", root / "build" / "engines", adapter=gpu_adapter)
    cpu_adapter = load_model("tiny-audioldm")  # components are exported and checked on the CPU
    return bundle(BundleConfig(build_dir=str(root / "build"), out=str(root / "bundle")), adapter=cpu_adapter).out


def _rt(folder, **kw):
    from adm_export.runtime import BundleRuntime, RuntimeOptions

    return BundleRuntime(folder, RuntimeOptions(**kw))


def _reqs(n=2, seconds=1.28, steps=6):
    from adm_export.runtime import GenerationRequest

    prompts = ["a dog barks while rain falls", "a loud siren, rising in pitch", "birds chirp at dawn"]
    return [GenerationRequest(prompts[i], seconds, steps, (2.5, 4.0, 3.0)[i], 20 + i) for i in range(n)]


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


def test_every_component_runs_on_the_cuda_provider_and_matches_the_cpu(fp32_bundle):
    gpu, cpu = _rt(fp32_bundle, device="cuda"), _rt(fp32_bundle, device="cpu")
    sessions = [gpu.unet.session, gpu.vae_decoder.session, gpu.vocoder.session,
                *(m.session for m in gpu.conditioner.models.values())]
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in sessions)
    reqs = _reqs()
    g = gpu.sample(reqs, [gpu.initial_noise(r)[0] for r in reqs])
    c = cpu.sample(reqs, [cpu.initial_noise(r)[0] for r in reqs])
    for gl, cl, gw, cw in zip(g.latents, c.latents, g.waveforms, c.waveforms):
        # FP32 on both; the CUDA provider may use TF32 convolutions.
        assert _rel(gl, cl) < 1e-2 and _rel(gw, cw) < 3e-2, (_rel(gl, cl), _rel(gw, cw))


def test_cuda_graph_replays_equal_io_binding_and_follow_batch_changes(fp32_bundle):
    bound, graph = _rt(fp32_bundle, device="cuda"), _rt(fp32_bundle, device="cuda", cuda_graph=True)
    reqs = _reqs(3)
    want = bound.generate(reqs)
    for _ in range(2):  # the second call replays the captured graph
        got = graph.generate(reqs)
        assert all(_rel(a, b) < 1e-4 for a, b in zip(got, want))
    # A cancelled request shrinks the batch: a new (batch, frames) session, same clips for the others.
    part = graph.generate(reqs, cancelled=lambda i: i == 1)
    assert part[1] is None and _rel(part[0], want[0]) < 1e-4 and _rel(part[2], want[2]) < 1e-4
    # Batch independence on the GPU.
    alone = graph.generate(reqs[:1])[0]
    assert _rel(alone, want[0]) < 1e-3


def test_fp16_engine_built_for_cuda(fp16_cuda_bundle, fp32_bundle):
    import json

    manifest = json.loads((fp16_cuda_bundle / "manifest.json").read_text())
    assert manifest["engine"]["built_for"] == "cuda" and manifest["engine"]["precision"] == "fp16"
    rt16 = _rt(fp16_cuda_bundle, device="cuda", cuda_graph=True)
    rt32 = _rt(fp32_bundle, device="cpu")
    reqs = _reqs()
    a, b = rt16.generate(reqs), rt32.generate(reqs)
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in a)
    # FP16 U-Net over 6 steps against FP32: same clip up to half-precision rounding.
    assert all(_rel(x, y) < 5e-2 for x, y in zip(a, b)), [_rel(x, y) for x, y in zip(a, b)]
    rt16.warmup()


def test_torch_free_runtime_on_cuda(fp32_bundle):
    from tests.unit.test_bundle import _BLOCKED

    script = _BLOCKED.replace("RuntimeOptions(threads=1)", "RuntimeOptions(device='cuda', cuda_graph=True)")
    script += "\nassert rt.unet._slots and rt.vocoder.session.get_providers()[0] == 'CUDAExecutionProvider'\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = subprocess.run([sys.executable, "-c", script, str(fp32_bundle)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")
