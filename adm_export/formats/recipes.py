"""Quantization presets as data, in ModelOpt's ``quant_cfg`` shape.

The presets themselves are policies (:mod:`adm_export.formats.policy`): an ordered rule list,
later wins: the format everywhere, then the exclusions, each with the reason it is kept in high
precision. This module keeps the preset-level entry points the other stages call.
"""

from __future__ import annotations

import enum

from adm_export.formats import policy as _policy
from adm_export.formats.policy import HIGH_PRECISION_LAYERS  # noqa: F401  (re-exported)


class Precision(str, enum.Enum):
    """Quantization presets (``--precision``)."""

    INT8 = "int8"
    FP8 = "fp8"
    W4A8 = "w4a8"
    MIXED = "mixed"


# Only convolutions and linear layers are quantized: their inputs and weights carry Q/DQ
# (ModelOpt would otherwise also put input quantizers on normalisation layers, which no
# engine runs in INT8 and which only add error).
_COMPUTE_CLASSES = ("nn.Conv2d", "nn.Linear")


def _formats(precision: Precision) -> dict:
    """What a preset's format means in bits (from the policy's one table), for manifests."""
    if precision == Precision.MIXED:
        return {"search": "per layer among fp16/int8/fp8/w4a8 under --size-budget"}
    weight, act = _policy.ENCODINGS[_policy.Format(precision.value)]
    out = {"weight": _policy.quantizer_cfg(weight, "weight"), "input": _policy.quantizer_cfg(act, "input")}
    if weight == "int4":
        out["convolutions"] = "int8 (no INT4 convolution in TensorRT)"
    return out


def quant_config(precision: Precision | str) -> dict:
    """The model-free ModelOpt config of a preset.

    For ``mixed`` the formats are chosen per layer by the sensitivity search, so the searched
    layers compile to disabled quantizers here; the quantize stage resolves the policy on the
    model instead (``policy.resolve`` + ``policy.compile_quant_cfg``).

    Args:
        precision: Preset name.

    Returns:
        ``{"quant_cfg": [...], "algorithm": "max"}`` ready for ``mtq.quantize``.

    Raises:
        InvalidInputError: Unknown preset.
    """
    precision = Precision(precision)
    return _policy.compile_pattern_cfg(_policy.preset(precision.value))


def describe(precision: Precision | str, policy=None) -> dict:
    """A readable summary of a preset (or of a user policy) for manifests and reports."""
    precision = Precision(precision)
    pol = policy or _policy.preset(precision.value)
    return {
        "precision": precision.value,
        "policy": pol.to_dict(),
        "formats": _formats(precision),
        "quantized_classes": list(_COMPUTE_CLASSES),
        "high_precision": [{"pattern": r.pattern, "why": r.why} for r in pol.rules if r.format.value == "fp16"],
    }
