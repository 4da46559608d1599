"""``logmel``: deterministic log-mel statistics, no weights, always available (the default).

It measures signal-level drift (spectral balance, loudness, noise, temporal texture) and is what
the quality gate uses when no pretrained weights are present.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from adm_export.audio import mel_filterbank, power_spectrogram, prepare_clips
from adm_export.eval.embedders.base import Embedder


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
