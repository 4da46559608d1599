#!/usr/bin/env python3
"""The GPU speed race: U-Net step latency of the AudioLDM-S-sized U-Net, every serving path, one run.

Rows (batch 1, 2 and 8 at the 10.24 s latent 8x256x16, random weights, median of per-call
CUDA-event timings after warm-up):

* torch eager FP32 and FP16 (what diffusers users run today),
* torch.compile FP16, mode ``reduce-overhead`` (CUDA graphs; the compile time is recorded),
* ONNX Runtime CUDA FP16 with IO binding, then + CUDA graphs, then + CUDA graphs + NHWC,
* ONNX Runtime CUDA on the project's INT8 Q/DQ export (calibrated, quantized and exported by the
  project's own stage functions on a small calibration set; ModelOpt runs on the CPU, so its CUDA
  extension is never compiled),

and seconds per 10.24 s clip end to end (text encoder, sampler, VAE, vocoder, all FP16 on the GPU)
for torch eager FP16, the fastest ONNX Runtime path and torch.compile.

Usage (on the GPU machine; see benchmarks/RESULTS.md for the exact command):

    python benchmarks/speed_gpu.py --out results/ --workdir /tmp/bench              # prepare + measure
    python benchmarks/speed_gpu.py --phase prepare --workdir /tmp/bench             # exports only
    python benchmarks/speed_gpu.py --phase measure --workdir /tmp/bench --out DIR   # reuse the exports
    python benchmarks/speed_gpu.py --smoke --device cpu                             # CPU smoke test, tiny model

Prints a markdown table and writes ``speed_gpu.json`` (rewritten after every row, so a run cut
short still leaves what it measured).
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_common as sc  # noqa: E402

log = logging.getLogger("speed_gpu")
PROMPT = "a dog barks while rain falls on a tin roof"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=["all", "prepare", "measure"], default="all")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/adm-bench"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="Tiny model, few iterations (checks the script).")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--seconds", type=float, default=10.24, help="Audio length of the latent (10.24 s: 8x256x16).")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--e2e-steps", type=int, nargs="+", default=[10, 200])
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--calib-prompts", type=int, default=2)
    p.add_argument("--calib-steps", type=int, default=3)
    p.add_argument("--calib-points", type=int, default=4)
    p.add_argument("--time-budget", type=float, default=540, help="Seconds; later rows are skipped past it.")
    p.add_argument("--skip", nargs="*", default=[], help="Row keys to skip (e.g. compile int8 e2e).")
    args = p.parse_args(argv)
    if args.smoke:
        args.warmup, args.iters, args.e2e_steps, args.e2e_repeats = 2, 5, [3], 1
        args.calib_prompts, args.calib_steps, args.calib_points = 1, 2, 2
    return args


class Race:
    """Holds the models, inputs and results of one run."""

    def __init__(self, args):
        import torch

        self.args = args
        self.t_start = time.perf_counter()
        self.device = args.device
        self.size = "tiny" if args.smoke else "audioldm-s"
        self.results = {"environment": sc.environment(args.device), "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": [], "errors": []}
        self.results["settings"].update(model_size=self.size, cudnn_benchmark=True,
                                        note="median of per-call CUDA-event timings after warm-up")
        torch.backends.cudnn.benchmark = True  # give PyTorch its best convolution algorithms too
        t0 = time.perf_counter()
        self.pipe = sc.build_pipeline(self.size)
        self.results["pipeline_build_s"] = round(time.perf_counter() - t0, 2)
        self.results["params"] = sc.param_counts(self.pipe)
        self.adapter_cpu = sc.make_adapter(self.pipe, sc.MODEL_ID if not args.smoke else "tiny-audioldm")
        self.spec = self.adapter_cpu.denoiser_spec()
        self.frames = self.spec.frames_for_seconds(args.seconds)
        self.results["latent"] = list(self.spec.concrete_shape("sample", {"batch": 1, "frames": self.frames})[1:])
        self.paths = {"fp16": args.workdir / "fp16" / "unet.onnx", "int8": args.workdir / "int8" / "onnx" / "unet.onnx"}
        self.reference = {}

    # -- bookkeeping -------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.time_budget

    def save(self):
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        sc.write_json(self.args.out / "speed_gpu.json", self.results)

    def error(self, where: str, exc: BaseException):
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        log.error("%s failed: %s", where, msg)
        log.debug("%s", traceback.format_exc())
        self.results["errors"].append({"where": where, "error": msg, "trace": traceback.format_exc()[-2000:]})
        self.save()

    def inputs(self, batch: int, dtype):
        x = self.spec.dummy_inputs(batch, self.frames, seed=batch)
        dev = self.device
        return {k: (v.to(dev) if k == "timestep" else v.to(dev, dtype)) for k, v in x.items()}

    def timer(self, fn):
        if self.device == "cuda":
            return sc.cuda_time(fn, self.args.warmup, self.args.iters)
        return sc.cpu_time(fn, self.args.warmup, self.args.iters)

    def sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def add_row(self, path: str, batch: int, timing: dict | None, out=None, **extra):
        from adm_export.numerics import rel_l2

        row = {"path": path, "batch": batch, **(timing or {}), **extra}
        if out is not None and batch in self.reference:
            row["rel_l2_vs_fp32"] = round(rel_l2(out.float().cpu(), self.reference[batch]), 6)
        self.results["rows"].append(row)
        log.info("%-44s B=%d  %s ms  %s", path, batch, row.get("median_ms"),
                 {k: v for k, v in extra.items() if k != "note"})
        self.save()
        return row

    # -- prepare: exports -------------------------------------------------------------------------
    def prepare(self):
        import torch

        from adm_export.config import FullPrecisionExportConfig
        from adm_export.export.fp16 import export_full_precision

        args = self.args
        prep = self.results.setdefault("prepare", {})
        gpu_pipe = copy.deepcopy(self.pipe).to(self.device)
        adapter_gpu = sc.make_adapter(gpu_pipe, self.adapter_cpu.model_id)
        if "fp16" not in args.skip:
            try:
                t0 = time.perf_counter()
                m = export_full_precision(
                    FullPrecisionExportConfig(fp16=True, device=self.device, audio_seconds=args.seconds),
                    self.paths["fp16"].parent, adapter=adapter_gpu, force=True)
                prep["fp16"] = {"seconds": round(time.perf_counter() - t0, 1), "sizes": m["sizes"],
                                "parity": {k: m["parity"].get(k) for k in ("onnx_vs_torch_max", "rounding_floor_max",
                                                                           "passed")},
                                "fp16_check": m["fp16_check"]}
                log.info("FP16 export: %s", prep["fp16"])
            except Exception as exc:
                self.error("prepare fp16 export", exc)
        if "int8" not in args.skip:
            try:
                t0 = time.perf_counter()
                prep["int8"] = sc.prepare_int8(adapter_gpu, self.adapter_cpu, args.workdir / "int8", args.seconds,
                                               args.calib_prompts, args.calib_steps, args.calib_points)
                prep["int8"]["total_s"] = round(time.perf_counter() - t0, 1)
                log.info("INT8 Q/DQ export: %s", prep["int8"])
            except Exception as exc:
                self.error("prepare int8 export", exc)
        del gpu_pipe, adapter_gpu
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        # A later --phase measure (another process) reports how the exports were made.
        sc.write_json(args.workdir / "prepare.json", prep)
        self.save()

    # -- measure: step latency ---------------------------------------------------------------------
    def torch_rows(self, dtype_name: str):
        import torch

        dtype = torch.float16 if dtype_name == "fp16" else torch.float32
        unet = copy.deepcopy(self.pipe.unet).to(self.device, dtype).eval()
        module = self.adapter_cpu.export_module(unet)
        for b in self.args.batches:
            x = self.inputs(b, dtype)
            with torch.inference_mode():
                out = module(*x.values())
                if dtype_name == "fp32":
                    self.reference[b] = out.float().cpu()
                t = self.timer(lambda: module(*x.values()))
            self.add_row(f"torch eager {dtype_name.upper()}", b, t, out)
        del unet, module
        gc.collect()

    def compile_rows(self):
        import torch

        if self.device != "cuda":
            return
        unet = copy.deepcopy(self.pipe.unet).to(self.device, torch.float16).eval()
        module = self.adapter_cpu.export_module(unet)
        torch._dynamo.reset()
        compiled = torch.compile(module, mode="reduce-overhead", dynamic=False)
        self.compiled = compiled
        for b in self.args.batches:
            if self.over_budget():
                self.add_row("torch.compile FP16 reduce-overhead", b, None, skipped="time budget")
                continue
            x = self.inputs(b, torch.float16)
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = compiled(*x.values()).clone()
                self.sync()
                compile_s = time.perf_counter() - t0
                t = self.timer(lambda: compiled(*x.values()))
            self.add_row("torch.compile FP16 reduce-overhead", b, t, out, startup_s=round(compile_s, 1))

    def ort_rows(self, label: str, path: Path, **opts):
        import torch

        from adm_export.engines.onnxruntime import OrtEngine, OrtOptions

        if not path.is_file():
            self.error(label, FileNotFoundError(f"{path} (run --phase prepare first)"))
            return None
        provider = "cuda" if self.device == "cuda" else "cpu"
        if provider == "cpu":  # the CPU smoke run takes the same code path on the CPU provider
            label = label.replace("CUDA", "CPU")
        graph = opts.get("cuda_graph", False)
        options = OrtOptions(provider=provider, **opts)
        t0 = time.perf_counter()
        engine = OrtEngine(path, self.spec, options)
        session_s = time.perf_counter() - t0
        dtype = torch.float16 if "float16" in engine.input_types.get("sample", "") else torch.float32
        for b in self.args.batches:
            if self.over_budget():
                self.add_row(label, b, None, skipped="time budget")
                continue
            x = self.inputs(b, dtype)
            t0 = time.perf_counter()
            out = engine(x).clone()
            self.sync()
            first_s = time.perf_counter() - t0 + (0 if graph else session_s)
            session_s = 0.0
            t = self.timer(lambda: engine(x))
            providers = (engine.graph_slot(engine.dims(x)).session if graph else engine.session).get_providers()
            self.add_row(label, b, t, out, startup_s=round(first_s, 2), providers=providers[0])
        return engine

    # -- end to end ---------------------------------------------------------------------------------
    def e2e(self, denoisers: dict):
        """Seconds per 10.24 s clip (1 prompt, CFG 2.5: U-Net batch 2), all components FP16 on the GPU."""
        import torch

        dtype = torch.float16 if self.device == "cuda" else torch.float32
        pipe = copy.deepcopy(self.pipe).to(self.device, dtype)
        adapter = sc.make_adapter(pipe, self.adapter_cpu.model_id)
        res = self.results.setdefault("end_to_end", {"prompt": PROMPT, "audio_seconds": self.args.seconds,
                                                     "guidance_scale": 2.5, "dtype": str(dtype), "runs": []})
        g = torch.Generator().manual_seed(0)
        latents = torch.randn((1, *self.results["latent"]), generator=g).to(self.device, dtype)

        def clip(steps):
            self.sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                audio = pipe(prompt=[PROMPT], num_inference_steps=steps, audio_length_in_s=self.args.seconds,
                             guidance_scale=2.5, latents=latents, output_type="np").audios
            self.sync()
            return time.perf_counter() - t0, audio

        # Components alone (the sampler is the rest).
        with torch.inference_mode():
            emb = pipe._encode_prompt([PROMPT], self.device, 1, True, None)
            mel = pipe.decode_latents(latents)
            parts = {
                "text_encoder_ms": self.timer(lambda: pipe._encode_prompt([PROMPT], self.device, 1, True, None)),
                "vae_decode_ms": self.timer(lambda: pipe.decode_latents(latents)),
                "vocoder_ms": self.timer(lambda: pipe.mel_spectrogram_to_waveform(mel)),
            }
        res["components"] = {k: v["median_ms"] for k, v in parts.items()}
        res["class_labels_shape"] = list(emb.shape)
        self.save()
        for name, make in denoisers.items():
            if self.over_budget():
                res["runs"].append({"path": name, "skipped": "time budget"})
                continue
            try:
                module = make(adapter) if make is not None else None
                ctx = adapter.using_denoiser(module) if module is not None else _null()
                with ctx:
                    clip(2)  # warm-up (cuDNN autotuning of VAE and vocoder, graph capture)
                    for steps in self.args.e2e_steps:
                        times = [clip(steps)[0] for _ in range(self.args.e2e_repeats if steps <= 50 else 1)]
                        run = {"path": name, "steps": steps, "seconds_per_clip": round(min(times), 3),
                               "all_s": [round(t, 3) for t in times]}
                        res["runs"].append(run)
                        log.info("end to end %-36s %3d steps: %.3f s per clip", name, steps, run["seconds_per_clip"])
                        self.save()
            except Exception as exc:
                self.error(f"end to end {name}", exc)
        del pipe, adapter
        gc.collect()

    def measure(self):
        import torch

        skip = self.args.skip
        steps = [
            ("eager32", lambda: self.torch_rows("fp32")),
            ("eager16", lambda: self.torch_rows("fp16")),
            ("ort", lambda: self.ort_rows("ORT CUDA FP16 IO binding", self.paths["fp16"], io_binding=True)),
            ("ort_graph", lambda: self.ort_rows("ORT CUDA FP16 IO binding + CUDA graph", self.paths["fp16"],
                                                cuda_graph=True) if self.device == "cuda" else None),
            ("ort_graph_nhwc", lambda: self.ort_rows("ORT CUDA FP16 CUDA graph + prefer_nhwc", self.paths["fp16"],
                                                     cuda_graph=True, prefer_nhwc=True)
             if self.device == "cuda" else None),
            ("compile", self.compile_rows),
            ("int8", lambda: self.ort_rows("ORT CUDA INT8 Q/DQ IO binding", self.paths["int8"], io_binding=True)),
            ("int8_graph", lambda: self.ort_rows("ORT CUDA INT8 Q/DQ + CUDA graph", self.paths["int8"],
                                                 cuda_graph=True) if self.device == "cuda" else None),
        ]
        self.engines = {}
        for key, fn in steps:
            if key in skip:
                continue
            if self.over_budget():
                self.results["errors"].append({"where": key, "error": "skipped: time budget"})
                continue
            try:
                r = fn()
                if r is not None:
                    self.engines[key] = r
            except Exception as exc:
                self.error(key, exc)
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()
        self.summarize()
        if "e2e" not in skip:
            self.e2e(self.e2e_denoisers())
        self.summarize()

    def e2e_denoisers(self) -> dict:
        from adm_export.engines.onnxruntime import make_ort_denoiser

        out = {"torch eager FP16": None}
        best = self.results.get("summary", {}).get("best_ort_path_b2")
        key = {"ORT CUDA FP16 IO binding": "ort", "ORT CUDA FP16 IO binding + CUDA graph": "ort_graph",
               "ORT CUDA FP16 CUDA graph + prefer_nhwc": "ort_graph_nhwc"}.get(best)
        if key in self.engines:
            engine = self.engines[key]
            out[best] = lambda adapter: make_ort_denoiser(adapter, engine)
        if getattr(self, "compiled", None) is not None:
            compiled = self.compiled
            out["torch.compile FP16 reduce-overhead"] = lambda adapter: _compiled_denoiser(adapter, compiled)
        return out

    def summarize(self):
        rows = [r for r in self.results["rows"] if r.get("median_ms") is not None]
        by = {(r["path"], r["batch"]): r["median_ms"] for r in rows}
        summary = {}
        for b in self.args.batches:
            eager = by.get(("torch eager FP16", b))
            comp = by.get(("torch.compile FP16 reduce-overhead", b))
            ort = {p: v for (p, bb), v in by.items() if bb == b and p.startswith("ORT CUDA FP16")}
            if not ort:
                continue
            best_path = min(ort, key=ort.get)
            s = {"best_ort_path": best_path, "best_ort_ms": ort[best_path]}
            if eager:
                s["speedup_vs_eager_fp16"] = round(eager / ort[best_path], 2)
            if comp:
                s["ratio_to_torch_compile"] = round(ort[best_path] / comp, 2)
            summary[f"batch_{b}"] = s
        b2 = summary.get("batch_2", {})
        if b2:
            summary["best_ort_path_b2"] = b2["best_ort_path"]
            summary["target_5x_eager_fp16_b2"] = (b2.get("speedup_vs_eager_fp16") or 0) >= 5
            summary["target_within_1.2x_torch_compile_b2"] = (b2.get("ratio_to_torch_compile") or 99) <= 1.2
        self.results["summary"] = summary
        self.save()

    def table(self) -> str:
        cols = [("path", "path"), ("batch", "batch"), ("median_ms", "median ms"), ("p10_ms", "p10"),
                ("p90_ms", "p90"), ("startup_s", "startup s"), ("rel_l2_vs_fp32", "rel. L2 vs FP32"),
                ("skipped", "note")]
        return sc.format_table(self.results["rows"], cols)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _compiled_denoiser(adapter, compiled):
    """The torch.compile'd export module as the pipeline's denoiser (same signature as the U-Net)."""
    import torch

    original = adapter.denoiser

    class CompiledDenoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = original.config

        @property
        def dtype(self):
            return torch.float16

        @property
        def device(self):
            return torch.device("cuda")

        def forward(self, *args, **kwargs):
            inputs = adapter.inputs_from_call(args, kwargs)
            out = compiled(*inputs.values()).clone()  # CUDA-graph outputs are overwritten by the next replay
            return (out,) if kwargs.get("return_dict", True) is False else adapter.wrap_output(out)

    return CompiledDenoiser()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for name in ("diffusers", "transformers", "modelopt", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU; use --device cpu --smoke to check the script",
              file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    race = Race(args)
    log.info("environment: %s", race.results["environment"])
    log.info("params: %s; latent %s", race.results["params"], race.results["latent"])
    if args.phase in ("all", "prepare"):
        race.prepare()
    if args.phase in ("all", "measure"):
        prepared = args.workdir / "prepare.json"
        if args.phase == "measure" and prepared.is_file():
            import json

            race.results["prepare"] = json.loads(prepared.read_text())
        race.measure()
        print()
        print(race.table())
        print()
        for run in race.results.get("end_to_end", {}).get("runs", []):
            print(f"end to end: {run}")
        print(f"summary: {race.results.get('summary')}")
        if race.results["errors"]:
            print(f"errors: {[e['where'] + ': ' + e['error'] for e in race.results['errors']]}")
    race.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
