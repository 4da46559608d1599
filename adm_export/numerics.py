"""Shared numerics of the quantize and export stages: the error measure, one denoiser call, ModelOpt.

One home for what the quantize stage, the sensitivity search and the export's parity check all
use (they imported each other for it before). torch and ModelOpt are imported inside the functions.
"""

from __future__ import annotations

import warnings

from adm_export.errors import require


def import_modelopt():
    """``(modelopt.torch.quantization, modelopt.torch.opt)``; ImportError naming the extra if missing."""
    with warnings.catch_warnings():
        # ModelOpt warns about untested transformers versions on import; not actionable here.
        warnings.simplefilter("ignore")
        require("modelopt.torch.opt", "nvidia-modelopt", "quantization")
        import modelopt.torch.opt as mto
        import modelopt.torch.quantization as mtq
    return mtq, mto


def rel_l2(a, b) -> float:
    """Relative L2 error ``||a - b|| / ||b||`` (float64, on the CPU: ``a`` and ``b`` may live on
    different devices, e.g. an ONNX Runtime output on the host against a torch output on the GPU)."""
    import torch

    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_denoiser(adapter, module, inputs: dict):
    """One denoiser call on named inputs (spec order), returning the output tensor.

    The inputs (typically cached on the CPU) are moved to the module's device and dtype first
    (:func:`adm_export.devices.to_module`); the output stays on the module's device.
    """
    import torch

    from adm_export.devices import to_module

    with torch.inference_mode():
        return adapter.export_module(module)(*to_module(inputs, module).values())
