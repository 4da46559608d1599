"""The service under Ray Serve: a local Ray instance, two CPU replicas of the same app."""

from __future__ import annotations

import concurrent.futures
import io
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_replicas_serve_the_app():
    import ray
    from ray import serve

    from adm_export.serving.config import RayServeConfig, ServeConfig
    from adm_export.serving.ray_app import app_builder, build_app
    from tests.serving_fake import FakeRuntime, GenerationRequest, ray_factory

    # Replicas import tests.serving_fake: give their workers the repository on the path.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = RayServeConfig(serve=ServeConfig(bundle="fake", max_batch=4, max_wait_ms=50), num_replicas=2,
                             num_cpus=0.5)
        assert cfg.gpus_per_replica == 0
        serve.run(build_app(cfg, ray_factory), name="adm-test", route_prefix="/")
        app_status = serve.status().applications["adm-test"]
        assert app_status.status == "RUNNING"
        assert app_status.deployments["AudioGeneration"].replica_states == {"RUNNING": 2}

        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health", timeout=30).json()["status"] == "ready"
        bodies = [{"prompt": f"prompt {i}", "seconds": 0.5, "steps": 4, "seed": i} for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda b: httpx.post(url + "/v1/generate", json=b, timeout=60), bodies))
        rt = FakeRuntime()
        for body, r in zip(bodies, results):
            assert r.status_code == 200, r.text
            wave, sr = sf.read(io.BytesIO(r.content), dtype="float32")
            expected = rt.clip(GenerationRequest(prompt=body["prompt"], seconds=0.5, steps=4, guidance_scale=2.5,
                                                 seed=body["seed"]))
            assert sr == rt.sampling_rate and np.abs(wave - expected).max() < 1e-4
        bad = httpx.post(url + "/v1/generate", json={"prompt": ""}, timeout=30)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    finally:
        serve.shutdown()
        ray.shutdown()

    # Options as Ray's CLI passes them (strings); GPU replicas ask for one GPU each; autoscaling bounds.
    app = app_builder({"bundle": "b", "device": "cuda", "max_replicas": "4", "min_replicas": "1", "max_batch": "8"})
    opts = app._bound_deployment._deployment_config
    assert app._bound_deployment.ray_actor_options["num_gpus"] == 1.0
    assert opts.autoscaling_config.max_replicas == 4 and opts.autoscaling_config.min_replicas == 1
