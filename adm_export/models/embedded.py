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


def build_reference_audioldm(seed: int = 0):
    """Load ``reference-audioldm``: the small AudioLDM trained on the procedural corpus (issue 8).

    Trained weights shipped in ``adm_export/data/reference/audioldm`` (``seed`` is unused; kept for
    the builder signature). See ``adm_export/data/reference/README.md``.
    """
    from adm_export.models.reference import load_reference_pipeline

    return load_reference_pipeline()


EMBEDDED = {
    "tiny-audioldm": ("audioldm", build_tiny_audioldm),
    "reference-audioldm": ("audioldm", build_reference_audioldm),
}

# Options a user did not give that follow the model: the reference model knows only its corpus,
# so its seed captions (calibration and eval prompts) and its FD embedder are in-domain ones.
# ``captions`` is a file name inside ``adm_export/data/reference`` (None: the built-in captions).
MODEL_DEFAULTS = {
    "reference-audioldm": {"captions": "captions.txt", "embedder": "reference-clap"},
}


# ------------------------------------------------------------------------------------------------
# Cross-attention families (AudioLDM2, TANGO, Make-An-Audio): components shared by their tiny builds
# ------------------------------------------------------------------------------------------------


def _quiet_diffusers():
    """Context manager silencing diffusers' deprecation warnings during a build."""
    import contextlib

    from diffusers.utils import logging as dlogging

    @contextlib.contextmanager
    def quiet():
        verbosity = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        try:
            yield
        finally:
            dlogging.set_verbosity(verbosity)

    return quiet()


def _tiny_mel_vae(seed: int, latent_channels: int = 8, widths=(16, 32, 32), attention_levels: int = 0):
    """A small diffusers ``AutoencoderKL`` on 1-channel mel spectrograms (downsampling 2^(levels-1)).

    ``attention_levels`` turns the last levels into attention blocks, as in Make-An-Audio's VAE.
    """
    import torch
    from diffusers import AutoencoderKL

    n = len(widths)
    down = ["DownEncoderBlock2D"] * (n - attention_levels) + ["AttnDownEncoderBlock2D"] * attention_levels
    up = ["AttnUpDecoderBlock2D"] * attention_levels + ["UpDecoderBlock2D"] * (n - attention_levels)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(widths),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=256,
    )


def _tiny_hifigan(seed: int, mel_bins: int = MEL_BINS, upsample_rates=(5, 4, 4, 2), kernels=(10, 8, 8, 4)):
    """A small ``SpeechT5HifiGan`` at 16 kHz (hop = product of ``upsample_rates``)."""
    import torch
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(seed)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=mel_bins,
        sampling_rate=SAMPLING_RATE,
        upsample_initial_channel=32,
        upsample_rates=list(upsample_rates),
        upsample_kernel_sizes=list(kernels),
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    ))
    # As in tiny-audioldm: PyTorch's default init keeps an audible signal through the layers.
    for m in vocoder.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            m.reset_parameters()
    return vocoder


