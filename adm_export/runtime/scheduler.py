"""DDIM and DDPM in numpy, read from a diffusers ``scheduler_config.json``.

What the families' pipelines use: AudioLDM, AudioLDM2 and Make-An-Audio sample with
``DDIMScheduler`` (eta 0, deterministic), TANGO with ``DDPMScheduler`` (v-prediction, fixed-small
variance, fresh noise at every step). The arithmetic follows diffusers' ``step`` functions line by
line in float32, so a runtime step equals the pipeline's up to float rounding; options the
families do not use and that change the result (thresholding, learned variances, eta > 0) are
refused at load time rather than silently ignored.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from adm_export.errors import InvalidInputError

SUPPORTED = ("DDIMScheduler", "DDPMScheduler")
_SPACINGS = ("leading", "trailing", "linspace")
_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _betas(cfg: dict) -> np.ndarray:
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float32)
    schedule = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    if schedule == "linear":
        return np.linspace(start, end, n, dtype=np.float32)
    if schedule == "scaled_linear":
        # diffusers: torch.linspace(start ** 0.5, end ** 0.5, n, dtype=float32) ** 2
        return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.asarray([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                          dtype=np.float32)
    raise InvalidInputError(f"bundle scheduler: beta_schedule {schedule!r} is not supported by the runtime "
                            f"(linear, scaled_linear, squaredcos_cap_v2)")


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' ``rescale_zero_terminal_snr`` (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


class Scheduler:
    """A diffusers DDIM (eta 0) or DDPM scheduler on numpy float32 latents.

    Args:
        class_name: ``DDIMScheduler`` or ``DDPMScheduler`` (the config's ``_class_name``).
        config: The scheduler config (diffusers keys; defaults as diffusers').

    Raises:
        InvalidInputError: Another scheduler, or an option the runtime does not implement.
    """

    def __init__(self, class_name: str, config: dict[str, Any]):
        if class_name not in SUPPORTED:
            raise InvalidInputError(f"bundle scheduler {class_name!r} is not supported by the runtime; "
                                    f"supported: {', '.join(SUPPORTED)} (re-bundle a model that uses one)")
        self.kind = "ddim" if class_name == "DDIMScheduler" else "ddpm"
        self.config = dict(config)
        cfg = self.config
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        self.spacing = cfg.get("timestep_spacing", "leading")
        self.steps_offset = int(cfg.get("steps_offset", 0))
        self.clip_sample = bool(cfg.get("clip_sample", True))
        self.clip_range = float(cfg.get("clip_sample_range", 1.0))
        self.variance_type = cfg.get("variance_type", "fixed_small")
        if self.prediction_type not in _PREDICTIONS:
            raise InvalidInputError(f"bundle scheduler: prediction_type {self.prediction_type!r} is not supported")
        if self.spacing not in _SPACINGS:
            raise InvalidInputError(f"bundle scheduler: timestep_spacing {self.spacing!r} is not supported")
        if cfg.get("thresholding"):
            raise InvalidInputError("bundle scheduler: thresholding is not supported by the runtime")
        if self.kind == "ddpm" and self.variance_type != "fixed_small":
            raise InvalidInputError(f"bundle scheduler: DDPM variance_type {self.variance_type!r} is not supported "
                                    f"(fixed_small)")
        betas = _betas(cfg)
        if cfg.get("rescale_betas_zero_snr"):
            betas = _rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
        if self.kind == "ddim":
            self.final_alpha_cumprod = np.float32(1.0) if cfg.get("set_alpha_to_one", True) \
                else self.alphas_cumprod[0]
        else:
            self.final_alpha_cumprod = np.float32(1.0)
        # Both schedulers start from unit-variance noise (diffusers' init_noise_sigma = 1).
        self.init_noise_sigma = 1.0

    @property
    def stochastic(self) -> bool:
        """DDPM adds fresh noise at every step but the last; DDIM with eta 0 does not."""
        return self.kind == "ddpm"

    def timesteps(self, steps: int) -> np.ndarray:
        """The timesteps of a ``steps``-step run, as diffusers' ``set_timesteps``."""
        n, T = int(steps), self.num_train_timesteps
        if not 1 <= n <= T:
            raise InvalidInputError(f"invalid steps {steps!r}: must be between 1 and {T}")
        if self.spacing == "linspace":
            return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        if self.spacing == "leading":
            return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + self.steps_offset
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1

    def step(self, model_output: np.ndarray, timesteps: np.ndarray, index: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """One denoising step from ``timesteps[index]``.

        Args:
            model_output: The (guided) denoiser output, float32, shape of ``sample``.
            timesteps: What :meth:`timesteps` returned for this run.
            index: Position of the current timestep in ``timesteps``.
            sample: The current latents.
            noise: DDPM only: standard normal noise of ``sample``'s shape (each batch row from its
                request's own generator); ignored at the last step, as diffusers does (t = 0 there).

        Returns:
            The previous (less noisy) latents, float32.
        """
        t = int(timesteps[index])
        ac = self.alphas_cumprod
        if self.kind == "ddim":
            prev_t = t - self.num_train_timesteps // len(timesteps)
        else:
            prev_t = int(timesteps[index + 1]) if index + 1 < len(timesteps) else -1
        a_t = ac[t]
        a_prev = ac[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = np.float32(1) - a_t
        x, eps = sample.astype(np.float32, copy=False), model_output.astype(np.float32, copy=False)
        sa, sb = a_t ** np.float32(0.5), b_t ** np.float32(0.5)
        if self.prediction_type == "epsilon":
            x0, pred_eps = (x - sb * eps) / sa, eps
        elif self.prediction_type == "sample":
            x0 = eps
            pred_eps = (x - sa * x0) / sb
        else:  # v_prediction
            x0, pred_eps = sa * x - sb * eps, sa * eps + sb * x
        # As diffusers: the clip changes x0 only; DDIM's direction keeps the unclipped epsilon.
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_range, self.clip_range)
        if self.kind == "ddim":  # eta = 0: no variance term
            return (a_prev ** np.float32(0.5) * x0 + (np.float32(1) - a_prev) ** np.float32(0.5) * pred_eps).astype(
                np.float32, copy=False)
        b_prev = np.float32(1) - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = np.float32(1) - cur_alpha
        prev = (a_prev ** np.float32(0.5) * cur_beta / b_t) * x0 + (cur_alpha ** np.float32(0.5) * b_prev / b_t) * x
        if t > 0:
            if noise is None:
                raise ValueError("DDPM step needs noise")
            variance = max(np.float32(b_prev / b_t * cur_beta), np.float32(1e-20))
            prev = prev + np.float32(variance) ** np.float32(0.5) * noise.astype(np.float32, copy=False)
        return prev.astype(np.float32, copy=False)
