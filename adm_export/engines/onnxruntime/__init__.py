"""ONNX Runtime serving: sessions, the CUDA engine's graph passes (fusions), and the pipeline denoiser.

* :mod:`.sessions`: :class:`OrtOptions` (provider, IO binding, CUDA graphs, NHWC, cuDNN search),
  :func:`make_session`, :class:`OrtRunner`, graph/option checks. No torch.
* :mod:`.engine`: :class:`OrtEngine` (IO binding, one CUDA-graph session per input shape).
* :mod:`.fusions`: the CUDA serving graph: quantized weights dequantized, activation Q/DQ dropped,
  ONNX Runtime's diffusion optimizer (attention, GroupNorm, NHWC convolution fusions), FP16.
* :mod:`.cuda`: the ``engine`` stage's CUDA path (build, count, check parity against torch).
* :mod:`.denoiser`: :func:`make_ort_denoiser`, the ``nn.Module`` that replaces the U-Net.

Names are loaded on first use (PEP 562), so importing the package imports neither torch nor
onnxruntime.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "PROVIDERS": "sessions", "CUDA_ONLY_OPS": "sessions", "GraphInfo": "sessions", "OrtOptions": "sessions",
    "OrtRunner": "sessions", "check_graph_serves": "sessions", "graph_info": "sessions",
    "make_session": "sessions", "providers_for": "sessions", "session_options": "sessions",
    "tensorrt_provider_problem": "sessions", "torch_dtype": "sessions",
    "OrtEngine": "engine",
    "OrtDenoiser": "denoiser", "make_ort_denoiser": "denoiser",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES))
