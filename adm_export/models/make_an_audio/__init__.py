"""Make-An-Audio: its latent-diffusion U-Net, CLAP text encoder, BigVGAN vocoder, sampler and loaders.

Make-An-Audio (Text-to-Audio/Make-An-Audio) is a latent-diffusion model in the original LDM code
base, not in diffusers. One module per part:

* :mod:`.config`: the published configuration and :class:`MakeAnAudioConfig` (``txt2audio_args.yaml``).
* :mod:`.unet`: the denoiser ``UNetModel`` (``input_blocks`` / ``middle_block`` / ``output_blocks``
  of ``TimestepEmbedSequential``, ResBlocks and SpatialTransformers with cross-attention to CLAP
  text states), with the published parameter names.
* :mod:`.text`: ``ClapTextEncoder`` (transformers' ``BertModel`` + the CLAP projection, same names).
* :mod:`.vocoder`: the BigVGAN vocoder through NVIDIA's ``bigvgan`` package (``useful_ckpts/bigvgan``).
* :mod:`.pipeline`: ``MakeAnAudioPipeline`` (DDIM, CFG against the empty prompt, VAE, vocoder).
* :mod:`.adapter`: ``MakeAnAudioAdapter``. Quantization, export and engines concern only the U-Net.
* :mod:`.tiny`: ``tiny-make-an-audio`` (toy widths, seeded weights, a tiny BigVGAN).
* :mod:`.checkpoint`: ``maa1_full.ckpt`` + vocoder folder -> pipeline, the ``--model DIR`` folder
  layout, and writing both back. The VAE (``first_stage_model.*``) maps onto diffusers'
  ``AutoencoderKL`` through :mod:`adm_export.models.ldm_vae`.

Names are exported lazily: importing this package does not import torch.
"""

from __future__ import annotations

import importlib

from adm_export.models.make_an_audio.config import (  # noqa: F401  (re-exported)
    CLAP_TEXT_MODEL,
    FRAME_MULTIPLE,
    HOP_LENGTH,
    MAKE_AN_AUDIO_SCHEDULER_CONFIG,
    MAKE_AN_AUDIO_UNET_CONFIG,
    MAKE_AN_AUDIO_VAE_DDCONFIG,
    MEL_BINS,
    SAMPLING_RATE,
    TEXT_LEN,
    MakeAnAudioConfig,
)

_LAZY = {
    "MakeAnAudioAdapter": "adapter",
    "UNetModel": "unet",
    "ClapTextEncoder": "text",
    "MakeAnAudioPipeline": "pipeline",
    "MakeAnAudioDenoiser": "pipeline",
    "BigVGANVocoder": "vocoder",
    "MAKE_AN_AUDIO_BIGVGAN_CONFIG": "vocoder",
    "build_bigvgan": "vocoder",
    "load_bigvgan_folder": "vocoder",
    "save_bigvgan_folder": "vocoder",
    "load_make_an_audio_checkpoint": "checkpoint",
    "load_make_an_audio_folder": "checkpoint",
    "is_make_an_audio_folder": "checkpoint",
    "make_an_audio_state_dict": "checkpoint",
    "save_make_an_audio_folder": "checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MakeAnAudioConfig", *_LAZY]
