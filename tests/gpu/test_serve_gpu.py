"""``adm-export serve`` on CUDA (skipped without a GPU): the bundle runtime with CUDA graphs behind the
HTTP service; batched clips equal clips sampled alone; health answers during a batch.

Needs onnxruntime-gpu (CUDAExecutionProvider) and the [serve] packages (fastapi, uvicorn,
prometheus-client, httpx).
"""

from __future__ import annotations

import concurrent.futures
import io
import time

import numpy as np
import pytest

from tests.gpu.conftest import CUDA_ONLY

pytestmark = CUDA_ONLY


@pytest.fixture(scope="module")
def cuda_runtime(tmp_path_factory):
    """tiny-audioldm's FP32 engine bundled, run on CUDA with CUDA graphs (batches of up to 4)."""
    from adm_export.config import BundleConfig
    from adm_export.stages.bundle import bundle
    from adm_export.runtime import BundleRuntime, RuntimeOptions
    from tests.bundle_helpers import fp32_engines

    from adm_export.models import load_model

    adapter = load_model("tiny-audioldm")
    root = tmp_path_factory.mktemp("serve-gpu")
    fp32_engines(adapter, root / "build")
    folder = bundle(BundleConfig(build_dir=str(root / "build"), out=str(root / "bundle")), adapter=adapter).out
    return BundleRuntime(folder, RuntimeOptions(device="cuda", cuda_graph=True, max_batch=4))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_cuda_serve_batches_and_a_clip_is_the_same_alone(cuda_runtime):
    import httpx
    import soundfile as sf

    from tests.unit.test_serve_http import running

    bodies = [{"prompt": p, "seconds": 1.28, "steps": 8, "guidance": 2.5, "seed": s}
              for s, p in enumerate(["a dog barks", "rain on a tin roof", "a siren", "birds at dawn"])]
    with running(cuda_runtime, max_batch=4, max_wait_ms=300) as (url, _):
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/generate", json=b, timeout=120) for b in bodies]
            time.sleep(0.35)
            t0 = time.monotonic()
            health = httpx.get(url + "/health", timeout=10)
            health_s = time.monotonic() - t0
            together = [f.result() for f in futures]
        alone = [httpx.post(url + "/v1/generate", json=b, timeout=120) for b in bodies]
    assert health.status_code == 200 and health_s < 0.5
    assert [r.status_code for r in together + alone] == [200] * 8
    assert max(int(r.headers["x-batch-size"]) for r in together) >= 3
    for t, a in zip(together, alone):
        wt, sr = sf.read(io.BytesIO(t.content), dtype="float32")
        wa, _ = sf.read(io.BytesIO(a.content), dtype="float32")
        assert sr == cuda_runtime.sampling_rate and len(wt) == int(1.28 * sr)
        assert _rel(wt, wa) < 2e-3, _rel(wt, wa)  # runtime's GPU batch independence (1e-3) + 16-bit rounding
