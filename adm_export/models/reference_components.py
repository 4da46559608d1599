"""Components of the reference model: mel front end, module configs and the audio encoder.

Everything the training recipe (``adm_export.reference.train``) builds and everything the
shipped model and the ``reference-clap`` embedder (:mod:`adm_export.eval.embedders.reference_clap`)
load comes from here, so training and inference share one definition.

Mel settings are AudioLDM's (16 kHz, window/FFT 1024, hop 160, 64 Slaney mels 0-8000 Hz,
magnitude mel, ``log(clamp(mel, 1e-5))``, frames padded by (1024 - 160) / 2 on each side so that
N samples give N / 160 frames); the embedded ``tiny-audioldm`` pipeline (hop 160, 64 bins) has the
same layout. This module imports torch (the audio encoder is a module-level ``nn.Module``); nothing on
the CLI's import path imports it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from adm_export.audio import mel_filterbank

SAMPLING_RATE = 16000
N_FFT = 1024
HOP = 160
MEL_BINS = 64
FMIN, FMAX = 0.0, 8000.0
LOG_FLOOR = 1e-5

#: Attribute heads of the CLAP-style pair (name -> number of values; value 0 means "none" where
#: the attribute is optional). The audio encoder's ``class`` head is the embedder's classifier.
HEADS = {"class": 10, "pitch": 5, "loudness": 4, "duration": 2, "rhythm": 5, "environment": 4, "layer": 11}

TEXT_CONFIG = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3,
                   projection_dim=64)
AUDIO_ENCODER_CONFIG = dict(channels=(32, 64, 128, 192), embed_dim=192, projection_dim=64)
VAE_CONFIG = dict(
    in_channels=1, out_channels=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=8, norm_num_groups=16,
    sample_size=256,
)
VOCODER_CONFIG = dict(
    model_in_dim=MEL_BINS, sampling_rate=SAMPLING_RATE, upsample_initial_channel=128,
    upsample_rates=[5, 4, 4, 2], upsample_kernel_sizes=[10, 8, 8, 4],  # product 160 = hop
    resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3, normalize_before=False,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def unet_config() -> dict:
    """U-Net config: ``tiny-audioldm``'s layout (AudioLDM's class-label FiLM conditioning) fed by
    the 64-d text projection (about 10 M parameters)."""
    from adm_export.models.embedded import tiny_unet_config

    cfg = tiny_unet_config()
    cfg["projection_class_embeddings_input_dim"] = TEXT_CONFIG["projection_dim"]
    return cfg


@functools.lru_cache(maxsize=None)
def _mel_basis_np() -> np.ndarray:
    return mel_filterbank(SAMPLING_RATE, N_FFT, MEL_BINS, FMIN, FMAX).astype(np.float32)


def log_mel(wave):
    """AudioLDM-style log-mel of a batch of 16 kHz waveforms.

    Args:
        wave: ``(B, N)`` float tensor (any device).

    Returns:
        ``(B, ceil(N / 160), 64)`` float32 log-mel frames (the vocoder's input layout).
    """
    wave = wave.float()
    pad = (N_FFT - HOP) // 2
    x = torch.nn.functional.pad(wave[:, None], (pad, pad), mode="reflect")[:, 0]
    window = torch.hann_window(N_FFT, device=wave.device)
    spec = torch.stft(x, N_FFT, HOP, N_FFT, window=window, center=False, return_complex=True).abs()
    basis = torch.from_numpy(_mel_basis_np()).to(wave.device)
    mel = basis @ spec  # (B, 64, T)
    return torch.log(torch.clamp(mel, min=LOG_FLOOR)).transpose(1, 2)


class ReferenceAudioEncoder(nn.Module):
    """The CLAP-style audio encoder with its attribute heads (a small VGG-like CNN on log-mel).

    Conv blocks (3x3, BatchNorm, ReLU, 2x2 average pool), mean over frequency, mean+max over time,
    a linear embedding, a projection into the joint text/audio space and heads.
    ``forward(logmel (B, T, 64))`` returns ``(embedding (B, 192), projection (B, 64), {head: logits})``.
    """

    def __init__(self, cfg: dict = AUDIO_ENCODER_CONFIG):
        super().__init__()
        layers, cin = [], 1
        for ch in cfg["channels"]:
            layers += [nn.Conv2d(cin, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(),
                       nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(),
                       nn.AvgPool2d(2)]
            cin = ch
        self.conv = nn.Sequential(*layers)
        self.embed = nn.Linear(2 * cin, cfg["embed_dim"])
        self.projection = nn.Linear(cfg["embed_dim"], cfg["projection_dim"])
        self.heads = nn.ModuleDict({k: nn.Linear(cfg["embed_dim"], n) for k, n in HEADS.items()})

    def forward(self, logmel):
        # Log-mel spans about [-11.5, 6]; centre it so BatchNorm's first statistics are sane.
        x = ((logmel - (-5.0)) / 4.0)[:, None]
        h = self.conv(x).mean(dim=3)  # (B, C, T')
        h = torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)
        emb = torch.relu(self.embed(h))
        return emb, self.projection(emb), {k: head(emb) for k, head in self.heads.items()}


def build_audio_encoder(seed: int = 0) -> ReferenceAudioEncoder:
    """The reference audio encoder (:class:`ReferenceAudioEncoder`), initialised after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return ReferenceAudioEncoder()


def build_text_encoder(vocab_size: int, max_length: int, seed: int = 0):
    """The CLAP-style text tower (``ClapTextModelWithProjection``, RoBERTa ids)."""
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    torch.manual_seed(seed)
    return ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=vocab_size, max_position_embeddings=max_length + 3, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, **TEXT_CONFIG))


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config())


def build_vocoder(seed: int = 0):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(seed)
    voc = SpeechT5HifiGan(SpeechT5HifiGanConfig(**VOCODER_CONFIG))
    # transformers' std-0.01 init shrinks the signal through the stack; PyTorch's default keeps it.
    for m in voc.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            m.reset_parameters()
    return voc