def _tiny_t5(seed: int, vocab_size: int, d_model: int = 32):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=2 * d_model, d_kv=d_model // 2,
                                   num_heads=2, num_layers=2, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def tiny_audioldm2_unet_config() -> dict:
    """U-Net config of ``tiny-audioldm2``: AudioLDM2's structure (a DownBlock, then cross-attention
    blocks whose layers hold [self-attention, GPT-2 stream, T5 stream] transformers, head width 32)
    at widths 32/64, one layer per block."""
    widths = (32, 64)
    return dict(
        sample_size=64,
        in_channels=8,
        out_channels=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=widths,
        layers_per_block=1,
        norm_num_groups=32,
        # [None, GPT-2 width, T5 width] per block, as the published config (with 768 and 1024).
        cross_attention_dim=tuple([None, 32, 32] for _ in widths),
        # AudioLDM2UNet2DConditionModel reads attention_head_dim as the number of heads.
        attention_head_dim=tuple(max(1, w // 32) for w in widths),
    )


def audioldm2_unet_config() -> dict:
    """U-Net config of the published AudioLDM2 (cvssp/audioldm2: widths 128/256/384/640, head width 32,
    GPT-2 (768) and FLAN-T5-large (1024) streams), from the original config's conversion."""
    widths = (128, 256, 384, 640)
    return dict(
        sample_size=256,
        in_channels=8,
        out_channels=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=widths,
        layers_per_block=2,
        cross_attention_dim=tuple([None, 768, 1024] for _ in widths),
        attention_head_dim=tuple(w // 32 for w in widths),
    )


def build_tiny_audioldm2(seed: int = 0):
    """Build the ``tiny-audioldm2`` pipeline with seeded random weights.

    Every AudioLDM2 component at toy width: CLAP (text and audio towers; the pipeline calls
    ``get_text_features``), FLAN-T5 encoder with a local character tokenizer, the projection
    model, GPT-2 (``GPT2Model``, as the published checkpoints, generating 8 tokens), the
    two-stream U-Net, mel VAE and HiFi-GAN vocoder, DDIM with AudioLDM2's betas.

    Returns:
        A diffusers ``AudioLDM2Pipeline`` in float32 on the CPU.
    """
    import torch
    from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel, DDIMScheduler
    from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig, GPT2Config, GPT2Model

    from adm_export.models.conditioning import build_char_t5_tokenizer

    # One token per character: 256 hold a whole augmented caption (the published T5 stops at 128
    # SentencePiece tokens, about 500 characters).
    tokenizer = build_byte_tokenizer()
    tokenizer_2 = build_char_t5_tokenizer(model_max_length=256)
    torch.manual_seed(seed)
    unet = AudioLDM2UNet2DConditionModel(**tiny_audioldm2_unet_config())
    vae = _tiny_mel_vae(seed + 1)
    torch.manual_seed(seed + 2)
    text_config = ClapTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_attention_heads=2, num_hidden_layers=2, projection_dim=32,
                                 max_position_embeddings=tokenizer.model_max_length + 3,
                                 pad_token_id=1, bos_token_id=0, eos_token_id=2)
    audio_config = ClapAudioConfig(spec_size=64, window_size=4, num_mel_bins=64, intermediate_size=37,
                                   depths=[2, 2], num_attention_heads=[2, 2], num_hidden_layers=2,
                                   hidden_size=32, projection_dim=32, patch_size=2, patch_stride=2,
                                   patch_embed_input_channels=4)
    text_encoder = ClapModel(ClapConfig(text_config=text_config.to_dict(), audio_config=audio_config.to_dict(),
                                        projection_dim=32))
    text_encoder_2 = _tiny_t5(seed + 3, len(tokenizer_2))
    torch.manual_seed(seed + 4)
    language_model = GPT2Model(GPT2Config(n_embd=32, n_head=2, n_layer=2, vocab_size=2, n_positions=512,
                                           bos_token_id=0, eos_token_id=1))
    language_model.config.max_new_tokens = 8
    torch.manual_seed(seed + 5)
    projection_model = AudioLDM2ProjectionModel(text_encoder_dim=32, text_encoder_1_dim=32, langauge_model_dim=32)
    vocoder = _tiny_hifigan(seed + 6)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    with _quiet_diffusers():
        pipe = AudioLDM2Pipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                 projection_model=projection_model, language_model=language_model,
                                 tokenizer=tokenizer, tokenizer_2=tokenizer_2, feature_extractor=None,
                                 unet=unet, scheduler=scheduler, vocoder=vocoder)
    for module in (unet, vae, text_encoder, text_encoder_2, language_model, projection_model, vocoder):
        module.eval()
    return pipe


EMBEDDED["tiny-audioldm2"] = ("audioldm2", build_tiny_audioldm2)


# tiny-tango's VAE in TANGO's vae_config.json format (AudioLDM's layout: 3 levels, no attention
# but the middle block, 8 latent channels) at width 32.
TINY_TANGO_VAE_CONFIG = {
    "image_key": "fbank", "subband": 1, "embed_dim": 8, "time_shuffle": 1, "scale_factor": 1.0,
    "ddconfig": {"double_z": True, "z_channels": 8, "resolution": 256, "downsample_time": False, "in_channels": 1,
                 "out_ch": 1, "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                 "dropout": 0.0},
}


def tiny_tango_unet_config() -> dict:
    """U-Net config of ``tiny-tango``: TANGO's layout (cross-attention blocks then a DownBlock,
    linear projections, upcast attention, head width 32 here) at widths 32/64/64, one layer per
    block, T5 width 32."""
    widths = (32, 64, 64)
    return dict(
        sample_size=64,
        in_channels=8,
        out_channels=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=widths,
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=32,
        attention_head_dim=tuple(max(1, w // 32) for w in widths),
        use_linear_projection=True,
        upcast_attention=True,
    )


def build_tiny_tango(seed: int = 0):
    """Build the ``tiny-tango`` pipeline with seeded random weights.

    TANGO's components at toy width: FLAN-T5-style encoder (local character tokenizer), the
    text-masked cross-attention U-Net, AudioLDM-style mel VAE and HiFi-GAN, and TANGO's
    scheduler (DDPM, SD 2.1 betas, v-prediction).

    Returns:
        A :class:`adm_export.models.tango.TangoPipeline` in float32 on the CPU.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from adm_export.models.conditioning import build_char_t5_tokenizer
    from adm_export.models.ldm_vae import vae_config_from_ldm
    from adm_export.models.tango import TANGO_SCHEDULER_CONFIG, _pipeline_class

    tokenizer = build_char_t5_tokenizer(model_max_length=256)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_tango_unet_config())
    # Through the LDM config mapping, as a published TANGO VAE is loaded.
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config_from_ldm(TINY_TANGO_VAE_CONFIG["ddconfig"], TINY_TANGO_VAE_CONFIG["embed_dim"],
                                              TINY_TANGO_VAE_CONFIG["scale_factor"]))
    text_encoder = _tiny_t5(seed + 2, len(tokenizer))
    vocoder = _tiny_hifigan(seed + 3)
    for module in (unet, vae, text_encoder, vocoder):
        module.eval()
    with _quiet_diffusers():
        return _pipeline_class()(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                 scheduler=DDPMScheduler(**TANGO_SCHEDULER_CONFIG), vocoder=vocoder,
                                 text_len=256)


def tango_unet_config() -> dict:
    """The published TANGO U-Net config (declare-lab/tango)."""
    from adm_export.models.tango import TANGO_UNET_CONFIG

    return dict(TANGO_UNET_CONFIG)


EMBEDDED["tiny-tango"] = ("tango", build_tiny_tango)


def _build_tiny_make_an_audio(seed: int = 0):
    """``tiny-make-an-audio``: :func:`adm_export.models.make_an_audio.tiny.build_tiny_make_an_audio`."""
    from adm_export.models.make_an_audio.tiny import build_tiny_make_an_audio

    return build_tiny_make_an_audio(seed)


EMBEDDED["tiny-make-an-audio"] = ("make_an_audio", _build_tiny_make_an_audio)
