"""Model loading: embedded names, local diffusers folders and hub ids, each to its family's adapter."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from adm_export.errors import ModelNotFoundError
from adm_export.models.base import DenoiserSpec, ModelAdapter, TensorSpec

logger = logging.getLogger(__name__)

# diffusers pipeline class name -> adapter family
_PIPELINE_FAMILIES = {"AudioLDMPipeline": "audioldm", "AudioLDM2Pipeline": "audioldm2"}

# family -> "module:AdapterClass"
_ADAPTERS = {
    "audioldm2": "adm_export.models.audioldm2:AudioLDM2Adapter",
    "tango": "adm_export.models.tango:TangoAdapter",
    "make_an_audio": "adm_export.models.make_an_audio:MakeAnAudioAdapter",
}

# Local folders in a family's own published layout (not diffusers folders):
# family -> (module, detector(path) -> bool, loader(path) -> pipeline)
_FOLDER_FORMATS = {
    "tango": ("adm_export.models.tango", "is_tango_folder", "load_tango_folder"),
    "make_an_audio": ("adm_export.models.make_an_audio.checkpoint", "is_make_an_audio_folder",
                      "load_make_an_audio_folder"),
}


def _adapter_class(family: str) -> type[ModelAdapter]:
    if family == "audioldm":
        from adm_export.models.audioldm import AudioLDMAdapter

        return AudioLDMAdapter
    if family in _ADAPTERS:
        import importlib

        module, name = _ADAPTERS[family].split(":")
        return getattr(importlib.import_module(module), name)
    raise ModelNotFoundError(
        f"model family {family!r} is not supported yet; supported: {', '.join(['audioldm', *_ADAPTERS])}"
    )


def model_defaults(model_id: str | None) -> dict:
    """Defaults of options the user did not give that depend on the model.

    Returns:
        ``{"captions": seed captions file or None (built-in captions), "embedder": FD embedder name}``:
        the reference model's in-domain captions and ``reference-clap``; for every other model the
        built-in AudioCaps-style captions and the weight-free ``logmel``.
    """
    from adm_export.models.embedded import MODEL_DEFAULTS

    found = MODEL_DEFAULTS.get(str(model_id), {})
    captions = None
    if found.get("captions"):
        from adm_export.models.reference import REFERENCE_DIR

        captions = str(REFERENCE_DIR / found["captions"])
    return {"captions": captions, "embedder": found.get("embedder", "logmel")}


def embedded_names() -> list[str]:
    from adm_export.models.embedded import EMBEDDED

    return sorted(EMBEDDED)


def load_model(model_id: str, device: str = "cpu", revision: str | None = None) -> ModelAdapter:
    """Load a model by embedded name, local diffusers folder or hub id.

    Args:
        model_id: ``tiny-audioldm`` (embedded), a folder written by ``save_pretrained``, or a hub
            id such as ``cvssp/audioldm-s-full-v2``.
        device: ``cpu`` or ``cuda``.
        revision: Hub revision (branch, tag or commit).

    Returns:
        The family's adapter around the loaded pipeline (float32).

    Raises:
        ModelNotFoundError: Unknown name, a folder that is not a supported diffusers pipeline, or
            a hub id that cannot be reached.
        InvalidInputError: ``device`` is ``cuda`` and torch sees no CUDA GPU.
    """
    from adm_export.devices import check_device
    from adm_export.models.embedded import EMBEDDED

    check_device(device, index=True)
    if model_id in EMBEDDED:
        family, build = EMBEDDED[model_id]
        pipeline = build()
    else:
        found = _load_published_folder(model_id)
        family, pipeline = found if found is not None else _load_pretrained(model_id, revision)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    return _adapter_class(family)(model_id, pipeline, revision)


def _load_published_folder(model_id: str):
    """``(family, pipeline)`` for a local folder in a family's published layout, else None."""
    import importlib

    path = Path(model_id)
    if not path.is_dir() or (path / "model_index.json").exists():
        return None
    for family, (module, detect, load) in _FOLDER_FORMATS.items():
        mod = importlib.import_module(module)
        if getattr(mod, detect)(path):
            return family, getattr(mod, load)(path)
    return None


def _load_pretrained(model_id: str, revision: str | None):
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlogging

    path = Path(model_id)
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(
                f"--model {model_id!r} is a local path but not a diffusers pipeline folder (no "
                f"model_index.json) nor a TANGO or Make-An-Audio folder in its published layout (README); save one "
                f"with pipeline.save_pretrained(DIR) or use --model tiny-audioldm"
            )
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelNotFoundError(f"--model {model_id!r}: model_index.json is not a pipeline index ({exc})") from None
    else:
        class_name = None
    if class_name is not None and class_name not in _PIPELINE_FAMILIES:
        raise ModelNotFoundError(
            f"--model {model_id!r} holds a {class_name}, which adm-export does not support; "
            f"supported pipelines: {', '.join(_PIPELINE_FAMILIES)}"
        )
    from transformers.utils import logging as tlogging

    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    # Loading bars of diffusers and transformers would interleave with ours (and fill CI logs).
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        import torch

        # Every stage starts from float32 (calibration statistics, fake quant, the FP32 size);
        # without a dtype, transformers keeps an FP16 checkpoint's dtype for its components.
        pipeline = DiffusionPipeline.from_pretrained(model_id, revision=revision, dtype=torch.float32)
    except Exception as exc:  # hub errors come as OSError, HTTP errors or ValueError
        hint = "" if path.exists() else (
            " (not an embedded name, not a local folder, and the hub could not be reached or has no such repo)"
        )
        raise ModelNotFoundError(
            f"could not load --model {model_id!r}{hint}: {str(exc).splitlines()[0][:200]}; pass a "
            f"local diffusers folder or an embedded model ({', '.join(embedded_names())})"
        ) from exc
    finally:
        dlogging.set_verbosity(verbosity)
        dlogging.enable_progress_bar()
        tlogging.enable_progress_bar()
    _own_aligned_memory(pipeline)
    family = _PIPELINE_FAMILIES.get(type(pipeline).__name__)
    if family is None:
        raise ModelNotFoundError(
            f"--model {model_id!r} is a {type(pipeline).__name__}, which adm-export does not support; "
            f"supported pipelines: {', '.join(_PIPELINE_FAMILIES)}"
        )
    return family, pipeline


def _own_aligned_memory(pipeline) -> None:
    """Copy every weight of a loaded pipeline into memory of its own.

    transformers 5 hands out tensors that view the memory-mapped safetensors file at arbitrary
    offsets (seen: 40 bytes past a 64-byte boundary); MKL then takes its unaligned GEMM path, which
    sums in another order, so a model loaded from a folder gave outputs 3e-8 away from the same
    weights built in memory. A fresh allocation is aligned: the same weights give the same bits.
    """
    import torch

    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in (*component.parameters(), *component.buffers()):
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


__all__ = ["DenoiserSpec", "ModelAdapter", "TensorSpec", "embedded_names", "load_model", "model_defaults"]
