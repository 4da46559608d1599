#!/usr/bin/env python3
"""Multi-GPU scaling of the data-parallel loops (issue 10): eval generation and the sensitivity search.

Runs the project's own sharded code paths (``adm_export.eval.harness.generate_with_trajectory`` and
``adm_export.quantize.sensitivity.measure`` under torch.distributed, :mod:`adm_export.distributed`)
at 1, 2 and 4 processes, one GPU each, launched by torchrun in the same call, and prints the
throughput and the speed-up over 1 GPU:

* **eval generation**: clips/s for N clips x S DDIM steps with classifier-free guidance on the
  AudioLDM-S-sized pipeline of ``benchmarks/speed_common.py`` (U-Net ``audioldm_s_unet_config()``,
  VAE, HiFi-GAN vocoder and CLAP-sized text encoder, random weights, FP32 as the eval's baseline
  runs); includes writing the shards and rank 0 reading every clip and trajectory back (what
  the eval stage does).
* **sensitivity search**: layer-trials/s of ``measure`` on the same U-Net, INT8 candidates for
  every searched layer (one format: one ModelOpt quantize + calibration per rank, then one
  trial per layer on the measurement points), table gathered on every rank.

Each run warms up first (cuDNN autotuning, ModelOpt's CUDA extension, which the driver compiles
once before any timing). Timed spans start and end at a barrier on every rank.

    python benchmarks/scaling_gpu.py --out $OUT --gpus 1,2,4 --time-budget 420
    python benchmarks/scaling_gpu.py --smoke          # CPU, gloo, tiny sizes: checks the script

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 in every launched environment).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from speed_common import make_points  # noqa: E402  (after the path set-up above)

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="Folder for scaling_gpu.json / .md.")
    p.add_argument("--gpus", default="1,2,4", help="Process counts to run (comma separated).")
    p.add_argument("--clips", type=int, default=96, help="Eval clips (chunks of 8).")
    p.add_argument("--steps", type=int, default=25, help="Sampler steps per clip.")
    p.add_argument("--seconds", type=float, default=10.24, help="Clip length (latent 8 x 256 x 16 at 10.24 s).")
    p.add_argument("--layers", type=int, default=0, help="Searched layers (0: all).")
    p.add_argument("--eval-points", type=int, default=4,
                   help="Sensitivity measurement points (batch 2 each; quantize's --sensitivity-points default).")
    p.add_argument("--calib-points", type=int, default=4, help="Calibration points (full length, 10.24 s).")
    p.add_argument("--frames", type=int, default=64,
                   help="Latent frames of the measurement points (quantize's --sensitivity-frames default).")
    p.add_argument("--time-budget", type=float, default=420.0, help="Seconds; later runs are skipped past it.")
    p.add_argument("--smoke", action="store_true", help="CPU/gloo, tiny U-Net and sizes (script check).")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_adapter(seed: int, smoke: bool):
    """The AudioLDM-S-sized pipeline of ``speed_common`` (U-Net, VAE, HiFi-GAN and CLAP text encoder
    at published sizes, seeded random weights), or the embedded tiny one with ``smoke``.

    (The embedded pipeline's own text encoder projects to 32 dimensions, not the 512 the
    AudioLDM-S U-Net's class embedding takes, so the full-size pipeline is used for generation.)
    """
    import speed_common as sc

    return sc.make_adapter(sc.build_pipeline("tiny" if smoke else "audioldm-s", seed),
                           "tiny-audioldm" if smoke else sc.MODEL_ID)


# -- one rank -----------------------------------------------------------------------------------------
def worker(args) -> None:
    import torch

    from adm_export import distributed as dist
    from adm_export.config import EvalConfig
    from adm_export.eval.harness import CHUNK, eval_prompts, generate_with_trajectory
    from adm_export.formats import policy as pol
    from adm_export.numerics import run_denoiser
    from adm_export.quantize import sensitivity
    from adm_export.quantize.modelopt import quantize_with_plans

    dist.init()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    world = dist.world_size()

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    t_load = time.perf_counter()
    adapter = make_adapter(args.seed, args.smoke)
    adapter.pipeline.to(device)
    load_s = time.perf_counter() - t_load
    out: dict = {"world_size": world, "device": device, "load_s": round(load_s, 2)}

    # 1. Eval generation: warm-up (one chunk per rank, 2 steps, other seeds), then N clips x S steps.
    cfg = EvalConfig(num_clips=args.clips, steps=args.steps, audio_seconds=args.seconds, device=device)
    warm = EvalConfig(num_clips=CHUNK * world, steps=2, audio_seconds=args.seconds, device=device)
    generate_with_trajectory(adapter, eval_prompts(CHUNK * world), [10**6 + i for i in range(CHUNK * world)],
                             warm, "warm-up")
    sync()
    t0 = time.perf_counter()
    waves, traj = generate_with_trajectory(adapter, eval_prompts(args.clips), list(range(args.clips)), cfg, "bench")
    sync()
    gen_s = time.perf_counter() - t0
    out["eval"] = {"clips": args.clips, "steps": args.steps, "audio_seconds": args.seconds, "seconds": round(gen_s, 3),
                   "clips_per_s": round(args.clips / gen_s, 4)}
    if dist.is_main():
        assert len(waves) == args.clips and traj.shape[:2] == (args.clips, args.steps)
        # Same clips whatever the number of GPUs? (compared across runs by the driver)
        out["eval"]["clips_digest"] = dist.tensor_digest([torch.from_numpy(w) for w in waves])

    # 2. Sensitivity search: INT8 trials of every searched layer.
    full = adapter.denoiser_spec().frames_for_seconds(args.seconds)
    calib = make_points(adapter, args.calib_points, full, args.seed, device)
    evalp = make_points(adapter, args.eval_points, args.frames, args.seed + 1000, device)
    plans = pol.resolve(pol.preset("mixed"), adapter.denoiser)
    if args.layers:
        plans = plans[:args.layers]
    cands = {p.name: ["fp16", "int8"] for p in plans}
    refs = [run_denoiser(adapter, adapter.denoiser, p) for p in evalp]
    quantize_s: list[float] = []

    def quantize_fn(trial, points):
        t = time.perf_counter()
        model = quantize_with_plans(adapter, points, trial)
        if cuda:
            torch.cuda.synchronize()
        quantize_s.append(time.perf_counter() - t)
        return model

    few = plans[:world * sensitivity.ITEMS_PER_SHARD]
    sensitivity.measure(adapter, calib, evalp, few, {p.name: cands[p.name] for p in few}, quantize_fn, refs, True)
    sync()
    t0 = time.perf_counter()
    table = sensitivity.measure(adapter, calib, evalp, plans, cands, quantize_fn, refs, True)
    sync()
    sens_s = time.perf_counter() - t0
    measured = sum("int8" in v for v in table.values())
    out["sensitivity"] = {"layers": len(plans), "trials": measured, "eval_points": len(evalp),
                          "frames": args.frames, "seconds": round(sens_s, 3),
                          "trials_per_s": round(measured / sens_s, 4),
                          # ModelOpt quantize + calibration of the trial model: every rank does it
                          # (the serial part); the trials after it are what the ranks split.
                          "quantize_s": round(quantize_s[-1], 3),
                          "trials_only_per_s": round(measured / max(sens_s - quantize_s[-1], 1e-9), 4),
                          "table_digest": dist.key_of(table)}
    digests = dist.all_gather(out["sensitivity"]["table_digest"])
    out["sensitivity"]["table_identical_on_all_ranks"] = len(set(digests)) == 1
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(0)
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if dist.is_main() and args.result:
        args.result.write_text(json.dumps(out))
    dist.barrier()


# -- driver -----------------------------------------------------------------------------------------
def precompile(env: dict) -> float:
    """Compile (or load) ModelOpt's CUDA extension once, outside every timing."""
    t = time.perf_counter()
    code = ("import torch\nif torch.cuda.is_available():\n"
            "    from modelopt.torch.quantization.extensions import get_cuda_ext\n    print('ext', get_cuda_ext())")
    subprocess.run([sys.executable, "-c", code], env=env, check=False)
    return time.perf_counter() - t


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.clips, args.steps, args.seconds, args.frames, args.layers, args.eval_points = 10, 2, 1.28, 32, 8, 1
    # The same CPU threads per process at every process count (torchrun would set 1 for N > 1 only).
    threads = os.environ.get("OMP_NUM_THREADS") or str(1 if args.smoke else 8)
    env = dict(os.environ, **NCCL_ENV, ADM_EXPORT_NO_PROGRESS="1", OMP_NUM_THREADS=threads,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        info["commit"] = os.environ.get("ADM_EXPORT_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip() or None
    except Exception:  # noqa: BLE001
        info["commit"] = None
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip().splitlines()
    except Exception:  # noqa: BLE001
        info["nvidia_smi"] = None
    if not args.smoke:
        info["extension_compile_s"] = round(precompile(env), 1)
    runs = []
    for n in [int(x) for x in args.gpus.split(",") if x]:
        left = args.time_budget - (time.perf_counter() - started)
        if runs and left < 30:
            print(f"skipping {n} processes: {left:.0f} s of the time budget left", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   str(Path(__file__).resolve()), "--worker", "--result", str(result),
                   *[a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]]
            if args.smoke:
                cmd += ["--clips", str(args.clips), "--steps", str(args.steps), "--seconds", str(args.seconds),
                        "--frames", str(args.frames), "--layers", str(args.layers), "--eval-points",
                        str(args.eval_points)]
            t = time.perf_counter()
            try:
                rc = subprocess.run(cmd, env=env, timeout=max(left, 30)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            wall = time.perf_counter() - t
            if rc != 0 or not result.is_file():
                print(f"{n} processes: failed ({rc})", flush=True)
                runs.append({"world_size": n, "failed": str(rc), "wall_s": round(wall, 1)})
                continue
            r = json.loads(result.read_text())
            r["wall_s"] = round(wall, 1)
            runs.append(r)
            print(json.dumps(r), flush=True)
    base = next((r for r in runs if r.get("world_size") == 1 and "eval" in r), None)
    rows = []
    for r in runs:
        if "eval" not in r:
            rows.append(f"| {r['world_size']} | failed ({r['failed']}) | | | | | | | |")
            continue
        ge, se = r["eval"]["clips_per_s"], r["sensitivity"]["trials_per_s"]
        su_g = ge / base["eval"]["clips_per_s"] if base else None
        su_s = se / base["sensitivity"]["trials_per_s"] if base else None
        to = r["sensitivity"]["trials_only_per_s"]
        su_t = to / base["sensitivity"]["trials_only_per_s"] if base else None
        r["speedup"] = {"eval": su_g and round(su_g, 3), "sensitivity": su_s and round(su_s, 3),
                        "sensitivity_trials_only": su_t and round(su_t, 3)}
        same = "—" if base is None else "yes" if r["eval"].get("clips_digest") == base["eval"].get("clips_digest") \
            else "no"
        x = lambda v: "—" if v is None else f"{v:.2f}x"  # noqa: E731  (no 1-GPU run in this call)
        rows.append(f"| {r['world_size']} | {ge:.3f} | {x(su_g)} | {same} | {se:.2f} | "
                    f"{x(su_s)} | {r['sensitivity']['quantize_s']:.1f} | {to:.2f} ({x(su_t)}) | {r['wall_s']:.0f} |")
    card = next((r.get("gpu") for r in runs if r.get("gpu")), "cpu (gloo)")
    table = "\n".join([
        f"card: {card}; eval: {args.clips} clips x {args.steps} steps, {args.seconds} s; sensitivity: INT8 trials, "
        f"{args.eval_points} points x {args.frames} frames",
        "",
        "| GPUs | eval clips/s | eval speed-up | clips = 1-GPU clips | sensitivity layer-trials/s | "
        "sensitivity speed-up | quantize per rank s | trials/s after quantize (speed-up) | launch wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows])
    print(table, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scaling_gpu.json").write_text(json.dumps({**info, "card": card, "runs": runs}, indent=2) + "\n")
        head = (f"# Multi-GPU scaling (issue 10)\n\n{info['date']}, commit {info['commit']}, "
                f"{len(info.get('nvidia_smi') or [])} x {card}; `python benchmarks/scaling_gpu.py "
                f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
        (args.out / "scaling_gpu.md").write_text(head + table + "\n")
    return 0 if all("eval" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
