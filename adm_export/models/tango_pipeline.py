"""TANGO's sampler as a diffusers pipeline: :class:`TangoPipeline` (there is no diffusers one).

Its own module because it subclasses diffusers' ``DiffusionPipeline``: :mod:`adm_export.models.tango`
imports it on first use, so that importing the adapters imports neither torch nor diffusers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import AudioPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from adm_export.models.conditioning import DEFAULT_TEXT_LEN, pad_tokens
from adm_export.models.sampling import sample_with_guidance


class TangoPipeline(DiffusionPipeline):
    """TANGO's sampler: T5 text states and mask, CFG against the empty prompt, DDPM (or any
    diffusers scheduler), VAE decode, HiFi-GAN.

    Args:
        vae: ``AutoencoderKL`` (AudioLDM's mel VAE; ``scaling_factor`` = TANGO's ``scale_factor``).
        text_encoder: ``T5EncoderModel`` (FLAN-T5).
        tokenizer: Its tokenizer.
        unet: ``UNet2DConditionModel``.
        scheduler: ``DDPMScheduler`` (TANGO's) or another diffusers scheduler.
        vocoder: ``SpeechT5HifiGan``.
        text_len: Fixed text length (tokens) the U-Net sees.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae->vocoder"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, vocoder, text_len: int = DEFAULT_TEXT_LEN):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, vocoder=vocoder)
        self.register_to_config(text_len=int(text_len))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def text_len(self) -> int:
        return int(self.config.text_len)

    def encode_prompt(self, prompts: list[str], guidance: bool):
        """T5 states and float mask, padded to ``text_len``; with guidance the empty-prompt rows first.

        TANGO truncates at the tokenizer's maximum and masks padding; T5's outputs at valid
        positions do not depend on how much padding follows (masked attention, relative
        positions), and the U-Net masks the rest, so padding to ``text_len`` changes nothing.
        """
        texts = ([""] * len(prompts) if guidance else []) + list(prompts)
        n = self.text_len
        batch = self.tokenizer(texts, max_length=n, padding="max_length", truncation=True, return_tensors="pt")
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        states = self.text_encoder(input_ids=ids, attention_mask=mask)[0]
        return pad_tokens(states, n), pad_tokens(mask.to(states.dtype), n)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 100, guidance_scale: float = 3.0,
                 audio_length_in_s: float = 10.24, latents=None, generator=None, output_type: str = "np"):
        """Generate audio.

        Args:
            prompt: Prompt(s).
            num_inference_steps: Sampler steps (TANGO: 100-200 with DDPM).
            guidance_scale: Classifier-free guidance weight (TANGO: 3); <= 1 disables it.
            audio_length_in_s: Length; rounded up to whole latent frames of the U-Net.
            latents: Initial noise ``(B, C, frames, mel/scale)``; drawn from ``generator`` if None.
            generator: ``torch.Generator`` or one per prompt (also drives DDPM's step noise).
            output_type: ``"np"``, ``"pt"`` or ``"latent"``.

        Returns:
            ``AudioPipelineOutput(audios=...)``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        guidance = guidance_scale > 1.0
        states, mask = self.encode_prompt(prompts, guidance)
        frames = self.latent_frames(audio_length_in_s)
        shape = (len(prompts), self.unet.config.in_channels, frames,
                 self.vocoder.config.model_in_dim // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=states.dtype)
        latents = sample_with_guidance(
            self, latents, num_inference_steps, guidance_scale,
            lambda x, t: self.unet(x, t, encoder_hidden_states=states, encoder_attention_mask=mask,
                                   return_dict=False)[0], generator)
        if output_type == "latent":
            return AudioPipelineOutput(audios=latents)
        mel = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        audio = self.vocoder(mel.squeeze(1)).float().cpu()
        audio = audio[:, : int(audio_length_in_s * self.vocoder.config.sampling_rate)]
        return AudioPipelineOutput(audios=audio.numpy() if output_type == "np" else audio)

    def latent_frames(self, seconds: float) -> int:
        """Latent frames for ``seconds``: mel frames over the VAE factor, rounded up to a multiple
        of the U-Net's downsampling (static engine shapes; the audio is trimmed afterwards)."""
        hop = float(np.prod(self.vocoder.config.upsample_rates))
        mel_frames = int(seconds * self.vocoder.config.sampling_rate / hop)
        multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return max(multiple, math.ceil(mel_frames / self.vae_scale_factor / multiple) * multiple)

