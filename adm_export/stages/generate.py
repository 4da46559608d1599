"""``adm-export generate``: prompts -> WAV files (and spectrogram PNGs), the denoiser served by an engine.

The model's own diffusers pipeline samples; with ``--engine`` its denoiser is replaced by the
ONNX Runtime engine of that folder (:func:`adm_export.engines.stage.load_ort_denoiser`), so text
encoder, sampler, VAE and vocoder are exactly those of the full-precision run. Prompts are
generated ``batch_size`` at a time; clip ``i`` uses seed ``seed + i`` and its initial noise is
drawn from that seed alone, so a clip does not depend on the batch it was generated in.

Output folder::

    0000.wav ...        16-bit PCM at the model's sampling rate
    0000.png ...        log-magnitude spectrogram per clip (``--plot``)
    prompts.json        file, prompt and seed of each clip
    generate.json       settings, engine, timings: ``startup_seconds`` (model load, engine sessions,
                        warm-up) apart from ``seconds_per_clip``

On ``--device cuda`` everything a process pays once is paid before the clock starts: each batch
size the prompts will run at is generated once with :data:`WARMUP_STEPS` steps (cuDNN's algorithm
search, ONNX Runtime's CUDA-graph capture on the third run of a shape, torch's lazy CUDA set-up),
and the engine's sessions are created then; ``seconds_per_clip`` is the steady state.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from adm_export.artifacts import atomic_dir, write_json
from adm_export.config import DEFAULT_AUDIO_SECONDS, DEFAULT_MODEL, check_finite, to_dict
from adm_export.devices import check_device
from adm_export.errors import ArtifactNotFoundError, InvalidInputError
from adm_export.progress import progress

logger = logging.getLogger(__name__)

# ONNX Runtime captures a shape's CUDA graph on its third run (two plain runs first): a warm-up of
# three steps pays session creation, cuDNN search and capture before the clock starts.
WARMUP_STEPS = 3


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Settings of ``generate``.

    Attributes:
        model: Model id (must match the engine's model); ``None``: the engine's model, else the default.
        engine_dir: Engines folder; ``None`` runs the full-precision pipeline.
        prompts: Prompts given on the command line.
        prompts_file: File with one prompt per line.
        audio_seconds: Clip length.
        steps: Sampler steps.
        guidance_scale: Classifier-free guidance scale.
        seed: Seed of the first clip (clip i uses seed + i).
        batch_size: Prompts per pipeline call.
        device: ``cpu`` or ``cuda``.
        plot: Also write a spectrogram PNG per clip.
        threads: ONNX Runtime CPU threads (0: all cores).
        ort_provider: ONNX Runtime provider: ``auto`` (CUDA on ``--device cuda``, else CPU),
            ``cpu``, ``cuda`` or ``tensorrt``.
        io_binding: On CUDA, bind device tensors to the engine (no host copies); ``None``: on.
        cuda_graph: On CUDA, replay each input shape's step as a captured CUDA graph; ``None``:
            on whenever the engine runs on a GPU provider with IO binding (the fast path).
        prefer_nhwc: On CUDA, let ONNX Runtime use NHWC convolution kernels.
        cudnn_search: cuDNN convolution algorithm search (``exhaustive``, ``heuristic``, ``default``).
        warmup: On ``--device cuda``, run each batch shape once before timing (see the module doc).
    """

    model: str | None = None
    engine_dir: str | None = None
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    audio_seconds: float = DEFAULT_AUDIO_SECONDS
    steps: int = 10
    guidance_scale: float = 2.5
    seed: int = 0
    batch_size: int = 4
    device: str = "cpu"
    plot: bool = False
    threads: int = 0
    ort_provider: str = "auto"
    io_binding: bool | None = None
    cuda_graph: bool | None = None
    prefer_nhwc: bool = False
    cudnn_search: str = "exhaustive"
    warmup: bool = True

    def __post_init__(self):
        check_finite(self, {"audio_seconds": "--seconds", "guidance_scale": "--guidance-scale"})
        if self.audio_seconds <= 0:
            raise InvalidInputError(f"invalid --seconds {self.audio_seconds!r}: must be > 0")
        for flag, value in (("--steps", self.steps), ("--batch-size", self.batch_size)):
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"invalid {flag} {value!r}: must be a positive integer")
        if self.guidance_scale < 0:
            raise InvalidInputError(f"invalid --guidance-scale {self.guidance_scale!r}: must be >= 0")
        check_device(self.device, available=False)
        self.ort_options()  # refuses impossible provider / graph / binding combinations
        if self.engine_dir is None:
            engine_flags = [flag for flag, given in (
                (f"--ort-provider {self.ort_provider}", self.ort_provider != "auto"),
                ("--cuda-graph" if self.cuda_graph else "--no-cuda-graph", self.cuda_graph is not None),
                ("--io-binding" if self.io_binding else "--no-io-binding", self.io_binding is not None),
                ("--prefer-nhwc", self.prefer_nhwc),
                (f"--cudnn-search {self.cudnn_search}", self.cudnn_search != "exhaustive")) if given]
            if engine_flags:
                raise InvalidInputError(
                    f"{engine_flags[0]} sets how an engine is served, but no --engine was given (the torch pipeline "
                    f"generates); pass --engine DIR or drop {engine_flags[0]}"
                )
        elif not Path(self.engine_dir).is_dir():
            raise ArtifactNotFoundError(
                f"--engine {self.engine_dir!r} is not a folder; pass the output of `adm-export engine` (or of build: "
                f"BUILD_DIR/engines)"
            )

    def ort_options(self):
        """The ONNX Runtime session settings these options ask for (``OrtOptions.serving``, as ``eval`` uses)."""
        from adm_export.engines.onnxruntime.sessions import OrtOptions

        return OrtOptions.serving(self.device, self.ort_provider, io_binding=self.io_binding,
                                  cuda_graph=self.cuda_graph, prefer_nhwc=self.prefer_nhwc, threads=self.threads,
                                  conv_algo_search=self.cudnn_search)

    def all_prompts(self) -> list[str]:
        """The prompts: ``--prompt`` values first, then the lines of ``--prompts``."""
        from adm_export.calibration.prompts import load_captions

        prompts = [p.strip() for p in self.prompts]
        if any(not p for p in prompts):
            raise InvalidInputError("empty --prompt ''; give some text, e.g. --prompt 'a dog barks'")
        if self.prompts_file:
            if not Path(self.prompts_file).is_file():
                raise InvalidInputError(
                    f"--prompts {self.prompts_file!r} is not a file; give a text file, one prompt a line"
                )
            try:
                prompts += load_captions(self.prompts_file)
            except InvalidInputError as exc:
                raise InvalidInputError(str(exc).replace("--captions", "--prompts")) from None
        if not prompts:
            raise InvalidInputError("no prompt given; pass --prompt TEXT (repeatable) or --prompts FILE")
        return prompts


