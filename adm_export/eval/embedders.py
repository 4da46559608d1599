"""Audio embedders for Fréchet distance: a weight-free default and the field's pretrained networks.

* ``logmel`` (:class:`LogMelEmbedder`): deterministic log-mel statistics, no weights, always
  available. It measures signal-level drift (spectral balance, loudness, noise, temporal
  texture) and is what the quality gate uses when no pretrained weights are present.
* ``panns-cnn14`` (:class:`PANNsCNN14`): PANNs Cnn14, 16 kHz variant, as audioldm_eval uses it
  for FD (2048-d ``fc1`` embedding) and for KL / IS (527 AudioSet logits).
* ``vggish`` (:class:`VGGish`): the VGGish network of FAD (128-d per 0.96 s frame).
* ``clap`` (:class:`ClapAudioEmbedder`): LAION CLAP audio tower through ``transformers``.

The pretrained networks cannot be downloaded here: they load a local checkpoint given with
``--embedder-checkpoint`` (or found in audioldm_eval's / torch hub's cache). Their state-dict key
names and shapes follow the public checkpoints (``Cnn14_16k_mAP=0.438.pth``, torchvggish's
``vggish-10086976.pth``) so those files load with ``strict=True``.

torch is imported lazily: ``import adm_export.eval.embedders`` does not import it; the torch
classes :class:`PANNsCNN14` and :class:`VGGish` are built on first access (PEP 562).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adm_export.audio import (frame_signal, mel_filterbank, pad_to, periodic_hann, power_spectrogram, prepare_clips,
                              vggish_mel_matrix)
from adm_export.errors import InvalidInputError

logger = logging.getLogger(__name__)

#: Embedder names (the CLI's ``--embedder`` choices) and what each one is.
EMBEDDERS: dict[str, str] = {
    "logmel": "weight-free log-mel statistics (16 kHz, 64 mels); signal-level drift, no semantics",
    "panns-cnn14": "PANNs Cnn14 16 kHz (2048-d fc1 + 527 AudioSet logits); audioldm_eval FD/KL/IS",
    "vggish": "VGGish (128-d per 0.96 s frame); FAD as audioldm_eval computes it",
    "clap": "LAION CLAP audio tower via transformers (48 kHz); needs a local checkpoint folder",
    "reference-clap": "audio encoder trained with reference-audioldm (192-d + 10-class head); shipped weights",
}

CHECKPOINT_FLAG = "--embedder-checkpoint"


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class Embedder:
    """What every embedder provides (a plain base class; the torch ones also subclass nn.Module).

    Attributes:
        name: Registry name (``--embedder``).
        sampling_rate: Rate the embedder works at; inputs are resampled to it.
        dim: Embedding size.
        weight_free: True when no pretrained weights are involved.
        description: One sentence for the report: what this embedder can and cannot tell.
    """

    name: str = ""
    sampling_rate: int = 16000
    dim: int = 0
    weight_free: bool = False
    description: str = ""

    def embed(self, waveforms: Sequence[np.ndarray], sr: int) -> np.ndarray:
        """One embedding per clip.

        Args:
            waveforms: Mono clips (1-D float arrays, nominally in [-1, 1]; ``(1|2, samples)``
                arrays are averaged to mono). Lengths may differ.
            sr: Sampling rate of ``waveforms`` in Hz; resampled with
                ``scipy.signal.resample_poly`` to :attr:`sampling_rate`.

        Returns:
            ``(N, dim)`` float64 array.
        """
        raise NotImplementedError

    def logits(self, waveforms: Sequence[np.ndarray], sr: int) -> np.ndarray | None:
        """``(N, classes)`` class logits, or ``None`` when the embedder has no class head."""
        return None

    def embed_and_logits(
        self, waveforms: Sequence[np.ndarray], sr: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings and logits together (one forward pass where the model allows it)."""
        return self.embed(waveforms, sr), self.logits(waveforms, sr)

    def fd_embeddings(self, waveforms: Sequence[np.ndarray], sr: int) -> np.ndarray:
        """The rows FD is computed on: clip embeddings here, frame embeddings for VGGish (FAD)."""
        return self.embed(waveforms, sr)


