"""Audio embedders for Fréchet distance: a weight-free default and the field's pretrained networks.

* ``logmel`` (:class:`LogMelEmbedder`): deterministic log-mel statistics, no weights, always
  available. It measures signal-level drift (spectral balance, loudness, noise, temporal
  texture) and is what the quality gate uses when no pretrained weights are present.
* ``panns-cnn14`` (:class:`PANNsCNN14`): PANNs Cnn14, 16 kHz variant, as audioldm_eval uses it
  for FD (2048-d ``fc1`` embedding) and for KL / IS (527 AudioSet logits).
* ``vggish`` (:class:`VGGish`): the VGGish network of FAD (128-d per 0.96 s frame).
* ``clap`` (:class:`ClapAudioEmbedder`): LAION CLAP audio tower through ``transformers``.
* ``reference-clap`` (:class:`ReferenceClapEmbedder`): the reference model's trained audio encoder.

The pretrained networks cannot be downloaded here: they load a local checkpoint given with
``--embedder-checkpoint`` (or found in audioldm_eval's / torch hub's cache). Their state-dict key
names and shapes follow the public checkpoints (``Cnn14_16k_mAP=0.438.pth``, torchvggish's
``vggish-10086976.pth``) so those files load with ``strict=True``.

One module per network (``logmel``, ``panns``, ``vggish``, ``clap``, ``reference_clap``); the
interface in ``base``; names, factory and weight loading in ``registry``. torch is imported
lazily: ``import adm_export.eval.embedders`` does not import it; :class:`PANNsCNN14`,
:class:`VGGish` and :class:`ReferenceClapEmbedder` are imported on first access (PEP 562).
"""

from __future__ import annotations

import importlib

from adm_export.eval.embedders.base import CHECKPOINT_FLAG, Embedder
from adm_export.eval.embedders.clap import ClapAudioEmbedder
from adm_export.eval.embedders.logmel import LogMelEmbedder
from adm_export.eval.embedders.registry import EMBEDDERS, get_embedder, load_weights

__all__ = ["CHECKPOINT_FLAG", "EMBEDDERS", "ClapAudioEmbedder", "Embedder", "LogMelEmbedder", "PANNsCNN14",
           "ReferenceClapEmbedder", "VGGish", "get_embedder", "load_weights"]

# Classes whose modules import torch: name -> submodule, imported on first access.
_LAZY = {"PANNsCNN14": "panns", "VGGish": "vggish", "ReferenceClapEmbedder": "reference_clap"}


def __getattr__(name: str):  # PEP 562
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
