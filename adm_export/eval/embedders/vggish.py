"""``vggish``: the VGGish network of FAD (128-d per 0.96 s frame), with its numpy front end.

State-dict layout follows torchvggish's ``vggish-10086976.pth`` (so it loads with ``strict=True``).
This module imports torch; :func:`adm_export.eval.embedders.get_embedder` imports it only when
asked for.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from adm_export.audio import frame_signal, pad_to, periodic_hann, prepare_clips, vggish_mel_matrix
from adm_export.eval.embedders.base import Embedder, device_of

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
        device = device_of(self)
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
