#!/usr/bin/env python
"""Load benchmark of `adm-export serve`: clips/s and p50/p95 latency at concurrency 1, 8, 32, against
sequential one-clip `adm-export generate` calls and against one-clip calls of the runtime in-process.

Everything runs on this machine, over loopback, bounded in requests and time:

1. sequential `adm-export generate --engine BUILD/engines` calls, one clip each (a new process per
   clip: what serving meant before `serve`);
2. `adm-export serve BUNDLE` in a subprocess; concurrency 1 is paired with the bundle runtime in this
   process, warm, one clip per call (the strongest unbatched baseline): each in-process call is
   followed by the same request over HTTP, so both see the same load on a shared machine; p95 at
   concurrency 1 is held against the in-process median;
3. concurrency C > 1: max(2C, `--requests-per-level`) requests from C client threads, distinct
   prompts and seeds, all of one length (so they may share batches), each within `--level-timeout`.

Targets (issue 15, on one GPU): at concurrency 8, >= 4x the clips/s of sequential generate calls;
p95 at concurrency 1 within 1.2x of a single in-process call.

Usage:
    python benchmarks/serve_load.py --smoke                          # CPU check: tiny model, seconds
    python benchmarks/serve_load.py --build build/demo               # builds the bundle if --bundle is not given
    python benchmarks/serve_load.py --build build/gpu --device cuda --cuda-graph --out benchmarks/results/serve_load_gpu
Without --build, a build of --model is made first (adm-export build --no-eval) in a temporary folder.
Writes OUT.md and OUT.json (default benchmarks/results/serve_load_{cpu,gpu}[_smoke]).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a loud siren, rising in pitch", "rain falling on a roof", "a short beep, high pitched",
           "a drum beat with a steady rhythm", "an engine humming at a low pitch", "birds chirping in the distance",
           "a soft melody on a synthesizer", "white noise, quiet", "clicks in a regular rhythm",
           "a chord played loudly"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adm_export", *args]


def run(cmd: list[str], env: dict, timeout: float) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def sequential_generate(engines: Path, args, env, tmp: Path) -> dict:
    """Sequential one-clip `adm-export generate` calls (process start, model and engine load each time)."""
    times = []
    t_all = time.perf_counter()
    for i in range(args.generate_calls):
        cmd = cli("-q", "generate", "--engine", str(engines), "-p", PROMPTS[i % len(PROMPTS)], "--seconds",
                  str(args.seconds), "--steps", str(args.steps), "--seed", str(i), "--device", args.device,
                  "--threads", str(args.threads), "--batch-size", "1", "-o", str(tmp / f"gen{i}"))
        if args.cuda_graph:
            cmd.append("--cuda-graph")
        times.append(run(cmd, env, args.level_timeout))
    wall = time.perf_counter() - t_all
    return {"clips": len(times), "wall_s": wall, "clips_per_s": len(times) / wall,
            "p50_s": pct(times, 0.5), "p95_s": pct(times, 0.95)}


def paired_c1(bundle: Path, url: str, args) -> tuple[dict, dict]:
    """One-clip calls of the warm runtime in this process, each followed by the same request over HTTP."""
    import httpx

    from adm_export.runtime import BundleRuntime, GenerationRequest, RuntimeOptions

    http = httpx.Client(timeout=args.level_timeout)
    t0 = time.perf_counter()
    rt = BundleRuntime(bundle, RuntimeOptions(device=args.device, threads=args.threads, cuda_graph=args.cuda_graph))
    rt.warmup()
    load_s = time.perf_counter() - t0
    local, remote, batches = [], [], []
    for i in range(args.inprocess_calls):
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "seconds": args.seconds, "steps": args.steps,
                "guidance": 2.5, "seed": 1000 + i}
        t = time.perf_counter()
        rt.generate([GenerationRequest(prompt=body["prompt"], seconds=body["seconds"], steps=body["steps"],
                                       guidance_scale=body["guidance"], seed=body["seed"])])
        local.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = http.post(url + "/v1/generate", json=body)
        remote.append(time.perf_counter() - t)
        if r.status_code != 200:
            raise SystemExit(f"serve answered {r.status_code}: {r.text[:300]}")
        batches.append(int(r.headers["x-batch-size"]))
    del rt
    inproc = {"clips": len(local), "load_and_warmup_s": load_s, "clips_per_s": len(local) / sum(local),
              "p50_s": pct(local, 0.5), "p95_s": pct(local, 0.95)}
    c1 = {"concurrency": 1, "requests": len(remote), "ok": len(remote), "errors": 0, "wall_s": sum(remote),
          "clips_per_s": len(remote) / sum(remote), "p50_s": pct(remote, 0.5), "p95_s": pct(remote, 0.95),
          "mean_batch": statistics.fmean(batches), "paired_with_in_process": True}
    return inproc, c1


class Server:
    """`adm-export serve` in a subprocess on a free loopback port."""

    def __init__(self, bundle: Path, args, env):
        cmd = cli("-q", "serve", str(bundle), "--port", "0", "--device", args.device, "--threads", str(args.threads),
                  "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue",
                  str(max(64, max(args.concurrency) * 2)), "--timeout", str(args.level_timeout))
        if args.cuda_graph:
            cmd.append("--cuda-graph")
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.wait(10)
            raise SystemExit(f"serve did not start: {line}{''.join(self.stderr)[-2000:]}")
        self.url = line.split("listening on ")[1].strip()
        import httpx

        t0 = time.perf_counter()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - t0 > 600 or self.proc.poll() is not None:
                raise SystemExit(f"serve never became ready: {''.join(self.stderr)[-2000:]}")
            time.sleep(0.1)
        self.ready_s = time.perf_counter() - t0

    def stop(self) -> int:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def load_level(url: str, concurrency: int, n: int, args) -> dict:
    import httpx

    # One keep-alive client per thread, as a real client holds one: a new httpx client per request
    # builds an SSL context (tens of ms of CPU), which made closed-loop clients miss the batch window.
    local = threading.local()

    def client():
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=args.level_timeout)
        return local.client

    def one(i: int):
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "seconds": args.seconds, "steps": args.steps, "seed": i}
        t = time.perf_counter()
        try:
            r = client().post(url + "/v1/generate", json=body)
            code = r.status_code
            batch = int(r.headers.get("x-batch-size", 0))
        except httpx.HTTPError:
            code, batch = -1, 0
        return code, time.perf_counter() - t, batch

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    ok = [(lat, b) for code, lat, b in results if code == 200]
    lat = [x for x, _ in ok]
    return {"concurrency": concurrency, "requests": n, "ok": len(ok), "errors": n - len(ok), "wall_s": wall,
            "clips_per_s": len(ok) / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
            "mean_batch": statistics.fmean(b for _, b in ok) if ok else 0.0}


def make_build(args, env, tmp: Path) -> Path:
    out = tmp / "build"
    extra = ["--num-prompts", "2", "--steps", "4", "--points", "4", "--seconds", str(args.seconds)]
    run(cli("-q", "build", "--model", args.model, "--out", str(out), "--no-eval", "--device", args.device, *extra),
        env, 3600)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=None, help="adm-export build folder (engines/ for generate)")
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: bundled from --build)")
    ap.add_argument("--model", default="reference-audioldm", help="model built when --build is not given")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--cuda-graph", action="store_true", help="CUDA graphs in serve, generate and in-process")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime CPU threads (0: its default)")
    ap.add_argument("--seconds", type=float, default=2.56)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-level", type=int, default=24, help="requests per level (at least 2x the concurrency)")
    ap.add_argument("--generate-calls", type=int, default=5)
    ap.add_argument("--inprocess-calls", type=int, default=20,
                    help="in-process calls, each paired with one request at concurrency 1")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--level-timeout", type=float, default=600.0, help="seconds, per level and per request")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1.28 s, 4 steps, few requests (a CPU check)")
    ap.add_argument("--out", type=Path, default=None, help="writes OUT.md and OUT.json")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.seconds, args.steps = "tiny-audioldm", 1.28, 4
        args.requests_per_level, args.generate_calls, args.inprocess_calls = 8, 2, 4
        args.concurrency = [1, 8, 32] if args.concurrency == [1, 8, 32] else args.concurrency
    kind = "gpu" if args.device == "cuda" else "cpu"
    out = args.out or REPO / "benchmarks" / "results" / f"serve_load_{kind}{'_smoke' if args.smoke else ''}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ADM_EXPORT_NO_PROGRESS": "1"}
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        build = args.build or make_build(args, env, tmp)
        bundle = args.bundle
        if bundle is None:
            bundle = tmp / "bundle"
            run(cli("-q", "bundle", str(build), "--out", str(bundle)), env, 3600)
        print("1/3 sequential adm-export generate calls ...", file=sys.stderr)
        seq = sequential_generate(build / "engines", args, env, tmp)
        server = Server(bundle, args, env)
        levels = []
        try:
            print("2/3 in-process runtime calls, each followed by the same request to serve ...", file=sys.stderr)
            inproc, c1 = paired_c1(bundle, server.url, args)
            print("3/3 adm-export serve under load ...", file=sys.stderr)
            for c in args.concurrency:
                if c == 1:
                    levels.append(c1)
                else:
                    levels.append(load_level(server.url, c, max(2 * c, args.requests_per_level), args))
                print(f"  concurrency {c}: {levels[-1]['clips_per_s']:.2f} clips/s", file=sys.stderr)
        finally:
            exit_code = server.stop()
    load_after = os.getloadavg()
    result = {
        "machine": {"device": args.device, "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_before": load_before, "load_avg_after": load_after},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sequential_generate": seq, "in_process": inproc, "serve": levels, "serve_ready_s": server.ready_s,
        "serve_exit_code_after_sigterm": exit_code, "total_s": time.perf_counter() - t_start,
    }
    c1 = next((lv for lv in levels if lv["concurrency"] == 1), None)
    c8 = next((lv for lv in levels if lv["concurrency"] == 8), None)
    result["ratios"] = {
        "c8_vs_sequential_generate": c8["clips_per_s"] / seq["clips_per_s"] if c8 else None,
        "c8_vs_in_process": c8["clips_per_s"] / inproc["clips_per_s"] if c8 else None,
        "c1_p95_vs_in_process_p50": c1["p95_s"] / inproc["p50_s"] if c1 else None,
    }
    md = markdown(result)
    print(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(md)
    return 0


def markdown(r: dict) -> str:
    s, seq, ip, m = r["settings"], r["sequential_generate"], r["in_process"], r["machine"]
    lines = [
        f"# adm-export serve: load benchmark ({m['device']})", "",
        f"model {s['model'] if not s['build'] else s['build']}, {s['seconds']} s clips, {s['steps']} steps, "
        f"max batch {s['max_batch']}, max wait {s['max_wait_ms']} ms; {m['cpus']} CPUs; load average "
        f"{m['load_avg_before'][0]:.2f} before, {m['load_avg_after'][0]:.2f} after; total {r['total_s']:.0f} s.", "",
        "| what | clips | clips/s | p50 (s) | p95 (s) | mean batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| sequential `adm-export generate`, 1 clip per call | {seq['clips']} | {seq['clips_per_s']:.3f} | "
        f"{seq['p50_s']:.3f} | {seq['p95_s']:.3f} | 1 |",
        f"| runtime in-process, 1 clip per call (warm; interleaved with concurrency 1) | {ip['clips']} | {ip['clips_per_s']:.3f} | {ip['p50_s']:.3f} | "
        f"{ip['p95_s']:.3f} | 1 |",
    ]
    for lv in r["serve"]:
        err = f" ({lv['errors']} failed)" if lv["errors"] else ""
        lines.append(f"| `serve`, concurrency {lv['concurrency']} | {lv['ok']}{err} | {lv['clips_per_s']:.3f} | "
                     f"{lv['p50_s']:.3f} | {lv['p95_s']:.3f} | {lv['mean_batch']:.2f} |")
    ra = r["ratios"]
    lines += [""]
    if ra["c8_vs_sequential_generate"] is not None:
        lines.append(f"- concurrency 8 vs sequential generate: **{ra['c8_vs_sequential_generate']:.2f}x** clips/s "
                     f"(target >= 4x on one GPU); vs the warm in-process runtime: {ra['c8_vs_in_process']:.2f}x")
    if ra["c1_p95_vs_in_process_p50"] is not None:
        lines.append(f"- p95 at concurrency 1 / in-process call (median): **{ra['c1_p95_vs_in_process_p50']:.2f}x** "
                     f"(target <= 1.2x)")
    lines.append(f"- serve: ready {r['serve_ready_s']:.1f} s after it listened; exit code after SIGTERM "
                 f"{r['serve_exit_code_after_sigterm']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
