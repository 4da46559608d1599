#!/usr/bin/env python3
"""The GPU race (issue 14): the project's CUDA engines against torch on one card, in one run.

Phases (each fits one 10-minute device command; ``--time-budget`` skips later rows past it and
the JSON is rewritten after every row, so a cut run keeps what it measured):

``prepare``  The engines, made with the project's own CLI exactly as a user makes them
             (subprocesses of ``python -m adm_export``): the fused FP16 engine
             (``export-baseline --dtype fp16 --device cuda`` + ``engine --device cuda``) and the
             INT8 build's CUDA engine (``build --device cuda``), from the AudioLDM-S-sized
             pipeline saved with ``save_pretrained`` (random weights). Folders the GPU suite
             already made in the same ``--workdir`` (``ADM_GPU_WORKDIR``) are reused.
``race``     U-Net step latency at batch 1, 2 and 8 on the 10.24 s latent (8x256x16): torch
             eager FP32 (the reference of every rel. L2) and FP16, torch.compile FP16
             ``reduce-overhead`` (CUDA graphs; compile time reported as start-up), the fused FP16
             engine and the INT8 build's engine (loaded by ``load_ort_denoiser`` as ``generate``
             loads them), each with IO binding and with CUDA graphs. Median of per-call CUDA-event
             timings after warm-up; ratio to torch.compile at the same batch.
``e2e``      ``adm-export generate`` as a user runs it (a subprocess per run), 10.24 s clips,
             25 steps, 4 and 64 prompts: the torch pipeline (no engine) against each engine;
             seconds per clip and start-up (session, cuDNN search, graph capture) as
             ``generate.json`` reports them apart, plus the process's wall time.

Usage (GPU machine; ``benchmarks/gpu_session.sh`` is the exact sequence)::

    python benchmarks/speed_gpu.py --phase prepare --workdir /tmp/adm-gpu --out $OUT
    python benchmarks/speed_gpu.py --phase race --workdir /tmp/adm-gpu --out $OUT --time-budget 500
    python benchmarks/speed_gpu.py --phase e2e --workdir /tmp/adm-gpu --out $OUT --time-budget 500
    python benchmarks/speed_gpu.py --smoke --device cpu --phase all --workdir /tmp/adm-smoke --out /tmp/adm-smoke

Each phase writes ``speed_gpu_<phase>.json`` and prints a markdown table. ``--smoke --device cpu``
runs every phase on the tiny model with the CPU provider (no torch.compile, no FP16 rows): a check
of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_common as sc  # noqa: E402

log = logging.getLogger("speed_gpu")
ROOT = Path(__file__).resolve().parents[1]
START = time.perf_counter()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=["prepare", "race", "e2e", "all"], default="all")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/adm-gpu"),
                   help="Folders of the model and engines (the GPU suite's ADM_GPU_WORKDIR is reused).")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="Tiny model, few iterations, small runs (checks the script).")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--seconds", type=float, default=10.24, help="Audio length (10.24 s: the 8x256x16 latent).")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--clips", type=int, nargs="+", default=[4, 64], help="e2e: prompts per generate run.")
    p.add_argument("--steps", type=int, default=25, help="e2e: sampler steps.")
    p.add_argument("--batch-size", type=int, default=4, help="e2e: generate --batch-size (its default).")
    p.add_argument("--engine-flags", default="--cuda-graph",
                   help="e2e: generate options for the engine runs (quoted; '' for the defaults).")
    p.add_argument("--time-budget", type=float, default=540, help="Seconds per phase; later rows are skipped past it.")
    p.add_argument("--skip", nargs="*", default=[], help="Row keys to skip: eager32 eager16 compile fp16 int8 "
                                                         "graph torch.")
    args = p.parse_args(argv)
    if args.smoke:
        args.warmup, args.iters, args.batches = 1, 3, [1, 2]
        args.seconds, args.clips, args.steps = 1.28, [2, 3], 2
        if args.device == "cpu":
            args.engine_flags = ""
    return args


# -- prepare: the engines, through the CLI -----------------------------------------------------------
def adm(args, *cli_args, timeout=580) -> dict:
    """``python -m adm_export ARGS`` as a subprocess; returns seconds, return code and the output's tail."""
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ADM_EXPORT_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "adm_export", *map(str, cli_args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    run = {"command": "adm-export " + " ".join(map(str, cli_args)), "seconds": round(time.perf_counter() - t0, 2),
           "returncode": proc.returncode, "tail": (proc.stdout + proc.stderr)[-1500:]}
    log.info("%s -> %d in %.1f s", run["command"][:160], proc.returncode, run["seconds"])
    if proc.returncode != 0:
        raise RuntimeError(f"{run['command']} exited {proc.returncode}: {run['tail'][-800:]}")
    return run


def model_dir(args) -> Path:
    """The saved pipeline folder (``audioldm-s``, or ``tiny-audioldm-dir`` with --smoke): the suite's names."""
    if args.smoke:
        return sc.saved_pipeline(args.workdir / "tiny-audioldm-dir", "tiny")
    return sc.saved_pipeline(args.workdir / "audioldm-s", "audioldm-s")


def prepare(args, out: dict) -> dict:
    """``{"model": dir, "fp16": engines, "int8": engines}``, made (or found) in ``--workdir``."""
    prep = out.setdefault("prepare", {})
    t0 = time.perf_counter()
    model = model_dir(args)
    prep["model_dir"] = {"path": str(model), "seconds": round(time.perf_counter() - t0, 1)}
    dev = args.device
    dtype = "fp16" if dev == "cuda" else "fp32"  # the CPU provider has few FP16 kernels
    found = {"fp16": args.workdir / "stages-s" / "fp16-engines", "int8": args.workdir / "build-s" / "engines"}
    mine = {"fp16": args.workdir / "bench" / "fp16-engines", "int8": args.workdir / "bench" / "int8" / "engines"}
    paths = {"model": model}
    for key in ("fp16", "int8"):
        if key in args.skip:
            continue
        if not args.smoke and (found[key] / "manifest.json").is_file():
            paths[key] = found[key]
            prep[key] = {"engines": str(found[key]), "made_by": "the GPU suite (tests/gpu/test_flow_gpu.py)"}
        elif (mine[key] / "manifest.json").is_file():
            paths[key] = mine[key]
            prep.setdefault(key, {"engines": str(mine[key]), "made_by": "an earlier prepare"})
        else:
            runs = []
            if key == "fp16":
                onnx_dir = args.workdir / "bench" / "fp16-onnx"
                runs.append(adm(args, "export-baseline", "--model", model, "--dtype", dtype, "--device", dev,
                                "--out", onnx_dir, "--force"))
                runs.append(adm(args, "engine", "--onnx", onnx_dir, "--out", mine[key], "--device", dev, "--force"))
            else:
                runs.append(adm(args, "build", "--model", model, "--device", dev, "--no-eval", "--out",
                                mine[key].parent, "--force", "--num-prompts", 2 if args.smoke else 8,
                                "--steps", 2 if args.smoke else 10, "--points", 2 if args.smoke else 16))
            paths[key] = mine[key]
            prep[key] = {"engines": str(mine[key]), "made_by": "this prepare", "runs": runs}
        layers = json.loads((paths[key] / "onnxruntime" / "layers.json").read_text())
        prep[key].update(fusions=layers.get("fusions"), layer_precisions=layers.get("layer_precisions"),
                         precision=json.loads((paths[key] / "manifest.json").read_text()).get("precision"))
    return paths


# -- race: U-Net step latency ---------------------------------------------------------------------------
class Race:
    """Rows of the step-latency table; writes ``speed_gpu_race.json`` after each."""

    def __init__(self, args, results: dict, paths: dict):
        from adm_export.models import load_model

        self.args, self.results, self.paths = args, results, paths
        self.t0 = time.perf_counter()
        self.adapter = load_model(str(paths["model"]))  # CPU, FP32: the weights every row starts from
        self.spec = self.adapter.denoiser_spec()
        self.frames = self.spec.frames_for_seconds(args.seconds)
        self.reference: dict = {}
        results.update(latent=list(self.spec.concrete_shape("sample", {"batch": 1, "frames": self.frames})[1:]),
                       params=self.adapter.denoiser_parameter_count(), rows=[])

    def over(self) -> bool:
        return time.perf_counter() - self.t0 > self.args.time_budget

    def inputs(self, batch: int, dtype):
        x = self.spec.dummy_inputs(batch, self.frames, seed=batch)
        return {k: (v.to(self.args.device) if k == "timestep" else v.to(self.args.device, dtype)) for k, v in x.items()}

    def timer(self, fn):
        if self.args.device == "cuda":
            return sc.cuda_time(fn, self.args.warmup, self.args.iters)
        return sc.cpu_time(fn, self.args.warmup, self.args.iters)

    def row(self, path: str, batch: int, timing: dict | None, out=None, **extra):
        from adm_export.numerics import rel_l2

        r = {"path": path, "batch": batch, **(timing or {}), **extra}
        if out is not None and batch in self.reference:
            r["rel_l2_vs_fp32"] = round(rel_l2(out.float(), self.reference[batch]), 6)
        self.results["rows"].append(r)
        log.info("%-40s B=%d %s ms %s", path, batch, r.get("median_ms"), {k: v for k, v in extra.items()})
        save(self.args, "race", self.results)

    def torch_rows(self, name: str):
        import torch

        dtype = torch.float16 if name == "eager16" else torch.float32
        label = f"torch eager {'FP16' if name == 'eager16' else 'FP32'}"
        unet = copy.deepcopy(self.adapter.denoiser).to(self.args.device, dtype).eval()
        module = self.adapter.export_module(unet)
        for b in self.args.batches:
            x = self.inputs(b, dtype)
            with torch.inference_mode():
                out = module(*x.values())
                if name == "eager32":
                    self.reference[b] = out.float().cpu()
                self.row(label, b, self.timer(lambda: module(*x.values())), out)

    def compile_rows(self):
        import torch

        unet = copy.deepcopy(self.adapter.denoiser).to(self.args.device, torch.float16).eval()
        compiled = torch.compile(self.adapter.export_module(unet), mode="reduce-overhead", dynamic=False)
        for b in self.args.batches:
            if self.over():
                self.row("torch.compile FP16 reduce-overhead", b, None, skipped="time budget")
                continue
            x = self.inputs(b, torch.float16)
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = compiled(*x.values()).clone()
                torch.cuda.synchronize()
                startup = time.perf_counter() - t0
                self.row("torch.compile FP16 reduce-overhead", b, self.timer(lambda: compiled(*x.values())), out,
                         startup_s=round(startup, 1))
        torch._dynamo.reset()

    def engine_rows(self, key: str, graph: bool):
        import torch

        from adm_export.engines.onnxruntime import OrtOptions
        from adm_export.engines.stage import load_ort_denoiser

        provider = "cuda" if self.args.device == "cuda" else "cpu"
        label = {"fp16": "fused FP16 engine", "int8": "INT8 build's engine"}[key] + (
            " + CUDA graph" if graph else ", IO binding" if provider == "cuda" else " (CPU)")
        t0 = time.perf_counter()
        # The options generate serves with (OrtOptions.serving), CUDA graphs on or off.
        options = OrtOptions.serving(self.args.device, io_binding=True, cuda_graph=graph)
        denoiser, _ = load_ort_denoiser(self.paths[key], self.adapter, self.args.device, options=options)
        engine = denoiser.engine
        session_s = time.perf_counter() - t0
        dtype = torch.float16 if "float16" in engine.input_types.get("sample", "") else torch.float32
        for b in self.args.batches:
            if self.over():
                self.row(label, b, None, skipped="time budget")
                continue
            x = self.inputs(b, dtype)
            t0 = time.perf_counter()
            out = engine(x).clone()
            if provider == "cuda":
                torch.cuda.synchronize()
            startup = time.perf_counter() - t0 + session_s  # session (per shape with graphs), search, capture
            session_s = 0.0
            self.row(label, b, self.timer(lambda: engine(x)), out, startup_s=round(startup, 2))

    def run(self):
        import torch

        cpu = self.args.device == "cpu"
        steps = [("eager32", False, lambda: self.torch_rows("eager32")),
                 ("eager16", False, lambda: self.torch_rows("eager16")),
                 ("compile", False, self.compile_rows),
                 ("fp16", False, lambda: self.engine_rows("fp16", False)),
                 ("fp16", True, lambda: self.engine_rows("fp16", True)),
                 ("int8", False, lambda: self.engine_rows("int8", False)),
                 ("int8", True, lambda: self.engine_rows("int8", True))]
        for key, graph, fn in steps:
            if (key in self.args.skip or (graph and ("graph" in self.args.skip or cpu))
                    or (cpu and key in ("eager16", "compile")) or (key in ("fp16", "int8") and key not in self.paths)):
                continue
            if self.over():
                self.results.setdefault("errors", []).append({"where": key, "error": "skipped: time budget"})
                continue
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
                error(self.args, "race", self.results, key, exc)
            gc.collect()
            if not cpu:
                torch.cuda.empty_cache()
        summarize_race(self.results, self.args.batches)


def summarize_race(results: dict, batches) -> None:
    """Per batch: each row's time over torch.compile's (the target: engines <= 1.0)."""
    by = {(r["path"], r["batch"]): r.get("median_ms") for r in results["rows"]}
    for r in results["rows"]:
        comp = by.get(("torch.compile FP16 reduce-overhead", r["batch"]))
        if r.get("median_ms") and comp:
            r["ratio_vs_torch_compile"] = round(r["median_ms"] / comp, 3)
    summary = {}
    for b in batches:
        fp16 = min((v for (p, bb), v in by.items() if bb == b and v and p.startswith("fused FP16")), default=None)
        int8 = min((v for (p, bb), v in by.items() if bb == b and v and p.startswith("INT8")), default=None)
        comp = by.get(("torch.compile FP16 reduce-overhead", b))
        summary[f"batch_{b}"] = {
            "fused_fp16_ms": fp16, "int8_ms": int8, "torch_compile_ms": comp,
            "fused_fp16_le_torch_compile": None if not (fp16 and comp) else fp16 <= comp,
            "int8_le_1.05x_fused_fp16": None if not (fp16 and int8) else int8 <= 1.05 * fp16,
        }
    if summary.get("batch_2", {}).get("fused_fp16_ms"):
        summary["goal_fused_fp16_le_3ms_b2"] = summary["batch_2"]["fused_fp16_ms"] <= 3.0
    results["summary"] = summary


# -- e2e: generate as a user runs it ---------------------------------------------------------------------
E2E_NAMES = {"torch": "torch pipeline (no engine)", "fp16": "fused FP16 engine", "int8": "INT8 build's engine"}


def e2e(args, results: dict, paths: dict) -> None:
    from adm_export.calibration.prompts import builtin_captions

    t_start = time.perf_counter()
    caps = builtin_captions()
    runs = results.setdefault("runs", [])
    flags = args.engine_flags.split()
    for n in args.clips:
        prompts = args.workdir / "bench" / f"prompts-{n}.txt"
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text("\n".join(caps[i % len(caps)] for i in range(n)) + "\n")
        for key in ("torch", "fp16", "int8"):
            if key in args.skip or (key != "torch" and key not in paths):
                continue
            name = E2E_NAMES[key]
            if time.perf_counter() - t_start > args.time_budget:
                runs.append({"denoiser": name, "clips": n, "skipped": "time budget"})
                continue
            out = args.workdir / "bench" / f"gen-{key}-{n}"
            src = ["--model", paths["model"]] if key == "torch" else ["--engine", paths[key], *flags]
            try:
                run = adm(args, "generate", *src, "--prompts", prompts, "--seconds", args.seconds, "--steps",
                          args.steps, "--batch-size", args.batch_size, "--device", args.device, "--out", out, "--force")
                record = json.loads((out / "generate.json").read_text())
                runs.append({"denoiser": name, "clips": n, "flags": "" if key == "torch" else args.engine_flags,
                             "seconds_per_clip": record["seconds_per_clip"],
                             "startup_s": record.get("startup_seconds"), "sampling_s": record.get("seconds"),
                             "process_wall_s": run["seconds"]})
                log.info("e2e %-28s %3d clips: %.3f s per clip, start-up %s s", name, n, record["seconds_per_clip"],
                         record.get("startup_seconds"))
            except Exception as exc:  # noqa: BLE001
                error(args, "e2e", results, f"{key} x{n}", exc)
            save(args, "e2e", results)
    torch_pc = {r["clips"]: r["seconds_per_clip"] for r in runs if r.get("denoiser", "").startswith("torch")
                and r.get("seconds_per_clip")}
    for r in runs:
        if r.get("seconds_per_clip") and torch_pc.get(r["clips"]):
            r["speedup_vs_torch_pipeline"] = round(torch_pc[r["clips"]] / r["seconds_per_clip"], 2)


# -- output ---------------------------------------------------------------------------------------------
def save(args, phase: str, results: dict) -> None:
    sc.write_json(args.out / f"speed_gpu_{phase}.json", results)


def error(args, phase: str, results: dict, where: str, exc: BaseException) -> None:
    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    log.error("%s failed: %s", where, msg)
    results.setdefault("errors", []).append({"where": where, "error": msg, "trace": traceback.format_exc()[-2000:]})
    save(args, phase, results)


def tables(phase: str, results: dict) -> str:
    if phase == "race":
        return sc.format_table(results.get("rows", []), [
            ("path", "path"), ("batch", "batch"), ("median_ms", "median ms"), ("p10_ms", "p10"), ("p90_ms", "p90"),
            ("ratio_vs_torch_compile", "÷ torch.compile"), ("startup_s", "start-up s"),
            ("rel_l2_vs_fp32", "rel. L2 vs FP32"), ("skipped", "note")])
    if phase == "e2e":
        return sc.format_table(results.get("runs", []), [
            ("denoiser", "denoiser"), ("clips", "clips"), ("flags", "flags"), ("seconds_per_clip", "s per clip"),
            ("speedup_vs_torch_pipeline", "× torch pipeline"), ("startup_s", "start-up s"),
            ("sampling_s", "sampling s"), ("process_wall_s", "process wall s"), ("skipped", "note")])
    rows = [{"engine": k, "made_by": v.get("made_by"), "seconds": sum(r["seconds"] for r in v.get("runs", [])) or None,
             "precision": v.get("precision"), "fusions": json.dumps(v.get("fusions"))}
            for k, v in results.get("prepare", {}).items() if isinstance(v, dict) and "engines" in v]
    return sc.format_table(rows, [("engine", "engine"), ("precision", "precision"), ("made_by", "made by"),
                                  ("seconds", "seconds"), ("fusions", "fused ops")])


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for name in ("diffusers", "transformers", "modelopt", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU; use --smoke --device cpu to check the script",
              file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # PyTorch's best convolution algorithms too
    phases = ["prepare", "race", "e2e"] if args.phase == "all" else [args.phase]
    failed = False
    for phase in phases:
        results = {"phase": phase, "environment": sc.environment(args.device),
                   "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        try:
            paths = prepare(args, results)  # finds the engines (or makes them: a prepare phase of its own)
            save(args, phase, results)
            if phase == "race":
                Race(args, results, paths).run()
            elif phase == "e2e":
                e2e(args, results, paths)
        except Exception as exc:  # noqa: BLE001 - the JSON says what failed
            error(args, phase, results, phase, exc)
            failed = True
        results["elapsed_s"] = round(time.perf_counter() - START, 1)
        save(args, phase, results)
        print(f"\n## {phase}\n\n{tables(phase, results)}\n")
        if results.get("summary"):
            print(f"summary: {json.dumps(results['summary'])}")
        if results.get("errors"):
            failed = True
            print(f"errors: {[e['where'] + ': ' + e['error'] for e in results['errors']]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
