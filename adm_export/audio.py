"""Audio signal code in one place: waveform preparation, resampling, windows, mel scales, STFT.

Pure numpy / scipy (no torch): the embedders (:mod:`adm_export.eval.embedders`), the eval figures
and the reference model's mel front end (:mod:`adm_export.models.reference_components`) take their
filterbanks and spectrograms from here.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import signal

from adm_export.errors import InvalidInputError


def resample(x: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """``x`` resampled from ``sr`` to ``target_sr`` Hz (``scipy.signal.resample_poly``; unchanged if equal)."""
    if int(sr) == int(target_sr):
        return x
    g = math.gcd(int(sr), int(target_sr))
    return signal.resample_poly(x, int(target_sr) // g, int(sr) // g)


def prepare_clips(waveforms: Sequence[np.ndarray], sr: int, target_sr: int) -> list[np.ndarray]:
    """Validate clips, mix to mono and resample to ``target_sr`` (float64): what every embedder takes in.

    Raises:
        InvalidInputError: No clips, a bad sampling rate, a clip that is not mono 1-D, or NaN/inf samples.
    """
    if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
        raise InvalidInputError(
            "embedders take a sequence of clips, got a single 1-D array; wrap it in a list"
        )
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise InvalidInputError(f"invalid sampling rate {sr!r}: give a positive integer in Hz")
    clips = list(waveforms)
    if not clips:
        raise InvalidInputError("no clips to embed; raise --num-clips")
    out = []
    for i, w in enumerate(clips):
        a = np.asarray(w, dtype=np.float64)
        if a.ndim == 2 and a.shape[0] in (1, 2):
            a = a.mean(axis=0)
        if a.ndim != 1 or a.size == 0:
            raise InvalidInputError(
                f"clip {i} has shape {tuple(np.shape(w))}: give mono 1-D waveforms"
            )
        if not np.isfinite(a).all():
            raise InvalidInputError(
                f"clip {i} contains NaN/inf samples; the generated audio is broken "
                "(check the engine output, --engine)"
            )
        out.append(resample(a, int(sr), target_sr))
    return out


def pad_to(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` zero-padded at the end to at least ``n`` samples."""
    return a if a.size >= n else np.pad(a, (0, n - a.size))


def periodic_hann(n: int) -> np.ndarray:
    """Periodic Hann window (``scipy.signal.get_window('hann', n)``, librosa's default)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, ``htk=False``): linear below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    lin = f / f_sp
    log = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log, lin)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    lin = f_sp * m
    log = min_log_hz * np.exp(logstep * (m - min_log_mel))
    return np.where(m >= min_log_mel, log, lin)


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-scale, area-normalised triangular mel filters, ``(n_mels, n_fft // 2 + 1)``.

    The same construction as ``librosa.filters.mel`` with its defaults (``htk=False``,
    ``norm='slaney'``), which torchlibrosa stores as PANNs' ``logmel_extractor.melW`` (transposed).
    """
    fft_freqs = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    mel_pts = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    hz_pts = _mel_to_hz_slaney(mel_pts)
    widths = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    # Slaney normalisation: every filter has unit area in Hz.
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]
    return weights


def _hz_to_mel_htk(f: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def vggish_mel_matrix(
    sr: int = 16000, n_bins: int = 257, n_mels: int = 64, fmin: float = 125.0, fmax: float = 7500.0
) -> np.ndarray:
    """VGGish's mel matrix ``(n_bins, n_mels)``: HTK mel scale, triangles in mel, no area norm.

    As in the AudioSet ``mel_features.spectrogram_to_mel_matrix``: the triangles are linear in
    mel, the bins are ``linspace(0, sr/2, n_bins)`` and the DC bin gets no weight.
    """
    bins_mel = _hz_to_mel_htk(np.linspace(0.0, sr / 2.0, n_bins))
    edges = np.linspace(_hz_to_mel_htk(fmin), _hz_to_mel_htk(fmax), n_mels + 2)
    lo, ce, hi = edges[:-2], edges[1:-1], edges[2:]
    lower = (bins_mel[:, None] - lo[None, :]) / (ce - lo)[None, :]
    upper = (hi[None, :] - bins_mel[:, None]) / (hi - ce)[None, :]
    w = np.maximum(0.0, np.minimum(lower, upper))
    w[0, :] = 0.0
    return w


def frame_signal(x: np.ndarray, win: int, hop: int) -> np.ndarray:
    """Frames ``(n, win)`` every ``hop`` samples (a strided view, no padding)."""
    n = 1 + (x.size - win) // hop
    return np.lib.stride_tricks.sliding_window_view(x, win)[::hop][:n]


def power_spectrogram(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Centred (reflect-padded) periodic-Hann power spectrogram, ``(frames, n_fft // 2 + 1)``.

    Same framing as ``librosa.stft(center=True, pad_mode='reflect')`` and torchlibrosa.
    """
    pad = n_fft // 2
    x = pad_to(x, pad + 1)  # reflect padding needs more samples than the pad
    xp = np.pad(x, pad, mode="reflect")
    spec = np.fft.rfft(frame_signal(xp, n_fft, hop) * periodic_hann(n_fft), axis=1)
    return spec.real**2 + spec.imag**2
