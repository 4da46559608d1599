"""``adm-export serve`` over real HTTP: uvicorn on 127.0.0.1, a fake runtime with timed steps.

The fake (tests/serving_fake.py) has the bundle runtime's API and deterministic clips; the real
runtime on a real tiny bundle is exercised end to end in test_serve_bundle.py.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import uvicorn

from adm_export.serving.app import ServiceState, create_app
from adm_export.serving.config import ServeConfig
from adm_export.serving.server import DrainingServer
from tests.serving_fake import FakeRuntime, GenerationRequest

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def running(runtime, wait_ready=True, **kw):
    """Serve ``runtime`` with uvicorn in a thread on a free loopback port; yields (base URL, state)."""
    cfg = ServeConfig(bundle="fake", port=0, log_level="warning", **kw)
    state = ServiceState(runtime, cfg)
    app = create_app(runtime, cfg, state)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"), state)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while server.bound_port is None:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.bound_port}"
    if wait_ready:
        wait_health(url, 200)
    try:
        yield url, state
    finally:
        server.should_exit = True
        thread.join(20)
        assert not thread.is_alive()


def wait_health(url, status, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == status:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"/health never answered {status}")


def post(url, body, timeout=30, **kw):
    return httpx.post(url + "/v1/generate", json=body, timeout=timeout, **kw)


def as_pcm16(wave):
    """What a 16-bit WAV of ``wave`` reads back as (float in [-1, 1])."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1, 1), 8000, format="WAV", subtype="PCM_16")
    buf.seek(0)
    return sf.read(buf, dtype="float32")[0]


def metric(url, name):
    """Value of one sample of /metrics (``name`` with its labels), 0.0 when absent."""
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def req(prompt="a dog barks", seconds=1.0, steps=4, seed=0, guidance=2.5):
    return GenerationRequest(prompt=prompt, seconds=seconds, steps=steps, guidance_scale=guidance, seed=seed)


