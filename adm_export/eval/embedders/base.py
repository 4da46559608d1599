"""The embedder interface: what every embedder (one module per network next to this one) provides."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

#: The flag that gives an embedder its weights (named by every checkpoint error).
CHECKPOINT_FLAG = "--embedder-checkpoint"


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


def device_of(module) -> Any:
    """The device of a torch module's parameters."""
    return next(module.parameters()).device
