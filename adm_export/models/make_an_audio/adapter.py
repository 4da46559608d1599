"""The model adapter of :class:`~adm_export.models.make_an_audio.pipeline.MakeAnAudioPipeline`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adm_export.models.base import ModelAdapter, TensorSpec
from adm_export.models.conditioning import TextCondSpec, call_arg, timestep_rows
from adm_export.models.make_an_audio.config import FRAME_MULTIPLE, TEXT_LEN


class MakeAnAudioAdapter(ModelAdapter):
    """Adapter of :class:`~adm_export.models.make_an_audio.pipeline.MakeAnAudioPipeline`.

    Denoiser inputs: ``sample`` (B, 4, 10, frames): the time axis is the *last* one here (the
    LDM audio models lay out the latent as mel x time), ``timestep``, ``context`` (B, 77, 1024).
    """

    family = "make_an_audio"

    @property
    def denoiser(self):
        return self.pipeline.unet

    def denoiser_spec(self) -> TextCondSpec:
        cfg = self.pipeline.unet.config
        height = self.pipeline.config.mel_bins // self.pipeline.vae_scale_factor
        return TextCondSpec(
            inputs=(
                TensorSpec("sample", ("batch", cfg["in_channels"], height, "frames")),
                TensorSpec("timestep", ("batch",)),
                TensorSpec("context", ("batch", TEXT_LEN, cfg["context_dim"])),
            ),
            outputs=(TensorSpec("noise_pred", ("batch", cfg["out_channels"], height, "frames")),),
            latent_frames_per_second=self.pipeline.latent_frames_per_second,
            frame_multiple=max(FRAME_MULTIPLE, 2 ** (len(cfg["channel_mult"]) - 1)),
        )

    def inputs_from_call(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        sample = call_arg(args, kwargs, "x", 0)
        return {
            "sample": sample,
            "timestep": timestep_rows(call_arg(args, kwargs, "timesteps", 1), sample),
            "context": call_arg(args, kwargs, "context", 2),
        }

    def export_module(self, denoiser=None):
        from adm_export.models.make_an_audio.pipeline import MakeAnAudioDenoiser

        return MakeAnAudioDenoiser(denoiser if denoiser is not None else self.denoiser)

    def wrap_output(self, output):
        return output

    def set_denoiser(self, module) -> None:
        object.__setattr__(self.pipeline, "unet", module)

    @property
    def sampling_rate(self) -> int:
        return self.pipeline.sampling_rate

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, audio_seconds: float,
                 guidance_scale: float) -> list:
        import torch

        pipe = self.pipeline
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        shape = (pipe.unet.config["in_channels"], pipe.config.mel_bins // pipe.vae_scale_factor,
                 pipe.latent_frames(audio_seconds))
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(pipe.device)
        with torch.inference_mode():
            out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                       audio_length_in_s=audio_seconds, latents=latents, generator=generators, output_type="np")
        return [a.astype("float32") for a in out.audios]
