"""Loading the shipped reference model (``reference-audioldm``)."""

from __future__ import annotations

from pathlib import Path

#: Folder of the shipped reference model (``audioldm/`` pipeline, embedder weights, log, card).
REFERENCE_DIR = Path(__file__).resolve().parent.parent / "data" / "reference"


def load_reference_pipeline(folder: str | Path | None = None):
    """The trained reference ``AudioLDMPipeline`` in float32 on the CPU, in eval mode.

    Args:
        folder: A result folder of ``benchmarks/train_reference.py`` (holding ``audioldm/``);
            default: the one shipped in the package.

    Raises:
        ModelNotFoundError: The folder has no ``audioldm/model_index.json``.
    """
    import torch
    from diffusers import AudioLDMPipeline
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    from adm_export.errors import ModelNotFoundError

    path = Path(folder) if folder is not None else REFERENCE_DIR
    if not (path / "audioldm" / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"reference model not found at {str(path / 'audioldm')!r}; reinstall adm-export (package data) "
            "or use --model tiny-audioldm"
        )
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # AudioLDMPipeline's deprecation notice on every load
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        # Weights are stored in FP16; every adm-export stage starts from the float32 model.
        pipe = AudioLDMPipeline.from_pretrained(path / "audioldm", dtype=torch.float32)
    finally:
        dlogging.set_verbosity(verbosity)
        dlogging.enable_progress_bar()
        tlogging.enable_progress_bar()
    for name in ("unet", "vae", "text_encoder", "vocoder"):
        getattr(pipe, name).eval()
    return pipe
