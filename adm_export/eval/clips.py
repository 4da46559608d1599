"""Clip files of the eval stage: reading a ``--reference`` folder and writing WAV clips."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from adm_export.audio import resample
from adm_export.errors import InvalidInputError

logger = logging.getLogger(__name__)

#: Audio files a ``--reference`` folder may hold (what libsndfile reads everywhere).
REFERENCE_SUFFIXES = (".wav", ".flac", ".ogg")


def load_reference(folder: str | Path, sampling_rate: int) -> list[np.ndarray]:
    """Read every WAV/FLAC/OGG file of a folder (not recursive) as mono float32 at ``sampling_rate``.

    Raises:
        InvalidInputError: The folder is missing, holds fewer than 2 audio files, or a file cannot
            be decoded (the message names ``--reference`` and the file).
    """
    import soundfile as sf

    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"--reference {str(folder)!r} is not a folder; give a folder of WAV/FLAC clips")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in REFERENCE_SUFFIXES)
    if len(files) < 2:
        raise InvalidInputError(
            f"--reference {str(folder)!r} holds {len(files)} audio file(s); "
            "give a folder with at least 2 WAV/FLAC/OGG clips"
        )
    out = []
    for f in files:
        try:
            data, sr = sf.read(str(f), dtype="float32", always_2d=True)
        except Exception as exc:  # libsndfile's errors are RuntimeError / LibsndfileError
            raise InvalidInputError(f"--reference: cannot decode {str(f)!r}: {str(exc).splitlines()[0]}") from exc
        if data.shape[0] == 0:
            raise InvalidInputError(f"--reference: {str(f)!r} is empty; remove it from the folder")
        mono = data.mean(axis=1)
        if not np.isfinite(mono).all():
            raise InvalidInputError(f"--reference: {str(f)!r} holds NaN/inf samples; remove it from the folder")
        if sr != sampling_rate:
            mono = resample(mono, sr, sampling_rate).astype(np.float32)
        out.append(mono)
    logger.info("reference: %d clips from %s (%.1f-%.1f s)", len(out), folder,
                min(len(w) for w in out) / sampling_rate, max(len(w) for w in out) / sampling_rate)
    return out


def write_clips(folder: Path, waves: Sequence[np.ndarray], sampling_rate: int) -> None:
    """Write clips as 16-bit WAV files ``0000.wav, 0001.wav, ...`` (non-finite samples as 0)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    for i, w in enumerate(waves):
        sf.write(str(folder / f"{i:04d}.wav"), np.clip(np.nan_to_num(w), -1, 1), sampling_rate, subtype="PCM_16")