# -- the clip -------------------------------------------------------------------------------------
def test_wav_and_json_forms():
    rt = FakeRuntime()
    with running(rt) as (url, _):
        r = post(url, {"prompt": "a dog barks", "seconds": 1.5, "steps": 3, "guidance": 3.0, "seed": 11})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "audio/wav" and r.headers["x-seed"] == "11"
        wave, sr = sf.read(io.BytesIO(r.content), dtype="float32")
        info = sf.info(io.BytesIO(r.content))
        assert sr == rt.sampling_rate and info.subtype == "PCM_16" and info.channels == 1
        assert len(wave) == int(1.5 * rt.sampling_rate)
        np.testing.assert_array_equal(wave, as_pcm16(rt.clip(req(seconds=1.5, steps=3, seed=11, guidance=3.0))))

        # JSON: the same WAV, base64, with its metadata (by query parameter or Accept header).
        j = post(url, {"prompt": "a dog barks", "seconds": 1.5, "steps": 3, "guidance": 3.0, "seed": 11},
                 params={"format": "json"})
        assert j.status_code == 200 and j.headers["content-type"] == "application/json"
        meta = j.json()
        assert base64.b64decode(meta["wav_base64"]) == r.content
        assert (meta["sampling_rate"], meta["samples"], meta["seed"], meta["steps"], meta["model"]) == (
            rt.sampling_rate, len(wave), 11, 3, rt.model_id)
        a = post(url, {"prompt": "x", "seconds": 0.5, "seed": 1}, headers={"Accept": "application/json"})
        assert a.json()["samples"] == 4000

        # Omitted values: defaults, with a random seed that is returned so the clip can be reproduced.
        d = post(url, {"prompt": "rain"}, params={"format": "json"}).json()
        again = post(url, {"prompt": "rain", "seed": d["seed"]}, params={"format": "json"}).json()
        assert d["seconds"] == 2.56 and d["steps"] == 10 and d["wav_base64"] == again["wav_base64"]
        # Plain curl -d sends a form Content-Type: the body is still read as JSON.
        f = httpx.post(url + "/v1/generate", content=b'{"prompt": "a", "seconds": 0.5}',
                       headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
        assert f.status_code == 200
        assert metric(url, 'adm_serve_requests_total{status="200"}') == 6
        assert metric(url, "adm_serve_clips_total") == 6


def test_health_before_and_after_warmup_and_metrics_names():
    rt = FakeRuntime(warmup_delay=1.0)
    with running(rt, wait_ready=False) as (url, _):
        h = httpx.get(url + "/health", timeout=5)
        assert h.status_code == 503 and h.json()["status"] == "warming" and not rt.warmed
        r = post(url, {"prompt": "early"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "retry-after" in r.headers
        wait_health(url, 200)
        assert rt.warmed and httpx.get(url + "/health").json()["status"] == "ready"
        text = httpx.get(url + "/metrics").text
        for name in ("adm_serve_requests_total", "adm_serve_request_latency_seconds_bucket", "adm_serve_queue_depth",
                     "adm_serve_batch_size_bucket", "adm_serve_clips_per_second", "adm_serve_ready 1.0"):
            assert name in text


# -- batching -------------------------------------------------------------------------------------
def test_concurrent_requests_share_a_batch_and_keep_their_own_clip():
    rt = FakeRuntime(step_delay=0.02)
    bodies = [{"prompt": p, "seconds": 1.0, "steps": 3, "seed": s}
              for p, s in [("a dog barks", 1), ("rain", 2), ("a siren", 3), ("a dog barks", 4)]]
    with running(rt, max_batch=4, max_wait_ms=300) as (url, _):
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda b: post(url, b), bodies))
            # Another length and the same length again: a length never shares a batch with another.
            other = list(pool.map(lambda b: post(url, b), [{**bodies[0], "seconds": 2.0}, bodies[1]]))
        alone = [post(url, b) for b in bodies]  # one at a time: batches of one
    assert all(r.status_code == 200 for r in together + other + alone)
    assert sorted(rt.batches[0]) == [1, 2, 3, 4]  # the four concurrent requests: one U-Net batch
    assert [r.headers["x-batch-size"] for r in together] == ["4"] * 4
    assert sorted(map(len, rt.batches[1:3])) == [1, 1]  # 2.0 s and 1.0 s: two batches
    assert rt.batches[3:] == [[1], [2], [3], [4]]
    for t, a in zip(together, alone):  # batched or alone, the same clip
        assert t.content == a.content


# -- overload, timeout, validation --------------------------------------------------------------------
def test_overload_gives_503_with_retry_after_and_the_server_keeps_answering():
    rt = FakeRuntime(step_delay=0.05)
    with running(rt, max_batch=1, max_queue=2, max_wait_ms=0) as (url, state):
        body = {"prompt": "busy", "seconds": 0.5, "steps": 6}
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(post, url, {**body, "seed": i}) for i in range(10)]
            time.sleep(0.1)
            t0 = time.monotonic()
            health = httpx.get(url + "/health", timeout=5)  # answered during a batch
            health_s = time.monotonic() - t0
            results = [f.result() for f in futures]
        codes = sorted(r.status_code for r in results)
        assert health.status_code == 200 and health_s < 1.0
        assert codes.count(503) >= 5 and codes.count(200) >= 3, codes  # 1 running + 2 queued at any time
        for r in results:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        assert max(rt.batches, key=len) and all(len(b) == 1 for b in rt.batches)
        assert post(url, {**body, "seed": 99}).status_code == 200  # and it still serves afterwards
        assert state.batcher.queued == 0


