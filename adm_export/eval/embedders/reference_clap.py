"""``reference-clap``: the reference model's trained audio encoder as an evaluation embedder.

The audio tower of the CLAP-style pair trained with the reference model on the procedural corpus
(``adm_export/data/reference/reference_clap.safetensors``): its 192-d clip embedding is what FD
is computed on, its class head (the corpus's 10 sound classes) gives the logits of KL and
class accuracy. It knows the procedural world only: numbers on other audio mean little.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from adm_export.audio import prepare_clips
from adm_export.eval.embedders.base import Embedder
from adm_export.models import reference_components as C
from adm_export.models.reference import REFERENCE_DIR


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """FD between two embedding sets (the project's implementation, eigendecomposition cross-checked)."""
    from adm_export.eval.fd import frechet_distance as fd

    return float(fd(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)))


class ReferenceClapEmbedder(Embedder):
    """Trained audio encoder of the reference model: 192-d embeddings and 10-class logits.

    Args:
        folder: Folder holding ``reference_clap.safetensors`` (default: the shipped model).
        device: ``cpu`` or ``cuda``.
        batch_size: Clips per forward pass.
    """

    name = "reference-clap"
    sampling_rate = C.SAMPLING_RATE
    weight_free = False
    description = (
        "Audio encoder trained with the reference model on the procedural corpus (AudioLDM log-mel, "
        "192-d embedding, 10-class head): semantic for that corpus only, not comparable with "
        "published FD/FAD numbers."
    )

    def __init__(self, folder: str | Path | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        import torch
        from safetensors.torch import load_file

        from adm_export.errors import InvalidInputError

        folder = Path(folder) if folder is not None else REFERENCE_DIR
        path = folder / "reference_clap.safetensors"
        if not path.is_file():
            raise InvalidInputError(
                f"reference-clap weights not found at {str(path)!r}; reinstall adm-export or give "
                "--embedder-checkpoint DIR holding reference_clap.safetensors"
            )
        meta = json.loads((folder / "reference_clap.json").read_text())
        self.classes = list(meta["classes"])
        self.model = C.build_audio_encoder()
        sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        self.model.load_state_dict(sd, strict=True)
        self.model.eval().to(device)
        self.device = device
        self.batch_size = batch_size
        self.dim = int(C.AUDIO_ENCODER_CONFIG["embed_dim"])
        self._torch = torch

    def _forward(self, waveforms: Sequence[np.ndarray], sr: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        clips = prepare_clips(waveforms, sr, self.sampling_rate)
        embs, logits = [], []
        with torch.inference_mode():
            # Clips of one length batch together; others go one by one (no padding artefacts).
            for s in range(0, len(clips), self.batch_size):
                part = clips[s:s + self.batch_size]
                groups = [part] if len({c.size for c in part}) == 1 else [[c] for c in part]
                for grp in groups:
                    w = torch.from_numpy(np.stack(grp).astype(np.float32)).to(self.device)
                    e, _, heads = self.model(C.log_mel(w))
                    embs.append(e.double().cpu().numpy())
                    logits.append(heads["class"].double().cpu().numpy())
        return np.concatenate(embs), np.concatenate(logits)

    def embed(self, waveforms: Sequence[np.ndarray], sr: int) -> np.ndarray:
        return self._forward(waveforms, sr)[0]

    def logits(self, waveforms: Sequence[np.ndarray], sr: int) -> np.ndarray:
        return self._forward(waveforms, sr)[1]

    def embed_and_logits(self, waveforms, sr):
        return self._forward(waveforms, sr)

    def probabilities(self, waveforms: Sequence[np.ndarray], sr: int) -> np.ndarray:
        """``(N, 10)`` class probabilities (softmax of the class head), classes in :attr:`classes` order."""
        z = self.logits(waveforms, sr)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, waveforms: Sequence[np.ndarray], sr: int) -> list[str]:
        """Predicted class name per clip."""
        return [self.classes[i] for i in self.logits(waveforms, sr).argmax(axis=1)]
