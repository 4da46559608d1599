"""Make-An-Audio's sampler as a diffusers ``DiffusionPipeline``, and the U-Net's export wrapper."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import AudioPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from adm_export.models.make_an_audio.config import FRAME_MULTIPLE, HOP_LENGTH, MEL_BINS, SAMPLING_RATE, TEXT_LEN
from adm_export.models.sampling import sample_with_guidance


class MakeAnAudioPipeline(DiffusionPipeline):
    """Make-An-Audio's sampler: CLAP text states, CFG against the empty prompt, DDIM, VAE, vocoder.

    Args:
        unet: :class:`~adm_export.models.make_an_audio.unet.UNetModel`.
        vae: diffusers ``AutoencoderKL`` (``scaling_factor`` = the checkpoint's ``scale_factor``).
        text_encoder: :class:`~adm_export.models.make_an_audio.text.ClapTextEncoder`.
        tokenizer: BERT tokenizer (padded to 77 tokens).
        scheduler: DDIM on the LDM schedule.
        vocoder: Module mapping mel ``(B, T, mel_bins)`` to waveform ``(B, samples)``
            (:class:`~adm_export.models.make_an_audio.vocoder.BigVGANVocoder`).
        sampling_rate, hop_length, mel_bins: The vocoder's audio format.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, vocoder, sampling_rate: int = SAMPLING_RATE,
                 hop_length: int = HOP_LENGTH, mel_bins: int = MEL_BINS):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, vocoder=vocoder)
        self.register_to_config(sampling_rate=int(sampling_rate), hop_length=int(hop_length),
                                mel_bins=int(mel_bins))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def sampling_rate(self) -> int:
        return int(self.config.sampling_rate)

    @property
    def latent_frames_per_second(self) -> float:
        return self.config.sampling_rate / self.config.hop_length / self.vae_scale_factor

    def latent_frames(self, seconds: float) -> int:
        """``gen_wav.py``'s rule: ``int(seconds * fps)`` rounded up to a multiple of 4."""
        frames = int(seconds * self.latent_frames_per_second)
        return max(FRAME_MULTIPLE, -(-frames // FRAME_MULTIPLE) * FRAME_MULTIPLE)

    def encode_prompt(self, prompts: list[str], guidance: bool):
        texts = ([""] * len(prompts) if guidance else []) + list(prompts)
        ids = self.tokenizer(texts, truncation=True, max_length=TEXT_LEN, padding="max_length",
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 100, guidance_scale: float = 3.0,
                 audio_length_in_s: float = 10.0, latents=None, generator=None, output_type: str = "np"):
        """Generate audio (``output_type``: ``np``, ``pt``, ``mel`` or ``latent``)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        guidance = guidance_scale > 1.0
        context = self.encode_prompt(prompts, guidance)
        shape = (len(prompts), self.unet.config.in_channels, self.config.mel_bins // self.vae_scale_factor,
                 self.latent_frames(audio_length_in_s))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=context.dtype)
        latents = sample_with_guidance(
            self, latents, num_inference_steps, guidance_scale,
            lambda x, t: self.unet(x, t.reshape(1).expand(x.shape[0]).to(self.device), context=context), generator)
        if output_type == "latent":
            return AudioPipelineOutput(audios=latents)
        mel = self.vae.decode(latents / self.vae.config.scaling_factor).sample  # (B, 1, mel, T)
        if output_type == "mel":
            return AudioPipelineOutput(audios=mel)
        audio = self.vocoder(mel.squeeze(1).transpose(1, 2)).float().cpu()
        audio = audio[:, : int(audio_length_in_s * self.sampling_rate)]
        return AudioPipelineOutput(audios=audio.numpy() if output_type == "np" else audio)


class MakeAnAudioDenoiser(torch.nn.Module):
    """``(sample, timestep, context) -> noise``; the U-Net held as ``unet`` like every adapter's
    export module (the export names ONNX nodes by module path under that attribute)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return self.unet(sample, timestep, context)
