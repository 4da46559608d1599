"""``adm-export serve`` end to end on a real tiny bundle: the CLI in a subprocess, HTTP on loopback.

The bundle comes from the session's tiny build (tiny-audioldm, INT8 engine); the runtime is the
torch-free bundle runtime, so what is checked here is what a user gets from ``curl``.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.helpers import one_error_line, run

REPO = Path(__file__).resolve().parents[2]
LSB = 1 / 32768  # one step of 16-bit PCM


@pytest.fixture(scope="module")
def tiny_bundle(tiny_build, tmp_path_factory):
    from adm_export.config import BundleConfig
    from adm_export.stages.bundle import bundle

    out, result, _ = tiny_build
    assert result.exit_code == 0, result.output
    folder = tmp_path_factory.mktemp("serve-bundle") / "bundle"
    bundle(BundleConfig(build_dir=str(out), out=str(folder)))
    return folder


@pytest.fixture(scope="module")
def server(tiny_bundle):
    """``adm-export serve BUNDLE --port 0`` in a subprocess; yields its URL and the process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ADM_EXPORT_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "adm_export", "-q", "serve", str(tiny_bundle), "--port", "0",
                             "--threads", "1", "--max-batch", "4", "--max-wait-ms", "400"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split("listening on ")[1].strip()
        from tests.unit.test_serve_http import wait_health

        wait_health(url, 200, timeout=120)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def post(url, body, **kw):
    return httpx.post(url + "/v1/generate", json=body, timeout=120, **kw)


def test_a_wav_comes_back_with_the_models_rate_and_length(server, tiny_bundle):
    from adm_export.runtime import BundleRuntime, RuntimeOptions

    url, _ = server
    rt = BundleRuntime(tiny_bundle, RuntimeOptions(threads=1))
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ready" and health["model"] == rt.model_id == "tiny-audioldm"
    r = post(url, {"prompt": "a dog barks", "seconds": 1.0, "steps": 3, "seed": 5})
    assert r.status_code == 200, r.text
    wave, sr = sf.read(io.BytesIO(r.content), dtype="float32")
    assert sr == rt.sampling_rate == 16000 and len(wave) == 16000
    assert sf.info(io.BytesIO(r.content)).subtype == "PCM_16"
    assert np.abs(wave).max() > 10 * LSB  # a clip, not silence
    bad = post(url, {"prompt": "x", "seconds": rt.limits["max_seconds"] + 1})
    assert bad.status_code == 422 and "seconds" in bad.json()["error"]["message"]


def test_a_clip_is_the_same_alone_or_in_a_batch(server, tiny_bundle):
    from adm_export.runtime import BundleRuntime, GenerationRequest, RuntimeOptions

    url, _ = server
    bodies = [{"prompt": p, "seconds": 1.28, "steps": 3, "guidance": 2.5, "seed": s}
              for p, s in [("a dog barks", 1), ("rain on a tin roof", 2), ("a siren", 3)]]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda b: post(url, b), bodies))
    assert [r.status_code for r in together] == [200] * 3
    assert max(int(r.headers["x-batch-size"]) for r in together) >= 2  # they did share a U-Net batch
    alone = [post(url, b) for b in bodies]
    assert [r.headers["x-batch-size"] for r in alone] == ["1"] * 3
    rt = BundleRuntime(tiny_bundle, RuntimeOptions(threads=1))
    for b, t, a in zip(bodies, together, alone):
        wt = sf.read(io.BytesIO(t.content), dtype="float32")[0]
        wa = sf.read(io.BytesIO(a.content), dtype="float32")[0]
        [direct] = rt.generate([GenerationRequest(prompt=b["prompt"], seconds=b["seconds"], steps=b["steps"],
                                                  guidance_scale=b["guidance"], seed=b["seed"])])
        # Float tolerance of the runtime plus one 16-bit rounding step.
        assert np.abs(wt - wa).max() <= 2 * LSB
        assert np.abs(wa - np.clip(direct, -1, 1)).max() <= 2 * LSB
    assert not np.allclose(sf.read(io.BytesIO(alone[0].content))[0], sf.read(io.BytesIO(alone[1].content))[0])


def test_sigterm_exits_0(server):
    _, proc = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_a_missing_bundle_is_one_error_line(tmp_path):
    result = run("serve", tmp_path / "nope", "--port", "0")
    assert result.exit_code == 1
    assert "nope" in one_error_line(result)


# What the compose service runs, inside the CPU image: serve, a clip, the health check, SIGTERM -> 0.
_IN_IMAGE = r"""
adm-export serve /bundle --host 127.0.0.1 --port 18080 --threads 1 & pid=$!
python - <<'PY'
import io, json, time, urllib.request
import soundfile as sf
for _ in range(600):
    try:
        urllib.request.urlopen("http://127.0.0.1:18080/health", timeout=4)  # compose's health check
        break
    except Exception:
        time.sleep(0.2)
body = json.dumps({"prompt": "a loud siren", "seconds": 1.0, "steps": 3, "seed": 1}).encode()
wav = urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:18080/v1/generate", data=body)).read()
w, sr = sf.read(io.BytesIO(wav))
print(f"CLIP {len(w)} {sr}")
PY
kill -TERM $pid
wait $pid
echo "EXIT $?"
"""


@pytest.mark.slow
def test_cpu_image_serves_a_bundle(tiny_bundle, tmp_path):
    """docker/Dockerfile.cpu built with buildah (as the gate's image test does) runs the compose command."""
    from tests.unit.test_ci_gate import _buildah, build_cpu_image

    image = build_cpu_image(tmp_path)
    for path in [tiny_bundle, *tiny_bundle.rglob("*")]:  # the image runs as uid 1000
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    ctr = _buildah("from", image).stdout.strip()
    try:
        proc = _buildah("run", "--isolation", "chroot", "-v", f"{tiny_bundle}:/bundle:ro", ctr, "--", "sh", "-c",
                        _IN_IMAGE, check=False, timeout=600)
    finally:
        _buildah("rm", ctr, check=False)
    assert "CLIP 16000 16000" in proc.stdout and "EXIT 0" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
