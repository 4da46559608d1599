"""ONNX Runtime serving: session factory and a denoiser that stands in for the pipeline's U-Net.

:class:`OrtDenoiser` is a ``torch.nn.Module`` with the U-Net's call signature and output type, so
diffusers' own sampler runs with the engine inside (``generate`` and ``eval`` share one sampler
for the baseline and the engine). The adapter turns the pipeline's call into the named engine
inputs, so the same class serves every model family.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from adm_export.errors import InvalidInputError, require

logger = logging.getLogger(__name__)


def providers_for(device: str) -> list:
    """Execution providers for ``cpu`` or ``cuda`` (CUDA falls back to CPU for unsupported ops)."""
    ort = require("onnxruntime", "gpu" if device == "cuda" else "test", "ONNX Runtime serving")
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise InvalidInputError(
                f"--device cuda needs ONNX Runtime's CUDA provider, but only {available} are available; "
                "install onnxruntime-gpu (pip install 'adm-export[gpu]') or use --device cpu"
            )
        return [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path: str | Path, device: str = "cpu", threads: int = 0, optimized_path: str | Path | None = None):
    """Create an ONNX Runtime inference session.

    Args:
        path: ONNX file.
        device: ``cpu`` or ``cuda``.
        threads: Intra-op threads; 0 lets ONNX Runtime choose (all cores).
        optimized_path: If given, ONNX Runtime writes its optimised graph there.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
    if threads:
        opts.intra_op_num_threads = threads
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers_for(device))


class OrtRunner:
    """Runs a session on named numpy inputs, casting to the dtypes the graph declares."""

    _NP = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
           "tensor(int32)": "int32"}

    def __init__(self, session):
        self.session = session
        self.input_types = {i.name: self._NP.get(i.type, "float32") for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]

    def __call__(self, inputs: dict[str, Any]):
        import numpy as np

        feed = {}
        for name, value in inputs.items():
            if name not in self.input_types:
                continue
            arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            feed[name] = np.ascontiguousarray(arr.astype(self.input_types[name], copy=False))
        return self.session.run(self.output_names, feed)[0]


def make_ort_denoiser(adapter, session):
    """An ``nn.Module`` that replaces ``adapter.denoiser`` and runs ``session`` instead."""
    import torch

    original = adapter.denoiser

    class OrtDenoiser(torch.nn.Module):
        """The pipeline's denoiser, served by ONNX Runtime."""

        def __init__(self):
            super().__init__()
            self.runner = OrtRunner(session)
            # The pipeline reads config (in_channels, sample_size), dtype and device.
            self.config = original.config
            self._dtype = next(original.parameters()).dtype
            self.calls = 0

        @property
        def dtype(self):
            return self._dtype

        @property
        def device(self):
            return torch.device("cpu")

        def forward(self, *args, **kwargs):
            inputs = adapter.inputs_from_call(args, kwargs)
            out = torch.from_numpy(self.runner(inputs)).to(inputs[next(iter(inputs))].device)
            self.calls += 1
            if kwargs.get("return_dict", True) is False:
                return (out,)
            return adapter.wrap_output(out)

    return OrtDenoiser()
