"""``tiny-make-an-audio``: Make-An-Audio's architecture at toy width, seeded random weights.

Registered as an embedded model in :mod:`adm_export.models.embedded`. Every part runs the code a
published checkpoint runs: this package's U-Net and CLAP text tower, the LDM VAE through the same
LDM -> diffusers mapping, and a BigVGAN built from config through NVIDIA's ``bigvgan`` package.
"""

from __future__ import annotations

from adm_export.models.make_an_audio.config import MAKE_AN_AUDIO_SCHEDULER_CONFIG, TEXT_LEN, MakeAnAudioConfig

# The VAE in the LDM config format (the loader's input), Make-An-Audio's layout (4 levels,
# attention at the two coarsest, 4 latent channels) at width 32.
TINY_MAKE_AN_AUDIO_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 624, "in_channels": 1, "out_ch": 1, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [78, 156], "dropout": 0.0,
}
# Make-An-Audio's U-Net layout (2 levels, transformers at both, GEGLU feed-forward, CLAP context)
# at 32 model channels, 1 ResBlock per level, 2 heads.
TINY_MAKE_AN_AUDIO_UNET_CONFIG = {
    "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1, 2],
    "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "transformer_depth": 1, "context_dim": 32,
}
# The BigVGAN (Make-An-Audio's args.yml keys): hop 4*4*4*4 = 256 at 16 kHz, 80 mels, SnakeBeta
# with log-scale parameters as published, 64 -> 4 channels, one AMP block per level.
TINY_MAKE_AN_AUDIO_BIGVGAN_CONFIG = {
    "resblock": "1", "num_mels": 80, "upsample_rates": [4, 4, 4, 4], "upsample_kernel_sizes": [8, 8, 8, 8],
    "upsample_initial_channel": 64, "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]],
    "activation": "snakebeta", "snake_logscale": True, "sampling_rate": 16000,
}


def tiny_make_an_audio_config() -> MakeAnAudioConfig:
    """``tiny-make-an-audio``'s architecture (what :func:`~adm_export.models.make_an_audio.checkpoint.
    save_make_an_audio_folder` writes as ``txt2audio_args.yaml``)."""
    return MakeAnAudioConfig(unet=dict(TINY_MAKE_AN_AUDIO_UNET_CONFIG),
                             vae_ddconfig=dict(TINY_MAKE_AN_AUDIO_VAE_DDCONFIG))


def build_tiny_make_an_audio(seed: int = 0):
    """Build the ``tiny-make-an-audio`` pipeline with seeded random weights.

    Make-An-Audio's U-Net (public parameter names), its LDM VAE layout, a BERT+projection CLAP text
    tower (local character tokenizer, 77 tokens, no mask), DDIM on the LDM schedule, and a BigVGAN
    vocoder (SnakeBeta, anti-aliased resampling) in Make-An-Audio's audio format (80 mels, hop 256,
    16 kHz).

    Returns:
        A :class:`~adm_export.models.make_an_audio.pipeline.MakeAnAudioPipeline` in float32 on the CPU.

    Raises:
        MissingDependencyError: NVIDIA's ``bigvgan`` is not installed.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import BertConfig

    from adm_export.models.conditioning import build_char_bert_tokenizer
    from adm_export.models.ldm_vae import vae_config_from_ldm
    from adm_export.models.make_an_audio.pipeline import MakeAnAudioPipeline
    from adm_export.models.make_an_audio.text import ClapTextEncoder
    from adm_export.models.make_an_audio.unet import UNetModel
    from adm_export.models.make_an_audio.vocoder import build_bigvgan

    tokenizer = build_char_bert_tokenizer(model_max_length=TEXT_LEN)
    torch.manual_seed(seed)
    unet = UNetModel(**TINY_MAKE_AN_AUDIO_UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config_from_ldm(TINY_MAKE_AN_AUDIO_VAE_DDCONFIG, 4, 1.0))
    torch.manual_seed(seed + 2)
    text_encoder = ClapTextEncoder(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64,
                                              max_position_embeddings=TEXT_LEN + 3), 32)
    torch.manual_seed(seed + 3)
    vocoder = build_bigvgan(TINY_MAKE_AN_AUDIO_BIGVGAN_CONFIG, source="tiny-make-an-audio")
    for module in (unet, vae, text_encoder, vocoder):
        module.eval()
    return MakeAnAudioPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                               scheduler=DDIMScheduler(**MAKE_AN_AUDIO_SCHEDULER_CONFIG), vocoder=vocoder)
