"""Shared pieces of the speed benchmarks: an AudioLDM-S-sized pipeline with random weights, timers,
the INT8 Q/DQ export made by the project's own stages, and table/JSON output.

The full-size pipeline follows the published AudioLDM-S configuration as far as it can be built
without downloads:

* U-Net: ``adm_export.models.embedded.audioldm_s_unet_config()`` (the project's AudioLDM-S config).
* VAE: ``AutoencoderKL`` with 1 input/output channel, widths 128/256/512, 2 layers per block,
  8 latent channels (AudioLDM's ``ch=128, ch_mult=[1,2,4], num_res_blocks=2, z_channels=8``).
* Vocoder: ``SpeechT5HifiGan`` with AudioLDM's HiFi-GAN 16 kHz/64-mel settings (initial channels
  1024, upsample rates 5/4/2/2/2, kernels 16/16/8/4/4, resblock kernels 3/7/11, dilations 1/3/5).
* Text encoder: ``ClapTextModelWithProjection`` at CLAP's RoBERTa-base size (768 hidden, 12 layers,
  12 heads, 3072 intermediate, vocabulary 50265, 514 positions, projection 512).
* Tokenizer (approximated): the project's byte-level tokenizer (one token per character, no BPE
  merges; the real RoBERTa BPE vocabulary cannot be downloaded) padding to CLAP's 512 tokens, so
  the text encoder does the same work per prompt as the real one.

Weights are random (seeded): timings are real, audio is noise.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

MODEL_ID = "audioldm-s-random"
SAMPLING_RATE = 16000


def build_audioldm_s_pipeline(seed: int = 0):
    """AudioLDM-S-sized ``AudioLDMPipeline`` (float32, CPU) with seeded random weights."""
    import torch
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as dlogging
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

    from adm_export.models.embedded import audioldm_s_unet_config, build_byte_tokenizer

    tokenizer = build_byte_tokenizer(model_max_length=512)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**audioldm_s_unet_config())
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(128, 256, 512),
                        layers_per_block=2, latent_channels=8, norm_num_groups=32, sample_size=512,
                        scaling_factor=0.9227914214134216)
    torch.manual_seed(seed + 2)
    text_encoder = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=50265, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        projection_dim=512, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2,
    ))
    torch.manual_seed(seed + 3)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=64, sampling_rate=SAMPLING_RATE, upsample_initial_channel=1024, upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], normalize_before=False,
    ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        pipe = AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                scheduler=scheduler, vocoder=vocoder)
    finally:
        dlogging.set_verbosity(verbosity)
    for m in (unet, vae, text_encoder, vocoder):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(size: str, seed: int = 0):
    """``size`` ``audioldm-s`` (full size, random weights) or ``tiny`` (the embedded tiny-audioldm)."""
    if size == "tiny":
        from adm_export.models.embedded import build_tiny_audioldm

        pipe = build_tiny_audioldm(seed)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return build_audioldm_s_pipeline(seed)


def saved_pipeline(folder: Path, size: str, seed: int = 0) -> Path:
    """``folder`` holding ``build_pipeline(size, seed)`` written by ``save_pretrained`` (a downloaded
    checkpoint's form), written unless it is there already; the GPU suite and the GPU benchmarks share it."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        pipe = build_pipeline(size, seed)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # the folder appears whole or not at all
        pipe.save_pretrained(str(tmp))
        tmp.rename(folder)
    return folder


def make_adapter(pipe, model_id: str):
    from adm_export.models.audioldm import AudioLDMAdapter

    return AudioLDMAdapter(model_id, pipe)


def make_points(adapter, n: int, frames: int, seed: int, device: str = "cpu") -> list[dict]:
    """``n`` synthetic U-Net inputs (batch 2): random latents, one random timestep per point and
    L2-normalised random class embeddings (what a CLAP projection gives), seeded."""
    import torch

    spec = adapter.denoiser_spec()
    g = torch.Generator().manual_seed(seed)
    pts = []
    for i in range(n):
        x = spec.dummy_inputs(batch=2, frames=frames, seed=seed + i)
        x["timestep"] = torch.full((2,), float(int(torch.randint(0, 1000, (1,), generator=g))))
        c = torch.randn(x["class_labels"].shape, generator=g)
        x["class_labels"] = c / c.norm(dim=-1, keepdim=True)
        pts.append({k: v.to(device) for k, v in x.items()})
    return pts


def param_counts(pipe) -> dict:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder", "vocoder")}


# -- timers -----------------------------------------------------------------------------------------
def _summary(times_ms: list[float]) -> dict:
    s = sorted(times_ms)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return {"median_ms": round(statistics.median(s), 4), "p10_ms": round(q(0.1), 4), "p90_ms": round(q(0.9), 4),
            "min_ms": round(s[0], 4), "iters": len(s)}


def cuda_time(fn, warmup: int, iters: int) -> dict:
    """Median of per-call CUDA-event timings (events on torch's current stream) after ``warmup`` calls.

    Each call is bracketed by two events and synchronised, so a call's time includes its host-side
    launch overhead (what a sampler loop pays per step) and work on other streams that the call
    waits for (ONNX Runtime runs on its own stream and returns when done).
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return _summary(times)


def cpu_time(fn, warmup: int, iters: int) -> dict:
    """Median wall-clock time of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return _summary(times)


# -- the project's INT8 Q/DQ export ---------------------------------------------------------------------
def prepare_int8(adapter_cal, adapter_cpu, workdir: Path, audio_seconds: float, num_prompts: int = 2,
                 steps: int = 3, points: int = 4, placement: str | None = "tensorrt", calibration: Path | None = None,
                 policy: str | None = None, calibration_out: Path | None = None) -> dict:
    """Calibrate, quantize (ModelOpt INT8, on the CPU) and export with the project's stage functions.

    Args:
        adapter_cal: Adapter the calibration sampler runs on (GPU or CPU; same weights).
        adapter_cpu: CPU adapter that quantizes and exports (ModelOpt's fake quant on the CPU needs
            no CUDA extension, so no extension compile happens at all).
        workdir: Folder for ``calibration/``, ``quantized/``, ``onnx/``.
        audio_seconds: Length of the calibration clips.
        num_prompts, steps, points: Size of the calibration set.
        placement: Q/DQ placement of quantize and export (``tensorrt`` or ``onnxruntime``); ``None``:
            the one the quantize stage's default target (``onnxruntime-cpu``) chooses, as a CPU build does.
        calibration: An existing calibration cache to reuse instead of calibrating.
        policy: A ``--policy`` file instead of the INT8 preset.
        calibration_out: Where a new cache goes (default ``workdir/calibration``).

    Returns:
        Paths, stage seconds, the Q/DQ report and parity of the export.
    """
    from adm_export.calibration.latents import calibrate
    from adm_export.config import CalibrationConfig, ExportConfig, QuantizeConfig
    from adm_export.export.onnx import export_onnx
    from adm_export.quantize.stage import quantize

    workdir = Path(workdir)
    seconds = {}
    if calibration is None:
        calibration = Path(calibration_out or workdir / "calibration")
        t0 = time.perf_counter()
        calibrate(CalibrationConfig(model=adapter_cpu.model_id, num_prompts=num_prompts, steps=steps, points=points,
                                    audio_seconds=audio_seconds, device="cpu"),
                  calibration, force=True, adapter=adapter_cal)
        seconds["calibrate"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    q = quantize(QuantizeConfig(precision="int8", device="cpu", placement=placement, policy=policy), calibration,
                 workdir / "quantized", force=True, adapter=adapter_cpu)
    seconds["quantize"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    m = export_onnx(ExportConfig(parity_points=1), workdir / "quantized", workdir / "onnx",
                    calibration, force=True, adapter=adapter_cpu)
    seconds["export"] = round(time.perf_counter() - t0, 2)
    return {
        "onnx": str(workdir / "onnx" / "unet.onnx"),
        "seconds": seconds,
        "placement": q["placement_choice"],
        "policy": policy,
        "calibration": {"prompts": num_prompts, "steps": steps, "points": points, "audio_seconds": audio_seconds,
                        "cache": str(calibration)},
        "quant_error_mean": q["quant_error_rel_l2"]["mean"],
        "qdq": {k: m["qdq"][k] for k in ("ops", "quantized_ops", "float_ops")},
        "sizes": m["sizes"],
        "parity": {k: m["parity"][k] for k in ("onnx_vs_torch_max", "rounding_floor_max", "passed")},
    }


# -- environment and output -----------------------------------------------------------------------------
def cpu_load() -> dict:
    """Load averages and the busiest other processes (to state CPU contention with the results)."""
    load = os.getloadavg()
    top = []
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=5).stdout.splitlines()[1:6]
        top = [line.strip() for line in out]
    except Exception:  # pragma: no cover - ps missing
        pass
    return {"loadavg_1_5_15": [round(x, 2) for x in load], "cores": os.cpu_count(), "top_processes": top}


def environment(device: str) -> dict:
    import torch

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    for mod in ("onnxruntime", "diffusers", "transformers", "onnx", "modelopt"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except Exception:
        pass
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_sms=p.multi_processor_count, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            pass
    return info


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A GitHub-markdown table of ``rows`` (``columns``: (key, header))."""
    def cell(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
