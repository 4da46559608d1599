"""The classifier-free-guidance sampling loop shared by the pipelines written here (TANGO, Make-An-Audio).

diffusers' own AudioLDM/AudioLDM2 pipelines carry their loops; the two families that have no
diffusers pipeline differ only in how their U-Net is called, so the loop is one function and the
call is the argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sample_with_guidance(pipe, latents: torch.Tensor, num_inference_steps: int, guidance_scale: float,
                         eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], generator=None) -> torch.Tensor:
    """Run ``pipe.scheduler`` from initial noise to final latents, with classifier-free guidance.

    The rows of the U-Net's conditioning are [unconditional..., conditional...] when
    ``guidance_scale > 1`` (as the pipelines' ``encode_prompt`` builds them), so the latents are
    doubled in that order and the two halves of the prediction combined as diffusers does.

    Args:
        pipe: A ``DiffusionPipeline`` (its ``scheduler``, ``device`` and ``progress_bar``).
        latents: Initial noise, before ``init_noise_sigma``.
        num_inference_steps: Sampler steps.
        guidance_scale: Guidance weight; <= 1 runs the conditional rows only.
        eps: ``(model input, timestep) -> noise prediction`` (the family's U-Net call).
        generator: Drives the step noise of stochastic schedulers (DDPM).

    Returns:
        The final latents.
    """
    guidance = guidance_scale > 1.0
    latents = latents.to(pipe.device) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(num_inference_steps, device=pipe.device)
    for t in pipe.progress_bar(pipe.scheduler.timesteps):
        x = torch.cat([latents] * 2) if guidance else latents
        noise = eps(pipe.scheduler.scale_model_input(x, t), t)
        if guidance:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        latents = pipe.scheduler.step(noise, t, latents, generator=generator).prev_sample
    return latents