def spectrogram_png(wave, sampling_rate: int, path: str | Path, title: str = "") -> None:
    """Write a log-magnitude spectrogram of ``wave`` as a PNG (matplotlib, Agg backend, no display).

    Args:
        wave: Mono waveform (float).
        sampling_rate: Its sampling rate in Hz.
        path: PNG file to write.
        title: Plot title (the prompt).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import numpy as np
    from matplotlib.figure import Figure
    from scipy.signal import spectrogram

    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    nperseg = min(512, max(16, len(wave)))
    freqs, times, power = spectrogram(wave, fs=sampling_rate, nperseg=nperseg, noverlap=nperseg * 3 // 4)
    db = 10 * np.log10(power + 1e-12)
    vmax = float(db.max()) if db.size else 0.0
    fig = Figure(figsize=(8, 3), dpi=100)  # no pyplot: no global state, safe in threads and tests
    ax = fig.add_subplot(1, 1, 1)
    mesh = ax.pcolormesh(times, freqs / 1000, db, shading="auto", cmap="magma", vmin=vmax - 80, vmax=vmax)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (kHz)")
    if title:
        ax.set_title(title if len(title) <= 90 else title[:87] + "...", fontsize=9)
    fig.colorbar(mesh, ax=ax, label="dB")
    fig.tight_layout()
    fig.savefig(str(path), format="png")


def generate(cfg: GenerateConfig, out: str | Path, force: bool = False, adapter=None) -> list[Path]:
    """Generate one WAV per prompt into ``out`` (plus ``prompts.json``, ``generate.json`` and, with ``plot``, PNGs).

    Args:
        cfg: Generation settings.
        out: Output folder (refused if non-empty unless ``force``; the stage runner checks and locks
            it first, :func:`adm_export.stages.api.generate`).
        force: Overwrite ``out``.
        adapter: An already loaded model adapter; loaded from ``cfg.model`` otherwise.

    Returns:
        The WAV files, in prompt order.
    """
    import contextlib

    from adm_export.engines.stage import load_ort_denoiser
    from adm_export.eval.clips import write_clips
    from adm_export.models import load_model

    # 1. Validate everything that needs no model before loading one.
    prompts = cfg.all_prompts()
    options = cfg.ort_options()
    manifest = None
    if cfg.engine_dir:
        from adm_export.artifacts import read_manifest
        from adm_export.engines.stage import served_graph

        manifest = read_manifest(cfg.engine_dir, "engine", "--engine")
        served_graph(cfg.engine_dir, options, manifest)  # engine/options mismatches: one line, before any work
    # 2. The pipeline (--model, else the engine's model, else the default), its denoiser served by the engine.
    startup: dict[str, float] = {}
    t0 = time.perf_counter()
    model_id = cfg.model or (manifest["model"]["id"] if manifest else None)
    adapter = adapter or load_model(model_id or DEFAULT_MODEL, cfg.device)
    startup["model_load"] = time.perf_counter() - t0
    ctx = contextlib.nullcontext()
    engine_info = None
    denoiser = None
    if cfg.engine_dir:
        from adm_export.engines.memory import attention_materialized, check_attention_memory, score_bytes

        # A length whose attention cannot fit is refused before the engine is loaded.
        if attention_materialized(manifest, cfg.device):
            rows = min(cfg.batch_size, len(prompts)) * (2 if cfg.guidance_scale > 1 else 1)
            check_attention_memory(adapter, adapter.engine_seconds(cfg.audio_seconds), rows, cfg.device, "--seconds",
                                   "--batch-size", score_bytes(manifest, cfg.device))
        t0 = time.perf_counter()
        denoiser, manifest = load_ort_denoiser(cfg.engine_dir, adapter, cfg.device, cfg.threads, options=options)
        startup["engine_load"] = time.perf_counter() - t0
        ctx = adapter.using_denoiser(denoiser)
        ort_report = manifest["report"]["engines"]["onnxruntime"]
        engine_info = {"dir": str(cfg.engine_dir), "precision": manifest.get("precision"),
                       "graph": ort_report.get("graph", "export"), "ort_options": to_dict(options)}
    # 3. Sample, batch by batch.
    seeds = [cfg.seed + i for i in range(len(prompts))]
    # Sample a length the engine can run (a latent multiple of the U-Net's downsampling), then
    # cut every clip back to --seconds.
    seconds = adapter.engine_seconds(cfg.audio_seconds)
    if seconds != cfg.audio_seconds:
        logger.info("generate: sampling %.3f s (a latent length the U-Net can run), clips cut to %.3f s",
                    seconds, cfg.audio_seconds)
    keep = int(cfg.audio_seconds * adapter.sampling_rate)
    waves, batch_seconds = [], []
    batches = [range(i, min(i + cfg.batch_size, len(prompts))) for i in range(0, len(prompts), cfg.batch_size)]
    with ctx:
        if cfg.warmup and cfg.device == "cuda":
            # Every batch shape once, before the clock: sessions, cuDNN search, graph capture.
            t0 = time.perf_counter()
            sessions_before = denoiser.engine.session_seconds if denoiser is not None else 0.0
            for n in sorted({len(b) for b in batches}):
                adapter.generate(prompts[:n], seeds[:n], WARMUP_STEPS, seconds, cfg.guidance_scale)
            startup["warmup"] = time.perf_counter() - t0
            if denoiser is not None:
                startup["warmup_engine_sessions"] = denoiser.engine.session_seconds - sessions_before
        start = time.perf_counter()
        for b in progress(batches, desc="generate", unit="batch"):
            t0 = time.perf_counter()
            waves += [w[:keep] for w in adapter.generate([prompts[i] for i in b], [seeds[i] for i in b], cfg.steps,
                                                         seconds, cfg.guidance_scale)]
            batch_seconds.append(round(time.perf_counter() - t0, 4))
        wall = time.perf_counter() - start
    startup_seconds = sum(v for k, v in startup.items() if k != "warmup_engine_sessions")
    sr = adapter.sampling_rate
    # 4. Write clips, plots and the record of what made them.
    with atomic_dir(out, force=force) as tmp:
        write_clips(tmp, waves, sr)
        if cfg.plot:
            for i, (w, p) in enumerate(zip(waves, prompts)):
                spectrogram_png(w, sr, tmp / f"{i:04d}.png", title=f"{p} (seed {seeds[i]})")
        write_json(tmp / "prompts.json", [
            {"file": f"{i:04d}.wav", "prompt": p, "seed": s, **({"plot": f"{i:04d}.png"} if cfg.plot else {})}
            for i, (p, s) in enumerate(zip(prompts, seeds))
        ])
        write_json(tmp / "generate.json", {
            "config": to_dict(cfg),
            "model": adapter.model_id,
            "engine": engine_info,
            "sampling_rate": sr,
            "clips": len(waves),
            "samples_per_clip": [int(len(w)) for w in waves],
            "seconds": round(wall, 4),
            "seconds_per_clip": round(wall / len(waves), 4),
            "batch_seconds": batch_seconds,
            # Paid once per process, apart from the per-clip time: model load, engine sessions,
            # warm-up (of which engine session creation inside it).
            "startup_seconds": round(startup_seconds, 4),
            "startup": {k: round(v, 4) for k, v in startup.items()},
            "warmup_steps": WARMUP_STEPS if "warmup" in startup else 0,
        })
    logger.info("generated %d clip(s) in %.1f s (%.3f s per clip) -> %s; start-up %.1f s (%s)", len(waves), wall,
                wall / len(waves), out, startup_seconds, ", ".join(f"{k.replace('_', ' ')} {v:.1f} s"
                                                                   for k, v in startup.items()))
    return [Path(out) / f"{i:04d}.wav" for i in range(len(prompts))]
