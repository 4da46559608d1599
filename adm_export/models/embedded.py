"""Embedded models: complete pipelines built from config with seeded random weights.

They need nothing from the network, so the tests, CI and the README's demo run anywhere. Their
weights are random: they produce noise-like audio, and quality numbers measured on them say how
faithfully the quantized engine reproduces the full-precision model, not how good the audio is.

``tiny-audioldm`` has AudioLDM's real structure (class-label FiLM conditioning by L2-normalised
CLAP text embeddings, ``class_embeddings_concat``, 8-channel latent at a quarter of the mel
frames, 64 mel bins, hop 160 at 16 kHz, DDIM with AudioLDM's betas) at a width that runs the whole
build in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

SAMPLING_RATE = 16000
MEL_BINS = 64

# Tokens the byte-level tokenizer starts with; ids follow RoBERTa's convention (<s>=0, <pad>=1,
# </s>=2, <unk>=3) because CLAP's text encoder is a RoBERTa and takes pad_token_id=1.
_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def audioldm_s_unet_config() -> dict:
    """U-Net config of AudioLDM-S (widths 128/256/384/640, 2 layers per block, head dim 32)."""
    widths = (128, 256, 384, 640)
    return dict(
        sample_size=256,
        in_channels=8,
        out_channels=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=widths,
        layers_per_block=2,
        cross_attention_dim=widths,
        attention_head_dim=tuple(w // 32 for w in widths),
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=512,
        class_embeddings_concat=True,
    )


def tiny_unet_config() -> dict:
    """U-Net config of ``tiny-audioldm``: AudioLDM-S's structure (2 layers per block, head dim 32) at widths 64/128/128."""
    widths = (64, 128, 128)
    return dict(
        sample_size=64,
        in_channels=8,
        out_channels=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=widths,
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=widths,
        attention_head_dim=tuple(w // 32 for w in widths),
        # AudioLDM uses 4 x the first width (256 here); half of that keeps the FiLM conditioning
        # but stops the per-resnet time projections (kept in FP16) from being 20% of a tiny U-Net.
        time_embedding_dim=128,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=32,
        class_embeddings_concat=True,
    )


def build_byte_tokenizer(model_max_length: int = 256):
    """A RoBERTa-style byte-level BPE tokenizer with no merges, built locally (no download).

    Every printable ASCII character is its own token, so any caption tokenizes deterministically.
    CLAP's 77 BPE tokens hold about 77 words; at one token per character the tiny model needs
    256 tokens to see a whole augmented caption.
    """
    from transformers import RobertaTokenizer

    chars = sorted(set(string.printable) - set(string.whitespace) | {"\u0120"})  # \u0120: ByteLevel's space
    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        merges_file = Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n")
        return RobertaTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length)


def build_tiny_audioldm(seed: int = 0):
    """Build the ``tiny-audioldm`` pipeline with seeded random weights.

    Args:
        seed: Seed of every component's initialisation.

    Returns:
        A diffusers ``AudioLDMPipeline`` in float32 on the CPU.
    """
    import torch
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as dlogging
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

    tokenizer = build_byte_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
        sample_size=256,
    )
    torch.manual_seed(seed + 2)
    text_encoder = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        projection_dim=32,
        max_position_embeddings=tokenizer.model_max_length + 3,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ))
    torch.manual_seed(seed + 3)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=MEL_BINS,
        sampling_rate=SAMPLING_RATE,
        upsample_initial_channel=32,
        upsample_rates=[5, 4, 4, 2],  # product 160 = hop length: 100 mel frames per second
        upsample_kernel_sizes=[10, 8, 8, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    ))
    # transformers initialises HiFi-GAN convolutions with std 0.01, which through five layers gives
    # a waveform of ~1e-9; PyTorch's default (Kaiming-uniform) init keeps an audible signal, so
    # the embedders see more than silence.
    for m in vocoder.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            m.reset_parameters()
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # AudioLDMPipeline warns that it is deprecated on every build
    try:
        pipe = AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                scheduler=scheduler, vocoder=vocoder)
    finally:
        dlogging.set_verbosity(verbosity)
    for module in (unet, vae, text_encoder, vocoder):
        module.eval()
    return pipe


EMBEDDED = {
    "tiny-audioldm": ("audioldm", build_tiny_audioldm),
}
