"""``panns-cnn14``: PANNs Cnn14, 16 kHz variant, as audioldm_eval uses it for FD (2048-d ``fc1``
embedding) and for KL / IS (527 AudioSet logits).

State-dict key names and shapes follow the public checkpoint ``Cnn14_16k_mAP=0.438.pth`` (so it
loads with ``strict=True``); the STFT and mel front end are torchlibrosa's layout. This module
imports torch; :func:`adm_export.eval.embedders.get_embedder` imports it only when asked for.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adm_export.audio import mel_filterbank, pad_to, periodic_hann, prepare_clips
from adm_export.eval.embedders.base import Embedder, device_of

#: PANNs Cnn14 (16 kHz) front end and head, as audioldm_eval instantiates it.
CNN14_16K = dict(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50.0,
                 fmax=8000.0, classes_num=527)


def _dft_kernels(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    """Windowed DFT rows ``(n_fft // 2 + 1, n_fft)``: real, imaginary parts of exp(-2 pi i kn/N)."""
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    angle = 2.0 * np.pi * k * n / n_fft
    w = periodic_hann(n_fft)[None, :]
    return np.cos(angle) * w, -np.sin(angle) * w


class ConvStft(nn.Module):
    """STFT as two strided Conv1d holding the windowed DFT rows (torchlibrosa's layout).

    ``conv_real.weight`` / ``conv_imag.weight`` are ``(n_fft // 2 + 1, 1, n_fft)``; input is
    reflect-padded by ``n_fft // 2`` on both sides (``center=True``).
    """

    def __init__(self, n_fft: int, hop: int) -> None:
        super().__init__()
        n_bins = n_fft // 2 + 1
        self.n_fft = n_fft
        self.conv_real = nn.Conv1d(1, n_bins, n_fft, stride=hop, bias=False)
        self.conv_imag = nn.Conv1d(1, n_bins, n_fft, stride=hop, bias=False)
        real, imag = _dft_kernels(n_fft)
        with torch.no_grad():
            self.conv_real.weight.copy_(torch.from_numpy(real[:, None, :]).float())
            self.conv_imag.weight.copy_(torch.from_numpy(imag[:, None, :]).float())
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.n_fft // 2
        x = F.pad(x[:, None, :], (pad, pad), mode="reflect")
        return self.conv_real(x), self.conv_imag(x)  # (B, bins, T) each


class PowerSpectrogram(nn.Module):
    def __init__(self, n_fft: int, hop: int) -> None:
        super().__init__()
        self.stft = ConvStft(n_fft, hop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        re, im = self.stft(x)
        return (re**2 + im**2).transpose(1, 2)[:, None]  # (B, 1, T, bins)


class LogMel(nn.Module):
    """Mel projection (``melW``: ``(bins, mels)``), then ``10 log10(max(., 1e-10))``.

    As torchlibrosa's ``LogmelFilterBank`` with ref 1.0, amin 1e-10 and no top_db.
    """

    def __init__(self, sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> None:
        super().__init__()
        w = mel_filterbank(sr, n_fft, n_mels, fmin, fmax).T.astype(np.float32)
        self.melW = nn.Parameter(torch.from_numpy(np.ascontiguousarray(w)), requires_grad=False)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.log10(torch.clamp(spec @ self.melW, min=1e-10))


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool) if pool > 1 else x


class PANNsCNN14(nn.Module, Embedder):
    """PANNs Cnn14, 16 kHz variant (inference only; dropout and SpecAugment are training-only).

    State-dict names and shapes match ``Cnn14_16k_mAP=0.438.pth``:
    ``spectrogram_extractor.stft.conv_{real,imag}.weight`` (257, 1, 512),
    ``logmel_extractor.melW`` (257, 64), ``bn0.*`` (64),
    ``conv_block{1..6}.{conv1,conv2}.weight`` and ``.{bn1,bn2}.*`` (64 ... 2048 channels),
    ``fc1.*`` (2048, 2048), ``fc_audioset.*`` (527, 2048). The embedding is ``relu(fc1(.))``
    (audioldm_eval's ``"2048"``) and the logits ``fc_audioset`` of it (``"logits"``).
    """

    name = "panns-cnn14"
    sampling_rate = 16000
    dim = 2048
    num_classes = 527
    weight_free = False
    description = (
        "PANNs Cnn14 (AudioSet-trained, 16 kHz) embeddings and logits as audioldm_eval uses "
        "them: semantic and acoustic similarity comparable with published FD/KL when the "
        "public weights are loaded, meaningless with random weights."
    )
    #: Shortest input: 5 halvings of the frame axis need at least 32 frames.
    min_samples = 31 * 160

    def __init__(self, batch_size: int = 4) -> None:
        nn.Module.__init__(self)
        c = CNN14_16K
        self.batch_size = batch_size
        self.spectrogram_extractor = PowerSpectrogram(c["window_size"], c["hop_size"])
        self.logmel_extractor = LogMel(
            c["sample_rate"], c["window_size"], c["mel_bins"], c["fmin"], c["fmax"]
        )
        self.bn0 = nn.BatchNorm2d(c["mel_bins"])
        widths = (1, 64, 128, 256, 512, 1024, 2048)
        for i in range(6):
            setattr(self, f"conv_block{i + 1}", ConvBlock(widths[i], widths[i + 1]))
        self.fc1 = nn.Linear(2048, 2048, bias=True)
        self.fc_audioset = nn.Linear(2048, c["classes_num"], bias=True)
        self.eval()

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, samples)`` 16 kHz audio -> ``(embedding (B, 2048), logits (B, 527))``."""
        x = self.logmel_extractor(self.spectrogram_extractor(waveform))  # (B, 1, T, mels)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # bn0 normalises per mel band
        for i in range(6):
            x = getattr(self, f"conv_block{i + 1}")(x, pool=2 if i < 5 else 1)
        x = x.mean(dim=3)  # over frequency
        x = x.max(dim=2).values + x.mean(dim=2)  # over time
        emb = F.relu(self.fc1(x))
        return emb, self.fc_audioset(emb)

    def _run(self, waveforms, sr) -> tuple[np.ndarray, np.ndarray]:
        clips = [pad_to(c, self.min_samples) for c in prepare_clips(waveforms, sr, 16000)]
        embs: list[Any] = [None] * len(clips)
        logits: list[Any] = [None] * len(clips)
        device = device_of(self)
        # Batch equal-length clips only: zero-padding would change the max-over-time pooling.
        by_len: dict[int, list[int]] = {}
        for i, c in enumerate(clips):
            by_len.setdefault(c.size, []).append(i)
        self.eval()
        with torch.inference_mode():
            for idx in by_len.values():
                for s in range(0, len(idx), self.batch_size):
                    part = idx[s : s + self.batch_size]
                    batch = torch.from_numpy(np.stack([clips[i] for i in part])).float()
                    e, lg = self(batch.to(device))
                    for j, i in enumerate(part):
                        embs[i] = e[j].double().cpu().numpy()
                        logits[i] = lg[j].double().cpu().numpy()
        return np.stack(embs), np.stack(logits)

    def embed(self, waveforms, sr):
        return self._run(waveforms, sr)[0]

    def logits(self, waveforms, sr):
        return self._run(waveforms, sr)[1]

    def embed_and_logits(self, waveforms, sr):
        return self._run(waveforms, sr)
