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


def set_classic_attention(module) -> int:
    """Make ``module``'s attention layers compute ``softmax(q k^T * scale) v`` with explicit batched matmuls.

    diffusers' classic ``AttnProcessor`` (``baddbmm`` -> softmax -> ``bmm``) instead of the default
    ``scaled_dot_product_attention``: the same arithmetic, in the form ModelOpt's attention
    quantizers intercept (its ``Attention`` wrapper quantizes the inputs of ``torch.baddbmm`` and
    ``torch.bmm``; the fused SDPA path exports only FP8) and that exports as plain MatMul nodes
    whose inputs can carry Q/DQ. Modules outside diffusers opt in with a ``classic_attention``
    attribute. Changes the module in place (callers pass their own copy).

    Returns:
        The number of attention layers switched.
    """
    n = 0
    if hasattr(module, "set_attn_processor") and hasattr(module, "attn_processors"):
        from diffusers.models.attention_processor import AttnProcessor

        n += len(module.attn_processors)
        module.set_attn_processor(AttnProcessor())
    for m in module.modules():
        if hasattr(m, "classic_attention"):
            m.classic_attention = True
            n += 1
    return n
