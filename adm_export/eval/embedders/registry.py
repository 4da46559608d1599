"""The registry of ``--embedder`` names, the factory, and loading of pretrained weights.

:func:`get_embedder` builds an embedder by registry name and checks its checkpoint (one-line
errors naming ``--embedder-checkpoint``). The networks are imported only when built, so importing
the registry imports no torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from adm_export.devices import check_device
from adm_export.errors import InvalidInputError
from adm_export.eval.embedders.base import CHECKPOINT_FLAG, Embedder

logger = logging.getLogger(__name__)

#: Embedder names (the CLI's ``--embedder`` choices) and what each one is.
EMBEDDERS: dict[str, str] = {
    "logmel": "weight-free log-mel statistics (16 kHz, 64 mels); signal-level drift, no semantics",
    "panns-cnn14": "PANNs Cnn14 16 kHz (2048-d fc1 + 527 AudioSet logits); audioldm_eval FD/KL/IS",
    "vggish": "VGGish (128-d per 0.96 s frame); FAD as audioldm_eval computes it",
    "clap": "LAION CLAP audio tower via transformers (48 kHz); needs a local checkpoint folder",
    "reference-clap": "audio encoder trained with reference-audioldm (192-d + 10-class head); shipped weights",
}


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
        from adm_export.eval.embedders.logmel import LogMelEmbedder

        return LogMelEmbedder()

    check_device(device, index=True)
    if key == "reference-clap":
        from adm_export.eval.embedders.reference_clap import ReferenceClapEmbedder

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
        from adm_export.eval.embedders.clap import ClapAudioEmbedder

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

    if key == "panns-cnn14":
        from adm_export.eval.embedders.panns import PANNsCNN14 as network
    else:
        from adm_export.eval.embedders.vggish import VGGish as network
    module = network()
    load_weights(module, path, key)
    module.to(device)
    module.eval()
    logger.info("embedder %s loaded from %s on %s", key, path, device)
    return module
