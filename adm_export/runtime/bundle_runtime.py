"""``BundleRuntime``: text-to-audio from a bundle with ONNX Runtime, numpy and ``tokenizers`` alone.

Sampling is the pipelines' own, in numpy: prompt -> conditioning (:mod:`.text`), initial noise
from each request's seed, the scheduler's steps (:mod:`.scheduler`) with classifier-free guidance
(``uncond + g * (cond - uncond)``, the unconditional rows first in the U-Net batch as in the
pipelines), the VAE decoder on ``latents / scaling_factor``, the vocoder, the waveform cut to the
requested length. Nothing here imports torch, diffusers or transformers (a test runs it with
those imports blocked).

Batching: requests with equal :meth:`BundleRuntime.batch_key` (latent length, steps, guidance
on/off) share one U-Net batch; each keeps its own guidance scale, prompt and seed, so a clip does
not depend on who it was batched with (up to the float rounding of a different batch size).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from adm_export.artifacts import read_manifest
from adm_export.errors import InvalidInputError
from adm_export.runtime import layout
from adm_export.runtime.scheduler import Scheduler
from adm_export.runtime.sessions import OnnxModel, UNetRunner
from adm_export.runtime.text import CONDITIONERS
from adm_export.runtime.types import GenerationRequest, RuntimeOptions

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SampleResult:
    """What :meth:`BundleRuntime.sample` returns: per request, final latents and waveform (None if cancelled)."""

    latents: list
    waveforms: list


class BundleRuntime:
    """A loaded bundle, ready to generate.

    Args:
        bundle_dir: Folder written by ``adm-export bundle``.
        options: Device, threads, CUDA graphs and the request limits.

    Raises:
        ArtifactNotFoundError / ManifestMismatchError: Not a bundle, or a file missing or changed.
        InvalidInputError: An option the bundle cannot honour (e.g. a CUDA-only U-Net on the CPU).
        MissingDependencyError: ``device="cuda"`` without ONNX Runtime's CUDA provider.
    """

    def __init__(self, bundle_dir: str | Path, options: RuntimeOptions | None = None):
        self.folder = Path(bundle_dir)
        self.options = options or RuntimeOptions()
        start = time.perf_counter()
        self.manifest = read_manifest(self.folder, layout.STAGE, "bundle", verify_hashes=self.options.verify_hashes)
        self.config = json.loads((self.folder / layout.CONFIG_FILE).read_text())
        self.family = self.config["family"]
        self.audio = self.config["audio"]
        sched = self.config["scheduler"]
        self.scheduler = Scheduler(sched["class_name"], json.loads((self.folder / sched["config"]).read_text()))
        unet = self.config["unet"]
        dims = {name: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
                for name, shape in unet["inputs"].items()}
        try:
            self.unet = UNetRunner(self.folder / unet["file"], self.options.ort_options("unet"), dims)
        except Exception as exc:
            cuda_only = unet.get("built_for") == "cuda" and self.options.device == "cpu"
            if cuda_only and "onnxruntime" in type(exc).__module__:
                raise InvalidInputError(
                    f"bundle {str(self.folder)!r}: its U-Net engine was built for cuda and does not load on the CPU "
                    f"({str(exc).splitlines()[0][:160]}); use device='cuda' or bundle a build made with --device cpu"
                ) from exc
            raise
        opts = self.options.ort_options("component")
        components = self.config["components"]
        self.vae_decoder = OnnxModel(self.folder / components["vae_decoder"], opts)
        self.vocoder = OnnxModel(self.folder / components["vocoder"], opts)
        self.conditioner = CONDITIONERS[self.family](self.folder, self.config,
                                                     lambda name: OnnxModel(self.folder / components[name], opts))
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self.load_seconds = time.perf_counter() - start
        logger.info("bundle runtime: %s (%s) loaded on %s in %.1f s", self.model_id, self.family,
                    self.options.device, self.load_seconds)

    # -- what the model allows --------------------------------------------------------------------

    @property
    def sampling_rate(self) -> int:
        return int(self.audio["sampling_rate"])

    @property
    def model_id(self) -> str:
        return str(self.config["model_id"])

    def _fixed(self, axis_name: str) -> int | None:
        for name, shape in self.config["unet"]["inputs"].items():
            if axis_name in shape:
                return self.unet.fixed_dim(name, shape.index(axis_name))
        return None

    @property
    def limits(self) -> dict:
        """``min_seconds``, ``max_seconds``, ``max_steps``, ``max_prompt_chars``, ``max_batch``.

        Seconds: from one multiple of the U-Net's latent length (shorter clips are cut from that)
        to ``RuntimeOptions.max_seconds`` or the bundle's ``--max-seconds``; an engine with a fixed
        latent length allows exactly that length. Batch: ``RuntimeOptions.max_batch``, or half a
        fixed engine batch (guidance doubles it).
        """
        fps = float(self.audio["latent_frames_per_second"])
        fixed_frames = self._fixed("frames")
        max_seconds = self.options.max_seconds or float(self.audio["max_seconds"])
        min_seconds = int(self.audio["frame_multiple"]) / fps
        if fixed_frames is not None:
            max_seconds = fixed_frames / fps
        fixed_batch = self._fixed("batch")
        max_batch = self.options.max_batch if fixed_batch is None else max(1, fixed_batch // 2)
        max_steps = min(self.options.max_steps or self.scheduler.num_train_timesteps,
                        self.scheduler.num_train_timesteps)
        return {"min_seconds": round(min_seconds, 6), "max_seconds": round(max_seconds, 6), "max_steps": max_steps,
                "max_prompt_chars": self.options.max_prompt_chars, "max_batch": max_batch}

    def latent_frames(self, seconds: float) -> int:
        """Latent frames sampled for ``seconds``: the fewest multiples of the U-Net's frame multiple that cover it."""
        fixed = self._fixed("frames")
        if fixed is not None:
            return fixed
        m = int(self.audio["frame_multiple"])
        frames = math.ceil(round(float(seconds) * float(self.audio["latent_frames_per_second"]), 6))
        return max(m, -(-frames // m) * m)

    def latent_shape(self, seconds: float) -> tuple[int, ...]:
        """Shape of one request's latents (without batch)."""
        frames = self.latent_frames(seconds)
        return tuple(frames if d is None else int(d) for d in self.audio["latent_shape"])

    def validate(self, req: GenerationRequest) -> None:
        """Raise :class:`InvalidInputError` (one line naming the bad value and the range) for a bad request."""
        lim = self.limits
        prompt = req.prompt
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError(f"invalid prompt {prompt!r}: give some text, e.g. 'a dog barks'")
        if len(prompt) > lim["max_prompt_chars"]:
            raise InvalidInputError(f"invalid prompt: {len(prompt)} characters, at most {lim['max_prompt_chars']}")
        seconds = req.seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or not lim["min_seconds"] <= seconds <= lim["max_seconds"]:
            raise InvalidInputError(f"invalid seconds {seconds!r}: must be between {lim['min_seconds']:g} and "
                                    f"{lim['max_seconds']:g}")
        steps = req.steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= lim["max_steps"]:
            raise InvalidInputError(f"invalid steps {steps!r}: must be an integer between 1 and {lim['max_steps']}")
        g = req.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise InvalidInputError(f"invalid guidance_scale {g!r}: must be a finite number >= 0 (<= 1: no guidance)")
        seed = req.seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 64:
            raise InvalidInputError(f"invalid seed {seed!r}: must be an integer between 0 and 2**64 - 1")
        self.conditioner.check(prompt)

    def batch_key(self, req: GenerationRequest):
        """Requests with equal keys can be sampled in one U-Net batch: (latent frames, steps, guidance on)."""
        return self.latent_frames(req.seconds), int(req.steps), bool(req.guidance_scale > 1.0)

    # -- generation -----------------------------------------------------------------------------

    def initial_noise(self, req: GenerationRequest) -> tuple[np.ndarray, np.random.Generator]:
        """The request's initial latents and the generator that continues its noise stream (DDPM steps)."""
        rng = np.random.Generator(np.random.PCG64(int(req.seed)))
        return rng.standard_normal(self.latent_shape(req.seconds), dtype=np.float32), rng

    def generate(self, reqs: Sequence[GenerationRequest],
                 cancelled: Callable[[int], bool] | None = None) -> list[np.ndarray | None]:
        """One float32 mono waveform per request (None where ``cancelled(i)`` became true).

        Args:
            reqs: Requests with one :meth:`batch_key`, at most ``limits["max_batch"]``.
            cancelled: Polled between steps with the request's index; a cancelled request leaves
                the batch and the others continue.

        Raises:
            InvalidInputError: A bad request, mixed batch keys, or too many requests.
        """
        noise, rngs = zip(*(self.initial_noise(r) for r in self._check_batch(reqs))) if reqs else ((), ())
        return self.sample(reqs, list(noise), list(rngs), cancelled).waveforms

    def _check_batch(self, reqs: Sequence[GenerationRequest]) -> Sequence[GenerationRequest]:
        for r in reqs:
            self.validate(r)
        if len({self.batch_key(r) for r in reqs}) > 1:
            raise InvalidInputError("requests of one generate() call must share batch_key (length, steps, guidance on)")
        if len(reqs) > self.limits["max_batch"]:
            raise InvalidInputError(f"{len(reqs)} requests in one batch, at most {self.limits['max_batch']}")
        return reqs

    def conditioning(self, prompt: str, guidance: bool) -> tuple[dict, dict | None]:
        """The denoiser's conditioning rows of one prompt (cached, LRU)."""
        key = (prompt, guidance)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = self.conditioner(prompt, guidance)
        if self.options.text_cache_size:
            with self._cache_lock:
                self._cache[key] = value
                while len(self._cache) > self.options.text_cache_size:
                    self._cache.popitem(last=False)
        return value

    def sample(self, reqs: Sequence[GenerationRequest], initial_noise: Sequence[np.ndarray],
               step_noise: Sequence | None = None, cancelled: Callable[[int], bool] | None = None) -> SampleResult:
        """Sample a batch from given initial latents: the core of :meth:`generate`, open for tests.

        Args:
            reqs: The requests (validated by the caller; one batch key).
            initial_noise: Per request, its initial latents (:meth:`latent_shape`).
            step_noise: Per request, a source of DDPM's step noise with numpy's
                ``standard_normal(shape, dtype=...)`` (its ``numpy.random.Generator``); unused by DDIM.
            cancelled: As in :meth:`generate`.

        Returns:
            Final latents and waveforms per request (None for cancelled ones).
        """
        n = len(reqs)
        result = SampleResult([None] * n, [None] * n)
        if n == 0:
            return result
        with self._run_lock:  # one run at a time: the U-Net runner holds the run's conditioning
            self._sample(reqs, initial_noise, step_noise, cancelled, result)
        return result

    def _sample(self, reqs, initial_noise, step_noise, cancelled, result: SampleResult) -> None:
        guidance = reqs[0].guidance_scale > 1.0
        steps = int(reqs[0].steps)
        conds = [self.conditioning(r.prompt, guidance) for r in reqs]
        active = list(range(len(reqs)))
        lat = np.stack([np.asarray(x, dtype=np.float32) for x in initial_noise]) * np.float32(
            self.scheduler.init_noise_sigma)
        timesteps = self.scheduler.timesteps(steps)
        fixed_batch = self._fixed("batch")
        changed = True
        for i, t in enumerate(timesteps):
            if cancelled is not None:
                keep = [k for k, j in enumerate(active) if not cancelled(j)]
                if len(keep) < len(active):
                    active, lat, changed = [active[k] for k in keep], lat[keep], True
            if not active:
                return
            if changed:
                rows = [conds[j][0] for j in active]
                if guidance:
                    rows = [conds[j][1] for j in active] + rows  # unconditional rows first, as the pipelines
                constants = {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}
                batch = len(rows)
                if fixed_batch is not None:
                    constants = {k: _pad_batch(v, fixed_batch) for k, v in constants.items()}
                self.unet.set_constants(constants)
                scales = np.asarray([reqs[j].guidance_scale for j in active], np.float32).reshape(-1, 1, 1, 1)
                changed = False
            x = np.concatenate([lat, lat]) if guidance else lat
            tt = np.full((x.shape[0],), float(t), dtype=np.float32)
            if fixed_batch is not None:
                x, tt = _pad_batch(x, fixed_batch), _pad_batch(tt, fixed_batch)
            out = self.unet(sample=x, timestep=tt)[:batch]
            if guidance:
                uncond, cond = out[: len(active)], out[len(active):]
                out = uncond + scales * (cond - uncond)
            noise = None
            if self.scheduler.stochastic and int(t) > 0:
                noise = np.stack([step_noise[j].standard_normal(lat.shape[1:], dtype=np.float32) for j in active])
            lat = self.scheduler.step(out, timesteps, i, lat, noise)
        if cancelled is not None:
            keep = [k for k, j in enumerate(active) if not cancelled(j)]
            active, lat = [active[k] for k in keep], lat[keep]
        if not active:
            return
        wavs = self.decode(lat)
        for k, j in enumerate(active):
            n_samples = int(round(float(reqs[j].seconds) * self.sampling_rate))
            result.latents[j] = lat[k]
            result.waveforms[j] = np.ascontiguousarray(wavs[k, :n_samples], dtype=np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents ``(batch, ...)`` -> waveforms ``(batch, samples)``: VAE decoder then vocoder."""
        mel = self.vae_decoder(latents=latents / np.float32(self.audio["vae_scaling_factor"]))[0]
        return self.vocoder(mel=mel)[0].astype(np.float32, copy=False)

    def warmup(self, seconds: float | None = None, steps: int = 2) -> None:
        """One short generation through every engine (with guidance), so the first request pays no start-up."""
        seconds = seconds if seconds is not None else self.limits["min_seconds"]
        self.generate([GenerationRequest(prompt="warm-up", seconds=seconds, steps=steps, guidance_scale=2.0, seed=0)])


def _pad_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """Zero rows up to a fixed engine batch (their outputs are dropped)."""
    if x.shape[0] >= batch:
        return x
    return np.concatenate([x, np.zeros((batch - x.shape[0], *x.shape[1:]), x.dtype)])