# --------------------------------------------------------------------------------------------
# Weight-free default
# --------------------------------------------------------------------------------------------


class LogMelEmbedder(Embedder):
    """Deterministic log-mel statistics per clip (no weights; the default ``logmel``).

    16 kHz, window 512, hop 160, 64 Slaney mels 50-8000 Hz (the front end of PANNs Cnn14 16k),
    log power in dB (floor 1e-10). Features (200): per-band mean (64), per-band standard
    deviation (64), per-band mean absolute frame-to-frame delta (64, temporal modulation), then 8
    global statistics: frame-energy mean and std (dB), spectral centroid mean and std and
    bandwidth mean (octaves re 1 kHz), spectral flatness mean (dB), 85 % roll-off mean (octaves
    re 1 kHz) and zero-crossing rate.
    """

    name = "logmel"
    sampling_rate = 16000
    weight_free = True
    description = (
        "Weight-free log-mel statistics (64-band spectral envelope, its variability and "
        "modulation, loudness, centroid, flatness): sensitive to signal-level drift such as "
        "quantization noise, spectral tilt or loudness changes, but blind to semantics and not "
        "comparable with published FD/FAD numbers."
    )

    n_fft = 512
    hop = 160
    n_mels = 64
    fmin = 50.0
    fmax = 8000.0

    def __init__(self) -> None:
        self._fb = mel_filterbank(self.sampling_rate, self.n_fft, self.n_mels, self.fmin, self.fmax)
        self._freqs = np.linspace(0.0, self.sampling_rate / 2.0, self.n_fft // 2 + 1)
        self.dim = 3 * self.n_mels + 8

    @property
    def feature_names(self) -> list[str]:
        """Names of the embedding's columns, for reports."""
        m = range(self.n_mels)
        return (
            [f"mel{i}_mean" for i in m]
            + [f"mel{i}_std" for i in m]
            + [f"mel{i}_absdelta" for i in m]
            + [
                "energy_db_mean",
                "energy_db_std",
                "centroid_oct_mean",
                "centroid_oct_std",
                "bandwidth_oct_mean",
                "flatness_db_mean",
                "rolloff85_oct_mean",
                "zcr",
            ]
        )

    def _features(self, x: np.ndarray) -> np.ndarray:
        tiny = 1e-10
        power = power_spectrogram(x, self.n_fft, self.hop)  # (T, F)
        logmel = 10.0 * np.log10(np.maximum(power @ self._fb.T, tiny))  # (T, M)
        band_mean = logmel.mean(axis=0)
        band_std = logmel.std(axis=0)
        if logmel.shape[0] > 1:
            band_mod = np.abs(np.diff(logmel, axis=0)).mean(axis=0)
        else:
            band_mod = np.zeros(self.n_mels)

        total = power.sum(axis=1)
        safe_total = np.maximum(total, tiny)
        energy_db = 10.0 * np.log10(safe_total)
        f = self._freqs
        centroid = (power @ f) / safe_total
        bandwidth = np.sqrt(np.maximum((power * (f[None, :] - centroid[:, None]) ** 2).sum(1), 0.0)
                            / safe_total)
        flatness = np.exp(np.log(np.maximum(power, tiny)).mean(axis=1)) / np.maximum(
            power.mean(axis=1), tiny
        )
        cum = np.cumsum(power, axis=1)
        roll_idx = np.argmax(cum >= 0.85 * cum[:, -1:], axis=1)
        rolloff = f[roll_idx]

        def octaves(hz: np.ndarray) -> np.ndarray:
            # Floor at 20 Hz so silent frames (centroid 0) stay finite.
            return np.log2(np.maximum(hz, 20.0) / 1000.0)

        zcr = float(np.mean(np.abs(np.diff(np.signbit(x).astype(np.int8))))) if x.size > 1 else 0.0
        glob = np.array(
            [
                energy_db.mean(),
                energy_db.std(),
                octaves(centroid).mean(),
                octaves(centroid).std(),
                octaves(bandwidth).mean(),
                (10.0 * np.log10(np.maximum(flatness, tiny))).mean(),
                octaves(rolloff).mean(),
                zcr,
            ]
        )
        return np.concatenate([band_mean, band_std, band_mod, glob])

    def embed(self, waveforms: Sequence[np.ndarray], sr: int) -> np.ndarray:
        clips = prepare_clips(waveforms, sr, self.sampling_rate)
        return np.stack([self._features(c) for c in clips]).astype(np.float64)


# --------------------------------------------------------------------------------------------
# VGGish front end (numpy)
# --------------------------------------------------------------------------------------------

#: VGGish example: 96 frames of 10 ms (0.96 s) by 64 mel bands, no overlap.
VGGISH_EXAMPLE_FRAMES = 96
VGGISH_BANDS = 64
_VGGISH_WIN = 400  # 25 ms at 16 kHz
_VGGISH_HOP = 160  # 10 ms
_VGGISH_FFT = 512  # next power of two of the window


def vggish_examples(x: np.ndarray) -> np.ndarray:
    """VGGish log-mel examples ``(n, 96, 64)`` of a 16 kHz mono clip (float32).

    25 ms periodic-Hann frames every 10 ms, no padding, 512-point FFT magnitude, 64 HTK mels
    125-7500 Hz, ``log(mel + 0.01)``, cut into non-overlapping 0.96 s examples. A clip shorter
    than one example (0.975 s) is zero-padded to one example.
    """
    min_len = _VGGISH_WIN + (VGGISH_EXAMPLE_FRAMES - 1) * _VGGISH_HOP
    x = pad_to(np.asarray(x, dtype=np.float64), min_len)
    frames = frame_signal(x, _VGGISH_WIN, _VGGISH_HOP) * periodic_hann(_VGGISH_WIN)
    mag = np.abs(np.fft.rfft(frames, n=_VGGISH_FFT, axis=1))
    logmel = np.log(mag @ _vggish_mel() + 0.01)
    n_ex = 1 + (logmel.shape[0] - VGGISH_EXAMPLE_FRAMES) // VGGISH_EXAMPLE_FRAMES
    ex = logmel[: n_ex * VGGISH_EXAMPLE_FRAMES].reshape(n_ex, VGGISH_EXAMPLE_FRAMES, VGGISH_BANDS)
    return ex.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _vggish_mel() -> np.ndarray:
    return vggish_mel_matrix()


def _dft_kernels(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    """Windowed DFT rows ``(n_fft // 2 + 1, n_fft)``: real, imaginary parts of exp(-2 pi i kn/N)."""
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    angle = 2.0 * np.pi * k * n / n_fft
    w = periodic_hann(n_fft)[None, :]
    return np.cos(angle) * w, -np.sin(angle) * w


# --------------------------------------------------------------------------------------------
# Torch networks (built lazily)
# --------------------------------------------------------------------------------------------

#: PANNs Cnn14 (16 kHz) front end and head, as audioldm_eval instantiates it.
CNN14_16K = dict(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50.0,
                 fmax=8000.0, classes_num=527)


@functools.lru_cache(maxsize=1)
def _torch_classes() -> dict[str, type]:
    """Define the torch modules on first use so that importing this module does not import torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def _device_of(module: nn.Module) -> torch.device:
        return next(module.parameters()).device

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
            device = _device_of(self)
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

    class VGGish(nn.Module, Embedder):
        """VGGish with torchvggish's state-dict layout (``features.*``, ``embeddings.*``).

        ``features``: conv 64, pool, conv 128, pool, conv 256 x2, pool, conv 512 x2, pool (3x3
        convs with bias; keys ``features.{0,3,6,8,11,13}``); ``embeddings``: Linear 12288->4096,
        4096->4096, 4096->128 (keys ``embeddings.{0,2,4}``). As audioldm_eval's FAD does, the
        final ReLU and the PCA post-processing are not applied.
        """

        name = "vggish"
        sampling_rate = 16000
        dim = 128
        weight_free = False
        description = (
            "VGGish (AudioSet-trained) 128-d frame embeddings as FAD uses them: comparable with "
            "published FAD when the public weights are loaded, meaningless with random weights."
        )

        def __init__(self, batch_size: int = 32) -> None:
            nn.Module.__init__(self)
            self.batch_size = batch_size
            layers: list[nn.Module] = []
            cin = 1
            for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
                if v == "M":
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    conv = nn.Conv2d(cin, int(v), kernel_size=3, padding=1)
                    layers += [conv, nn.ReLU(inplace=True)]
                    cin = int(v)
            self.features = nn.Sequential(*layers)
            self.embeddings = nn.Sequential(
                nn.Linear(512 * 4 * 6, 4096),
                nn.ReLU(inplace=True),
                nn.Linear(4096, 4096),
                nn.ReLU(inplace=True),
                nn.Linear(4096, 128),
                nn.ReLU(inplace=True),
            )
            self.eval()

        def forward(self, examples: torch.Tensor) -> torch.Tensor:
            """``(B, 1, 96, 64)`` log-mel examples -> ``(B, 128)`` pre-activation embeddings."""
            x = self.features(examples)  # (B, 512, 6, 4)
            # Flatten in TensorFlow's NHWC order, which the converted weights expect.
            x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            return self.embeddings[:-1](x)

        def frame_embeddings(self, waveforms, sr) -> list[np.ndarray]:
            """Per clip, ``(frames, 128)`` embeddings of its 0.96 s examples (what FAD pools)."""
            clips = prepare_clips(waveforms, sr, 16000)
            examples = [vggish_examples(c) for c in clips]
            flat = np.concatenate(examples)
            device = _device_of(self)
            out = []
            self.eval()
            with torch.inference_mode():
                for s in range(0, flat.shape[0], self.batch_size):
                    batch = torch.from_numpy(flat[s : s + self.batch_size, None]).to(device)
                    out.append(self(batch).double().cpu().numpy())
            emb = np.concatenate(out)
            bounds = np.cumsum([0] + [e.shape[0] for e in examples])
            return [emb[bounds[i] : bounds[i + 1]] for i in range(len(clips))]

        def embed(self, waveforms, sr):
            """Clip embedding: the mean of its frame embeddings (FAD itself uses the frames)."""
            return np.stack([f.mean(axis=0) for f in self.frame_embeddings(waveforms, sr)])

        def fd_embeddings(self, waveforms, sr):
            return np.concatenate(self.frame_embeddings(waveforms, sr))

    return {"PANNsCNN14": PANNsCNN14, "VGGish": VGGish}


def __getattr__(name: str):  # PEP 562: build the torch classes on first access
    if name in ("PANNsCNN14", "VGGish"):
        cls = _torch_classes()[name]
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + ["PANNsCNN14", "VGGish"])


# --------------------------------------------------------------------------------------------
# CLAP (transformers)
# --------------------------------------------------------------------------------------------


class ClapAudioEmbedder(Embedder):
    """LAION CLAP audio embeddings (``ClapModel.get_audio_features``) from a local folder.

    Clips longer than the extractor's window (10 s) are cropped at random by ``rand_trunc``
    (non-fused checkpoints), so only clips up to 10 s embed deterministically.
    """

    name = "clap"
    sampling_rate = 48000
    weight_free = False
    description = (
        "LAION CLAP audio-tower embeddings (48 kHz, L2-normalised): semantic similarity in the "
        "space AudioLDM is conditioned on; not the embedding of published FD/FAD numbers."
    )

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int = 8) -> None:
        from transformers import ClapFeatureExtractor, ClapModel

        try:
            self.model = ClapModel.from_pretrained(checkpoint).eval().to(device)
            self.feature_extractor = ClapFeatureExtractor.from_pretrained(checkpoint)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(
                f"{CHECKPOINT_FLAG} {checkpoint!r} is not a loadable CLAP folder "
                f"(ClapModel + feature extractor): {str(exc).splitlines()[0]}"
            ) from exc
        self.device = device
        self.batch_size = batch_size
        self.dim = int(self.model.config.projection_dim)
        # The extractor's truncation must match the audio tower: "fusion" feeds 4 mel views.
        fusion = bool(getattr(self.model.config.audio_config, "enable_fusion", False))
        self._truncation = "fusion" if fusion else "rand_trunc"

    def embed(self, waveforms: Sequence[np.ndarray], sr: int) -> np.ndarray:
        import torch

        clips = prepare_clips(waveforms, sr, self.sampling_rate)
        out = []
        with torch.inference_mode():
            for s in range(0, len(clips), self.batch_size):
                part = [c.astype(np.float32) for c in clips[s : s + self.batch_size]]
                inputs = self.feature_extractor(
                    part,
                    sampling_rate=self.sampling_rate,
                    truncation=self._truncation,
                    return_tensors="pt",
                )
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                feats = self.model.get_audio_features(**inputs)
                # transformers >= 5 returns a model output whose pooler_output holds the features.
                if not isinstance(feats, torch.Tensor):
                    feats = feats.pooler_output
                out.append(feats.double().cpu().numpy())
        return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# Factory and checkpoint loading
# --------------------------------------------------------------------------------------------


def _cache_candidates(name: str) -> list[Path]:
    """Where audioldm_eval and torch hub leave these weights, if they ever ran on this machine."""
    home = Path.home()
    torch_home = Path(os.environ.get("TORCH_HOME", home / ".cache" / "torch"))
    if name == "panns-cnn14":
        return [home / ".cache" / "audioldm_eval" / "ckpt" / "Cnn14_16k_mAP=0.438.pth"]
    if name == "vggish":
        return [torch_home / "hub" / "checkpoints" / "vggish-10086976.pth"]
    return []


def _read_state_dict(path: Path) -> dict:
    """Load a torch / safetensors checkpoint; unwrap ``{"model": ...}`` and ``module.`` prefixes."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:  # header or data corrupt
            raise InvalidInputError(
                f"{CHECKPOINT_FLAG} {str(path)!r} is not a readable safetensors file: {exc}"
            ) from exc
    else:
        import pickle

        import torch

        def unreadable(exc: BaseException) -> InvalidInputError:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return InvalidInputError(
                f"{CHECKPOINT_FLAG} {str(path)!r} is not a readable torch checkpoint: {first}"
            )

        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" not in str(exc).lower():
                raise unreadable(exc) from exc
            # Training checkpoints may carry non-tensor objects (sampler state, numpy arrays).
            logger.warning(
                "checkpoint %s holds more than tensors; loading it with full unpickling "
                "(only do this with files you trust)",
                path,
            )
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=False)
            except Exception as exc2:
                raise unreadable(exc2) from exc2
        except Exception as exc:  # corrupt or not a torch file
            raise unreadable(exc) from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise InvalidInputError(
            f"{CHECKPOINT_FLAG} {str(path)!r} holds a {type(obj).__name__}, not a state dict"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _fmt_keys(keys: Sequence[str], limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


def load_weights(module, path: Path, name: str) -> None:
    """Load ``path`` into ``module`` after checking names and shapes; one-line user errors.

    Missing ``num_batches_tracked`` counters are tolerated (unused at inference); torchvggish's
    ``pproc.*`` PCA parameters are ignored (FAD does not use the post-processing).
    """
    sd = _read_state_dict(path)
    if name == "vggish":
        sd = {k: v for k, v in sd.items() if not k.startswith("pproc.")}
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_fmt_keys(unexpected)}")
        raise InvalidInputError(
            f"{CHECKPOINT_FLAG} {str(path)!r} does not fit {name}: " + "; ".join(parts)
        )
    wrong = [
        f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if wrong:
        hint = ""
        if name == "panns-cnn14" and "logmel_extractor.melW" in sd and sd[
            "logmel_extractor.melW"
        ].shape[0] == 513:
            hint = " (this is the 32 kHz Cnn14; give Cnn14_16k_mAP=0.438.pth)"
        raise InvalidInputError(
            f"{CHECKPOINT_FLAG} {str(path)!r} has wrong shapes for {name}{hint}: "
            + "; ".join(wrong[:3])
            + (f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else "")
        )
    full = dict(expected)
    full.update({k: v for k, v in sd.items() if k in expected})
    module.load_state_dict(full, strict=True)


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if not str(device).startswith("cuda"):
        raise InvalidInputError(f"invalid --device {device!r}: choose cpu or cuda")
    import torch

    if not torch.cuda.is_available():
        raise InvalidInputError(
            f"invalid --device {device!r}: CUDA is not available; use --device cpu"
        )


def get_embedder(name: str, checkpoint: str | None = None, device: str = "cpu") -> Embedder:
    """Build an embedder by registry name.

    Args:
        name: One of :data:`EMBEDDERS` (``logmel``, ``panns-cnn14``, ``vggish``, ``clap``).
        checkpoint: ``panns-cnn14`` / ``vggish``: a torch state-dict file (optionally nested under
            ``"model"`` as PANNs ships it; ``.safetensors`` works too); when ``None``, the caches of
            audioldm_eval / torch hub are tried. ``clap``: a local ``ClapModel`` folder.
            Ignored by ``logmel``.
        device: ``cpu`` or ``cuda[:N]`` for the torch embedders.

    Returns:
        A ready :class:`Embedder` in inference mode.

    Raises:
        InvalidInputError: Unknown name, missing or unusable checkpoint (the message names
            ``--embedder-checkpoint``), or an unavailable device.
    """
    key = str(name).strip().lower()
    if key not in EMBEDDERS:
        raise InvalidInputError(
            f"unknown --embedder {name!r}: choose one of {', '.join(EMBEDDERS)}"
        )
    if key == "logmel":
        if checkpoint:
            logger.info(
                "embedder logmel is weight-free; ignoring %s %s", CHECKPOINT_FLAG, checkpoint
            )
        return LogMelEmbedder()

    _check_device(device)
    if key == "reference-clap":
        from adm_export.reference.embedder import ReferenceClapEmbedder

        if checkpoint and not Path(checkpoint).is_dir():
            raise InvalidInputError(
                f"{CHECKPOINT_FLAG} {checkpoint!r}: reference-clap takes a folder holding "
                "reference_clap.safetensors (or no checkpoint: the shipped weights)"
            )
        return ReferenceClapEmbedder(checkpoint, device=device)
    if key == "clap":
        if not checkpoint or not Path(checkpoint).is_dir():
            raise InvalidInputError(
                f"embedder clap needs a local ClapModel folder: give {CHECKPOINT_FLAG} DIR "
                f"(got {checkpoint!r}); weights cannot be downloaded here"
            )
        return ClapAudioEmbedder(checkpoint, device=device)

    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise InvalidInputError(
                f"{CHECKPOINT_FLAG} {checkpoint!r} does not exist or is not a file; "
                f"{key} needs its pretrained weights as a local state-dict file"
            )
    else:
        found = [p for p in _cache_candidates(key) if p.is_file()]
        if not found:
            looked = ", ".join(str(p) for p in _cache_candidates(key))
            raise InvalidInputError(
                f"embedder {key} needs pretrained weights: give {CHECKPOINT_FLAG} FILE "
                f"(none found in {looked}), or use --embedder logmel"
            )
        path = found[0]
        logger.info("embedder %s: using cached weights %s", key, path)

    classes = _torch_classes()
    module = classes["PANNsCNN14" if key == "panns-cnn14" else "VGGish"]()
    load_weights(module, path, key)
    module.to(device)
    module.eval()
    logger.info("embedder %s loaded from %s on %s", key, path, device)
    return module
