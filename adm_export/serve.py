"""``adm-export generate``: prompts -> WAV files, the denoiser served by an engine (or full precision)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from adm_export.artifacts import atomic_dir, write_json
from adm_export.config import DEFAULT_MODEL
from adm_export.errors import InvalidInputError
from adm_export.progress import progress

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Settings of ``generate``.

    Attributes:
        model: Model id (must match the engine's model).
        engine_dir: Engines folder; ``None`` runs the full-precision pipeline.
        prompts: Prompts given on the command line.
        prompts_file: File with one prompt per line.
        audio_seconds: Clip length.
        steps: Sampler steps.
        guidance_scale: Classifier-free guidance scale.
        seed: Seed of the first clip (clip i uses seed + i).
        batch_size: Prompts per pipeline call.
        device: ``cpu`` or ``cuda``.
    """

    model: str = DEFAULT_MODEL
    engine_dir: str | None = None
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    audio_seconds: float = 2.56
    steps: int = 10
    guidance_scale: float = 2.5
    seed: int = 0
    batch_size: int = 4
    device: str = "cpu"

    def all_prompts(self) -> list[str]:
        from adm_export.calibration.prompts import load_captions

        prompts = list(self.prompts)
        if self.prompts_file:
            try:
                prompts += load_captions(self.prompts_file)
            except InvalidInputError as exc:
                raise InvalidInputError(str(exc).replace("--captions", "--prompts")) from None
        if not prompts:
            raise InvalidInputError("no prompt given; pass --prompt TEXT (repeatable) or --prompts FILE")
        if self.audio_seconds <= 0:
            raise InvalidInputError(f"invalid --seconds {self.audio_seconds!r}: must be > 0")
        return prompts


def generate(cfg: GenerateConfig, out: str | Path, force: bool = False) -> list[Path]:
    """Generate one WAV per prompt into ``out`` (plus ``prompts.json`` naming each file's prompt and seed)."""
    import contextlib

    from adm_export.engines.stage import load_ort_denoiser
    from adm_export.eval.harness import write_clips
    from adm_export.models import load_model

    prompts = cfg.all_prompts()
    adapter = load_model(cfg.model, cfg.device)
    ctx = contextlib.nullcontext()
    if cfg.engine_dir:
        denoiser, _ = load_ort_denoiser(cfg.engine_dir, adapter, cfg.device)
        ctx = adapter.using_denoiser(denoiser)
    seeds = [cfg.seed + i for i in range(len(prompts))]
    waves = []
    with ctx:
        batches = [range(i, min(i + cfg.batch_size, len(prompts))) for i in range(0, len(prompts), cfg.batch_size)]
        for b in progress(batches, desc="generate", unit="batch"):
            waves += adapter.generate([prompts[i] for i in b], [seeds[i] for i in b], cfg.steps, cfg.audio_seconds,
                                      cfg.guidance_scale)
    with atomic_dir(out, force=force) as tmp:
        write_clips(tmp, waves, adapter.sampling_rate)
        write_json(tmp / "prompts.json", [
            {"file": f"{i:04d}.wav", "prompt": p, "seed": s} for i, (p, s) in enumerate(zip(prompts, seeds))
        ])
    return [Path(out) / f"{i:04d}.wav" for i in range(len(prompts))]
