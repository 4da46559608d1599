"""Quantization presets as data, in ModelOpt's ``quant_cfg`` shape.

Each preset is an ordered list of ``{"quantizer_name", "parent_class", "cfg", "enable"}`` entries
where a later entry wins: deny everything, enable the formats on the layer classes we want, then
the exclusions, each with the reason it is kept in high precision.
"""

from __future__ import annotations

import copy

from adm_export.config import Precision
from adm_export.errors import InvalidInputError

# Layers NVIDIA's diffusion recipe (ModelOpt's diffusers example) keeps in high precision.
# Patterns are fnmatch wildcards on quantizer names ("<module path>.<which>_quantizer").
HIGH_PRECISION_LAYERS = [
    # Timestep and class (CLAP text) embeddings: tiny GEMMs whose error shifts every block.
    ("*time_embedding*", "timestep embedding MLP: negligible compute, feeds every resnet"),
    ("*time_emb_proj*", "per-resnet timestep projection: a few FLOPs, conditions the whole block"),
    ("*class_embedding*", "CLAP text projection (AudioLDM's conditioning)"),
    ("*add_embedding*", "added conditioning embeddings"),
    # First and last convolutions: they see the raw latent / produce the noise estimate directly.
    ("*conv_in*", "first conv: sees the raw latent, few channels"),
    ("*conv_out*", "last conv: writes the noise prediction itself"),
    # 1x1 skip projections of resnets: carry the residual stream between widths.
    ("*conv_shortcut*", "residual skip projection"),
    ("*norm_out*", "output normalisation"),
]

# Only convolutions and linear layers are quantized: their inputs and weights carry Q/DQ
# (ModelOpt would otherwise also put input quantizers on normalisation layers, which no
# engine runs in INT8 and which only add error).
_COMPUTE_CLASSES = ("nn.Conv2d", "nn.Linear")

_FORMATS = {
    Precision.INT8: {"weight": {"num_bits": 8, "axis": 0}, "input": {"num_bits": 8, "axis": None}},
}


def quant_config(precision: Precision | str) -> dict:
    """The ModelOpt config of a preset.

    Args:
        precision: Preset name.

    Returns:
        ``{"quant_cfg": [...], "algorithm": "max"}`` ready for ``mtq.quantize``.

    Raises:
        InvalidInputError: The preset is not implemented in this version.
    """
    precision = Precision(precision)
    fmt = _FORMATS.get(precision)
    if fmt is None:
        available = ", ".join(p.value for p in _FORMATS)
        raise InvalidInputError(
            f"--precision {precision.value!r} is not available in this version yet; available: {available}"
        )
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for cls in _COMPUTE_CLASSES:
        entries.append({"quantizer_name": "*weight_quantizer", "parent_class": cls, "cfg": copy.deepcopy(fmt["weight"])})
        entries.append({"quantizer_name": "*input_quantizer", "parent_class": cls, "cfg": copy.deepcopy(fmt["input"])})
    for pattern, _why in HIGH_PRECISION_LAYERS:
        entries.append({"quantizer_name": pattern, "enable": False})
    return {"quant_cfg": entries, "algorithm": "max"}


def describe(precision: Precision | str) -> dict:
    """A readable summary of a preset for manifests and reports."""
    precision = Precision(precision)
    return {
        "precision": precision.value,
        "formats": copy.deepcopy(_FORMATS.get(precision)),
        "quantized_classes": list(_COMPUTE_CLASSES),
        "high_precision": [{"pattern": p, "why": w} for p, w in HIGH_PRECISION_LAYERS],
    }
