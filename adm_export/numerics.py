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
    """Relative L2 error ``||a - b|| / ||b||`` (float64)."""
    a = a.detach().double()
    b = b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_denoiser(adapter, module, inputs: dict):
    """One denoiser call on named inputs (spec order), returning the output tensor."""
    import torch

    with torch.inference_mode():
        return adapter.export_module(module)(*inputs.values())
