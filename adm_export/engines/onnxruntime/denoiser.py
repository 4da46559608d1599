"""The pipeline's denoiser served by ONNX Runtime: a ``torch.nn.Module`` with the U-Net's call signature.

:func:`make_ort_denoiser` wraps an :class:`~adm_export.engines.onnxruntime.engine.OrtEngine` so
diffusers' own sampler runs with the engine inside (``generate`` and ``eval`` share one sampler
for the baseline and the engine). The adapter turns the pipeline's call into the named engine
inputs, so the same class serves every model family. Imports torch (this module is loaded lazily
by the package).
"""

from __future__ import annotations

from pathlib import Path

import torch

from adm_export.engines.onnxruntime.engine import OrtEngine
from adm_export.engines.onnxruntime.sessions import OrtOptions


class OrtDenoiser(torch.nn.Module):
    """The pipeline's denoiser, served by ONNX Runtime.

    Args:
        adapter: The model adapter whose denoiser this replaces.
        engine: The engine that computes each step.
    """

    def __init__(self, adapter, engine: OrtEngine):
        super().__init__()
        original = adapter.denoiser
        self.adapter = adapter
        self.engine = engine
        # The pipeline reads config (in_channels, sample_size), dtype and device.
        self.config = original.config
        self._dtype = next(original.parameters()).dtype
        self._device = torch.device("cuda", engine.options.device_id) if engine.options.on_gpu else torch.device("cpu")

    @property
    def runner(self):  # kept for callers of the first version
        return self.engine._runner

    @property
    def calls(self) -> int:
        return self.engine.calls

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    def forward(self, *args, **kwargs):
        inputs = self.adapter.inputs_from_call(args, kwargs)
        sample = inputs[next(iter(inputs))]
        out = self.engine(inputs).to(device=sample.device, dtype=sample.dtype)
        if kwargs.get("return_dict", True) is False:
            return (out,)
        return self.adapter.wrap_output(out)


def make_ort_denoiser(adapter, session_or_engine, options: OrtOptions | None = None, path: str | Path | None = None):
    """An ``nn.Module`` that replaces ``adapter.denoiser`` and runs ONNX Runtime instead.

    Args:
        adapter: The model adapter whose denoiser is replaced.
        session_or_engine: An :class:`OrtEngine`, an ``InferenceSession``, or ``None`` with ``path``.
        options: Session settings when an engine is built here.
        path: ONNX file when an engine is built here.

    Returns:
        A module with the denoiser's call signature; it returns the output in the dtype of the
        pipeline's ``sample`` (an FP16 engine serves an FP32 pipeline and vice versa).
    """
    if isinstance(session_or_engine, OrtEngine):
        engine = session_or_engine
    elif session_or_engine is not None:
        engine = OrtEngine(path or "<session>", adapter.denoiser_spec(), options, session=session_or_engine)
    else:
        engine = OrtEngine(path, adapter.denoiser_spec(), options)
    return OrtDenoiser(adapter, engine)
