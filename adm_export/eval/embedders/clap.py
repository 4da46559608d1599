"""``clap``: LAION CLAP audio embeddings through ``transformers`` from a local checkpoint folder,
and the CLAP score (text-audio cosine) of the eval stage."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from adm_export.audio import prepare_clips
from adm_export.errors import InvalidInputError
from adm_export.eval.embedders.base import CHECKPOINT_FLAG, Embedder


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


def clap_scores(checkpoint: str, prompts: Sequence[str], sets: dict[str, Sequence[np.ndarray]], sr: int,
                device: str = "cpu", embedder=None) -> dict[str, float]:
    """CLAP score of each set: mean cosine similarity between a clip and its prompt's text.

    Args:
        checkpoint: Local ``ClapModel`` folder with its feature extractor and tokenizer.
        prompts: Prompt of each clip (every set is paired with ``prompts`` by index).
        sets: Clips by set name.
        sr: Sampling rate of the clips.
        device: ``cpu`` or ``cuda``.
        embedder: An already loaded :class:`~adm_export.eval.embedders.ClapAudioEmbedder` to reuse.

    Returns:
        ``{set name: mean cosine}`` (in [-1, 1]; higher means the audio matches its text better).

    Raises:
        InvalidInputError: The folder is not a loadable CLAP model or has no tokenizer.
    """
    import torch
    from transformers import AutoTokenizer

    if not Path(checkpoint).is_dir():
        raise InvalidInputError(
            f"--clap-checkpoint {checkpoint!r} is not a folder; give a local ClapModel folder (weights cannot be "
            "downloaded here)"
        )
    audio = embedder if isinstance(embedder, ClapAudioEmbedder) else ClapAudioEmbedder(checkpoint, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(
            f"--clap-checkpoint {checkpoint!r} has no usable tokenizer (needed for the CLAP score): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    with torch.inference_mode():
        tokens = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(audio.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        text = audio.model.get_text_features(**tokens)
        if not isinstance(text, torch.Tensor):  # transformers >= 5: a model output
            text = text.pooler_output
        text = text.double().cpu().numpy()
    text /= np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    scores = {}
    for name, waves in sets.items():
        a = audio.embed(waves, sr)
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        scores[name] = float(np.mean(np.sum(a * text[: len(a)], axis=1)))
    return scores