def test_timeout_gives_504_and_drops_the_work():
    rt = FakeRuntime(step_delay=0.05)
    with running(rt, timeout_s=0.3) as (url, state):
        r = post(url, {"prompt": "slow", "seconds": 0.5, "steps": 60, "seed": 5})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        deadline = time.monotonic() + 5
        while not state.batcher.idle and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rt.cancelled_seeds == [5] and rt.steps_run[-1] < 60  # the batch stopped early
        assert metric(url, 'adm_serve_requests_total{status="504"}') == 1


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": ""}, "empty prompt"),
    ({"prompt": "x" * 201}, "prompt of 201 characters"),
    ({"prompt": "x", "seconds": 99}, "seconds 99.0"),
    ({"prompt": "x", "seconds": 0.01}, "seconds 0.01"),
    ({"prompt": "x", "steps": 0}, "steps 0"),
    ({"prompt": "x", "steps": 1000}, "steps 1000"),
    ({"prompt": "x", "steps": "10"}, "invalid 'steps' '10'"),
    ({"prompt": "x", "steps": 2.5}, "invalid 'steps' 2.5"),
    ({"prompt": 5}, "invalid 'prompt' 5"),
    ({"prompt": "x", "seed": -1}, "invalid 'seed' -1"),
    ({"prompt": "x", "guidance": -1.0}, "guidance -1.0"),
    ({"prompt": "x", "colour": "red"}, "unknown field 'colour'"),
    ({"seconds": 1.0}, "missing field 'prompt'"),
    ([1, 2], "invalid body"),
    (b"{not json", "invalid JSON body"),
    (b"", "missing request body"),
    (b'{"prompt": "x", "seconds": NaN}', "invalid"),
])
def test_bad_requests_get_422_with_one_line(serving_url, body, fragment):
    if isinstance(body, bytes):
        r = httpx.post(serving_url + "/v1/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = post(serving_url, body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert set(err) == {"error"} and set(err["error"]) == {"code", "message"}
    assert err["error"]["code"] == "invalid_request"
    msg = err["error"]["message"]
    assert fragment in msg and "\n" not in msg and "Traceback" not in msg and len(msg) < 200, msg


def test_an_oversized_body_gets_413_and_memory_stays_bounded(serving_url):
    r = httpx.post(serving_url + "/v1/generate", content=b'{"prompt": "' + b"x" * 200_000 + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

    def chunked():  # no Content-Length: counted as it streams
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(serving_url + "/v1/generate", content=chunked())
    assert r.status_code == 413


def test_bad_format_and_unknown_routes(serving_url):
    r = post(serving_url, {"prompt": "x"}, params={"format": "mp3"})
    assert r.status_code == 422 and "format" in r.json()["error"]["message"]
    assert httpx.get(serving_url + "/v2/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(serving_url + "/v1/generate").status_code == 405


@pytest.fixture(scope="module")
def serving_url():
    with running(FakeRuntime()) as (url, _):
        yield url


# -- cancel, auth, drain ----------------------------------------------------------------------------
def raw_post(port, body: dict) -> socket.socket:
    """Send a request on a bare socket (closing it is a client that goes away)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def test_a_client_that_disconnects_cancels_its_work():
    rt = FakeRuntime(step_delay=0.05)
    with running(rt, max_batch=2, max_wait_ms=500) as (url, state):
        port = int(url.rsplit(":", 1)[1])

        def wait(cond):
            deadline = time.monotonic() + 5
            while not cond() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert cond()

        gone = raw_post(port, {"prompt": "gone", "steps": 20, "seed": 2})
        stay = concurrent.futures.ThreadPoolExecutor(1).submit(post, url, {"prompt": "stay", "steps": 20, "seed": 1})
        wait(lambda: state.batcher.running == 2)  # gone and stay share a batch
        queued = raw_post(port, {"prompt": "queued", "steps": 20, "seed": 3})
        wait(lambda: state.batcher.queued == 1)
        gone.close()  # running: dropped from its batch at the next step
        queued.close()  # waiting: dropped from the queue, never sampled
        assert stay.result().status_code == 200  # its batch mate is unaffected
        wait(lambda: state.batcher.idle)
    assert sorted(rt.batches[0]) == [1, 2] and len(rt.batches) == 1, rt.batches  # seed 3 never sampled
    assert rt.cancelled_seeds == [2]
    assert state.metrics.cancelled.labels(reason="client")._value.get() == 2


def test_bearer_token(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret-token\n")
    with running(FakeRuntime(), api_key_file=str(key)) as (url, _):
        body = {"prompt": "x", "seconds": 0.5}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Basic s3cret-token"}):
            r = post(url, body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        assert post(url, {"prompt": ""}, headers={}).status_code == 401  # no validation hints without a token
        assert post(url, body, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # probes need no token


def test_sigterm_drains_in_flight_requests_and_exits_0():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.serving_fake", "--port", "0", "--step-delay", "0.05",
                             "--max-batch", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split("listening on ")[1].strip()
        wait_health(url, 200)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            inflight = [pool.submit(post, url, {"prompt": f"p{i}", "seconds": 0.5, "steps": 30, "seed": i})
                        for i in range(3)]  # a batch of 2 running, 1 queued: ~3 s in all
            # SIGTERM only once all three are in the server (running or queued): a request still on its
            # way when the drain starts is rightly refused, which is not what this test is about.
            deadline, seen = time.monotonic() + 10, 0
            while seen < 3 and time.monotonic() < deadline:
                h = httpx.get(url + "/health").json()
                seen = h["running"] + h["queued"]
                time.sleep(0.01)
            assert seen == 3, "the three requests never were in the server at once"
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            late = post(url, {"prompt": "late", "seconds": 0.5})  # still listening, no longer accepting
            health = httpx.get(url + "/health")
            results = [f.result() for f in inflight]
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert [r.status_code for r in results] == [200, 200, 200]
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
