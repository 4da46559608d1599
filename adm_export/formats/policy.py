"""Quantization policies: layer-name patterns -> per-layer formats, as data.

A policy is an ordered list of rules in ModelOpt's ``quant_cfg`` shape (later wins, fnmatch
wildcards), except that each rule names a *format* instead of a raw quantizer config::

    {
      "name": "my-policy",
      "int4_convs": false,
      "quant_cfg": [
        {"quantizer_name": "*", "format": "int8"},
        {"quantizer_name": "*attn*", "format": "fp8", "parent_class": "nn.Linear"},
        {"quantizer_name": "*ff.net*", "format": "w4a8"},
        {"quantizer_name": "*conv_in*", "format": "fp16", "why": "sees the raw latent"}
      ]
    }

``quantizer_name`` matches the *layer* (module) name, e.g. ``down_blocks.1.attentions.0.proj_in``
(a ModelOpt-style quantizer name such as ``*attn*.weight_quantizer`` is accepted too: the
``.weight_quantizer``/``.input_quantizer`` suffix is dropped). ``parent_class`` restricts a
rule to ``nn.Conv2d`` or ``nn.Linear``. Only convolutions and linear layers are quantized.

Formats (one per layer):

``fp16``   kept in high precision (weights stored in FP16).
``int8``   W8A8: per-output-channel INT8 weights, per-tensor INT8 activations.
``fp8``    W8A8 in FP8 E4M3: per-tensor weights and activations (compute capability >= 8.9).
``w4a8``   INT4 weights in blocks of up to 128 along the *input* axis (the GEMM's K: never along a
           3-wide kernel axis), per-tensor INT8 activations. Only linear layers get INT4: a
           convolution asked for ``w4a8`` falls back to ``int8`` (TensorRT has no INT4
           convolution), unless the policy sets ``"int4_convs": true``, which gives convolutions
           INT4 weights blocked along their input channels (ONNX Runtime targets only).
``w4a16``  INT4 weights as above, activations unquantized (TensorRT's weight-only INT4);
           a convolution falls back to ``fp16`` unless ``int4_convs``.
``auto``   chosen per layer by the sensitivity search among the rule's ``candidates``
           (``--precision mixed``).

:func:`resolve` turns a policy into a :class:`LayerPlan` per layer of a model (what each layer
gets and why); :func:`compile_quant_cfg` turns plans into the ModelOpt config, one exact entry
per layer after a deny-all entry, so ModelOpt's own wildcard resolution cannot disagree with ours.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
from pathlib import Path
from typing import Any, Iterable

from adm_export.errors import InvalidInputError


class Format(str, enum.Enum):
    """Per-layer formats a policy can ask for."""

    FP16 = "fp16"
    INT8 = "int8"
    FP8 = "fp8"
    W4A8 = "w4a8"
    W4A16 = "w4a16"
    AUTO = "auto"


CONV, LINEAR = "conv", "linear"
_CLASSES = {"nn.Conv2d": CONV, "nn.Linear": LINEAR, "Conv2d": CONV, "Linear": LINEAR}
INT4_BLOCK = 128
# Smaller blocks are used where a layer's input axis is not a multiple of 128 (tiny models);
# ONNX Runtime's blocked INT4 kernels want a power of two >= 16.
_BLOCK_CHOICES = (128, 64, 32, 16)
DEFAULT_CANDIDATES = (Format.FP16, Format.INT8, Format.FP8, Format.W4A8)

#: Per format: (weight encoding, activation encoding); ``None``: not quantized. The one table of what a
#: format means in bits; :func:`quantizer_cfg` gives each encoding's ModelOpt config.
ENCODINGS: dict[Format, tuple[str, str | None]] = {
    Format.FP16: ("fp16", None),
    Format.INT8: ("int8", "int8"),
    Format.FP8: ("fp8", "fp8"),
    Format.W4A8: ("int4", "int8"),
    Format.W4A16: ("int4", None),
    Format.AUTO: ("fp16", None),  # until the search decides
}


def quantizer_cfg(encoding: str | None, role: str, kind: str = LINEAR, block: int | None = INT4_BLOCK) -> dict | None:
    """ModelOpt attribute config of one quantizer (``None``: disabled).

    Args:
        encoding: ``int8``, ``fp8``, ``int4`` (weights only), ``fp16`` or ``None`` (not quantized).
        role: ``weight`` (INT8 per output channel) or ``input``/``output`` (per tensor).
        kind: ``conv`` or ``linear``: where INT4 blocks run (the input axis: the last axis of a linear
            weight (out, in), axis 1 of a conv weight (out, in, kh, kw), never a 3-wide kernel axis).
        block: INT4 block size along that axis.
    """
    if encoding in (None, "fp16"):
        return None
    if encoding == "int8":
        return {"num_bits": 8, "axis": 0 if role == "weight" else None}
    if encoding == "fp8":
        return {"num_bits": (4, 3), "axis": None}
    if encoding == "int4" and role == "weight":
        return {"num_bits": 4, "block_sizes": {(-1 if kind == LINEAR else 1): block, "type": "static"}}
    raise ValueError(f"no {role} quantizer for encoding {encoding!r}")


# Layers NVIDIA's diffusion recipe (ModelOpt's diffusers example) keeps in high precision.
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
    # The same roles under LDM names (Make-An-Audio's U-Net: input_blocks / middle_block / output_blocks).
    ("time_embed.*", "LDM timestep embedding MLP"),
    ("*emb_layers*", "LDM per-resblock timestep projection"),
    ("input_blocks.0.0*", "LDM first conv: sees the raw latent"),
    ("out.2*", "LDM last conv: writes the noise prediction itself"),
    ("*skip_connection*", "LDM residual skip projection"),
]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One policy entry: layers matching ``pattern`` (and ``parent_class``) get ``format``."""

    pattern: str
    format: Format
    parent_class: str | None = None
    why: str | None = None
    candidates: tuple[Format, ...] = DEFAULT_CANDIDATES

    def matches(self, name: str, kind: str) -> bool:
        if self.parent_class is not None and _CLASSES[self.parent_class] != kind:
            return False
        return fnmatch.fnmatchcase(name, self.pattern)

    def to_entry(self) -> dict:
        entry: dict[str, Any] = {"quantizer_name": self.pattern, "format": self.format.value}
        if self.parent_class:
            entry["parent_class"] = self.parent_class
        if self.format == Format.AUTO:
            entry["candidates"] = [c.value for c in self.candidates]
        if self.why:
            entry["why"] = self.why
        return entry


@dataclasses.dataclass(frozen=True)
class Policy:
    """An ordered rule list (later wins) plus the INT4-convolution switch."""

    name: str
    rules: tuple[Rule, ...]
    int4_convs: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "int4_convs": self.int4_convs, "quant_cfg": [r.to_entry() for r in self.rules]}

    @property
    def searched(self) -> bool:
        """True when some rule leaves the format to the sensitivity search."""
        return any(r.format == Format.AUTO for r in self.rules)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one layer gets.

    Attributes:
        name: Module name inside the denoiser.
        kind: ``conv`` or ``linear``.
        requested: The format the policy asked for.
        format: The format the layer gets (after the conv fallback and any capability change).
        weight: ``fp16``, ``int8``, ``fp8`` or ``int4``.
        activation: ``int8``, ``fp8`` or ``None`` (unquantized).
        block: INT4 block size along the input axis (``None`` otherwise).
        params: Weight elements.
        out_channels: Output channels (per-channel scales).
        why: The matching rule's reason, or the fallback's.
        candidates: For ``auto``: the formats the search may choose from.
    """

    name: str
    kind: str
    requested: str
    format: str
    weight: str
    activation: str | None
    block: int | None
    params: int
    out_channels: int
    why: str | None = None
    candidates: tuple[str, ...] = ()

    def weight_bytes(self) -> float:
        """Bytes of the stored weight including its scales (FP32), as the export writes it."""
        return weight_bytes(self.weight, self.params, self.out_channels, self.block)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def weight_bytes(weight: str, params: int, out_channels: int, block: int | None) -> float:
    """Stored bytes of a weight of ``params`` elements in a weight format (scales in FP32)."""
    if weight == "fp16":
        return 2.0 * params
    if weight == "int8":
        return params + 4.0 * out_channels
    if weight == "fp8":
        return params + 4.0
    if weight == "int4":
        return params / 2 + 4.0 * params / (block or INT4_BLOCK)
    raise ValueError(weight)


def _format(value: Any, where: str) -> Format:
    try:
        return Format(value)
    except ValueError:
        choices = ", ".join(f.value for f in Format)
        raise InvalidInputError(f"{where}: unknown format {value!r}; choose one of {choices}") from None


def _pattern(name: str) -> str:
    for suffix in (".weight_quantizer", ".input_quantizer", ".output_quantizer", "weight_quantizer",
                   "input_quantizer"):
        if name.endswith(suffix) and name != suffix:
            return name[: -len(suffix)] or "*"
    return name


def policy_from_dict(data: dict, where: str = "--policy") -> Policy:
    """Validate and build a :class:`Policy` from its JSON form (see the module docstring).

    Raises:
        InvalidInputError: one line naming the bad entry.
    """
    if not isinstance(data, dict) or not isinstance(data.get("quant_cfg"), list) or not data["quant_cfg"]:
        raise InvalidInputError(f"{where}: a policy is an object with a non-empty 'quant_cfg' list of rules")
    rules = []
    for k, entry in enumerate(data["quant_cfg"]):
        at = f"{where} rule {k}"
        if not isinstance(entry, dict) or not isinstance(entry.get("quantizer_name"), str):
            raise InvalidInputError(f"{at}: each rule needs a 'quantizer_name' pattern, got {entry!r}")
        unknown = set(entry) - {"quantizer_name", "format", "parent_class", "why", "candidates", "enable"}
        if unknown:
            raise InvalidInputError(f"{at}: unknown keys {sorted(unknown)}; a rule has quantizer_name, format, "
                                    "parent_class, why, candidates")
        if "format" in entry:
            fmt = _format(entry["format"], at)
        elif entry.get("enable") is False:  # ModelOpt's own way of saying "keep this one"
            fmt = Format.FP16
        else:
            raise InvalidInputError(f"{at}: give a 'format' (or 'enable': false to keep the layer in FP16)")
        parent = entry.get("parent_class")
        if parent is not None and parent not in _CLASSES:
            raise InvalidInputError(f"{at}: parent_class {parent!r} is not one of nn.Conv2d, nn.Linear")
        cands = tuple(_format(c, at) for c in entry.get("candidates", [c.value for c in DEFAULT_CANDIDATES]))
        if Format.AUTO in cands or not cands:
            raise InvalidInputError(f"{at}: candidates must be a non-empty list of concrete formats")
        rules.append(Rule(_pattern(entry["quantizer_name"]), fmt, parent, entry.get("why"), cands))
    int4_convs = data.get("int4_convs", False)
    if not isinstance(int4_convs, bool):
        raise InvalidInputError(f"{where}: 'int4_convs' must be true or false, got {int4_convs!r}")
    return Policy(str(data.get("name", "custom")), tuple(rules), int4_convs)


def load_policy(path: str | Path) -> Policy:
    """Read a policy JSON file (``--policy FILE``)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"--policy {str(path)!r}: file not found")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidInputError(f"--policy {str(path)!r}: not valid JSON ({exc})") from None
    return policy_from_dict(data, f"--policy {path.name}")


def _exclusions() -> list[Rule]:
    return [Rule(p, Format.FP16, None, why) for p, why in HIGH_PRECISION_LAYERS]


def preset(name: str) -> Policy:
    """The built-in policy of a ``--precision`` preset.

    ``int8``/``fp8``/``w4a8``: the format everywhere, then NVIDIA's diffusion exclusions.
    ``mixed``: every layer searched among fp16/int8/fp8/w4a8 with INT4 convolutions allowed,
    NVIDIA's exclusions included in the search (measurement decides, DESIGN.md §5), except
    ``conv_in``/``conv_out``, whose 8-channel side makes INT4 blocks meaningless.
    """
    name = getattr(name, "value", name)
    if name in ("int8", "fp8", "w4a8"):
        return Policy(name, (Rule("*", Format(name), why=f"preset {name}"), *_exclusions()))
    if name == "mixed":
        return Policy("mixed", (
            Rule("*", Format.AUTO, why="chosen by sensitivity under the size budget"),
            Rule("*conv_in*", Format.AUTO, candidates=(Format.FP16, Format.INT8, Format.FP8),
                 why="8 input channels: no INT4 blocks"),
            Rule("*conv_out*", Format.AUTO, candidates=(Format.FP16, Format.INT8, Format.FP8),
                 why="8 output channels: writes the noise prediction"),
        ), int4_convs=True)
    raise InvalidInputError(f"--precision {name!r}: no such preset; choose int8, fp8, w4a8 or mixed")


def compute_layers(model) -> list[tuple[str, str, Any]]:
    """``(name, kind, module)`` of every Conv2d / Linear in ``model`` (ModelOpt-wrapped or not)."""
    import torch

    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            out.append((name, CONV, module))
        elif isinstance(module, torch.nn.Linear):
            out.append((name, LINEAR, module))
    return out


def int4_block(kind: str, in_features: int) -> int | None:
    """INT4 block size along the input axis, or ``None`` when no block size divides it."""
    for b in _BLOCK_CHOICES:
        if in_features % b == 0:
            return b
    return None


def realize(name: str, kind: str, module, requested: Format, int4_convs: bool, why: str | None = None,
            candidates: Iterable[Format] = ()) -> LayerPlan:
    """What a layer gets for a requested format (the INT4 conv fallback applied)."""
    w = module.weight
    params, out_ch, in_ch = int(w.numel()), int(w.shape[0]), int(w.shape[1])
    fmt, note = requested, why
    if requested in (Format.W4A8, Format.W4A16):
        block = int4_block(kind, in_ch)
        if kind == CONV and not int4_convs:
            fmt = Format.INT8 if requested == Format.W4A8 else Format.FP16
            note = "INT4 is for linear layers only (no INT4 convolution in TensorRT); convolution falls back"
        elif block is None:
            fmt = Format.INT8 if requested == Format.W4A8 else Format.FP16
            note = f"input axis {in_ch} is not a multiple of 16: no INT4 blocks, falls back"
    weight, act = ENCODINGS[fmt]
    block = int4_block(kind, in_ch) if weight == "int4" else None
    return LayerPlan(name, kind, requested.value, fmt.value, weight, act, block, params, out_ch, note,
                     tuple(c.value for c in candidates))


def resolve(policy: Policy, model) -> list[LayerPlan]:
    """Apply ``policy`` to every conv/linear layer of ``model`` (later rules win)."""
    plans = []
    for name, kind, module in compute_layers(model):
        rule = None
        for r in policy.rules:
            if r.matches(name, kind):
                rule = r
        if rule is None:  # no rule: the layer stays in high precision
            plans.append(realize(name, kind, module, Format.FP16, policy.int4_convs, "no rule matches"))
            continue
        plans.append(realize(name, kind, module, rule.format, policy.int4_convs, rule.why,
                             rule.candidates if rule.format == Format.AUTO else ()))
    return plans


def with_format(plan: LayerPlan, fmt: str, module, int4_convs: bool, why: str | None = None) -> LayerPlan:
    """``plan`` re-realized in another format (keeps ``requested`` and the candidates)."""
    new = realize(plan.name, plan.kind, module, Format(fmt), int4_convs, why or plan.why)
    return dataclasses.replace(new, requested=plan.requested, candidates=plan.candidates)


def quantizer_cfgs(plan: LayerPlan) -> dict[str, dict | None]:
    """ModelOpt attribute configs of a layer's weight and input quantizers (``None``: disabled)."""
    return {"weight": quantizer_cfg(plan.weight, "weight", plan.kind, plan.block),
            "input": quantizer_cfg(plan.activation, "input")}


def compile_quant_cfg(plans: Iterable[LayerPlan], output_quantizers: Iterable[str] = ()) -> dict:
    """ModelOpt config for resolved plans: deny all, then one exact entry per quantized layer.

    Args:
        plans: Per-layer plans.
        output_quantizers: Layers whose output also gets an INT8 quantizer (ONNX Runtime
            placement: DQ -> Conv -> Q lets ONNX Runtime run an integer kernel).
    """
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    outputs = set(output_quantizers)
    for p in plans:
        cfgs = quantizer_cfgs(p)
        esc = _escape(p.name)
        if cfgs["weight"] is not None:
            entries.append({"quantizer_name": f"{esc}.weight_quantizer", "cfg": cfgs["weight"]})
        if cfgs["input"] is not None:
            entries.append({"quantizer_name": f"{esc}.input_quantizer", "cfg": cfgs["input"]})
        if p.name in outputs:
            entries.append({"quantizer_name": f"{esc}.output_quantizer", "cfg": quantizer_cfg("int8", "output")})
    return {"quant_cfg": entries, "algorithm": "max"}


def _escape(name: str) -> str:
    # ModelOpt matches with fnmatch: module names hold no wildcard characters except '[' in
    # unusual models, which fnmatch would read as a character class.
    return name.replace("[", "[[]")


def compile_pattern_cfg(policy: Policy) -> dict:
    """Model-free ModelOpt config of a policy (wildcard entries, later wins), for presets.

    Used by :func:`adm_export.formats.recipes.quant_config`; ``auto`` rules compile to disabled
    quantizers (a searched policy needs the model: use :func:`resolve` + :func:`compile_quant_cfg`).
    """
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for r in policy.rules:
        for cls, kind in (("nn.Conv2d", CONV), ("nn.Linear", LINEAR)):
            if r.parent_class is not None and _CLASSES[r.parent_class] != kind:
                continue
            fmt = r.format
            if fmt in (Format.W4A8, Format.W4A16) and kind == CONV and not policy.int4_convs:
                fmt = Format.INT8 if fmt == Format.W4A8 else Format.FP16
            pat = r.pattern
            if fmt in (Format.FP16, Format.AUTO):
                entries.append({"quantizer_name": f"{pat}.*_quantizer" if pat != "*" else "*", "parent_class": cls,
                                "enable": False})
                continue
            weight, act, block = {
                Format.INT8: ("int8", "int8", None), Format.FP8: ("fp8", "fp8", None),
                Format.W4A8: ("int4", "int8", INT4_BLOCK), Format.W4A16: ("int4", None, INT4_BLOCK),
            }[fmt]
            probe = LayerPlan(pat, kind, fmt.value, fmt.value, weight, act, block, 0, 0)
            cfgs = quantizer_cfgs(probe)
            wname = "*weight_quantizer" if pat == "*" else f"{pat}.weight_quantizer"
            iname = "*input_quantizer" if pat == "*" else f"{pat}.input_quantizer"
            entries.append({"quantizer_name": wname, "parent_class": cls, "cfg": cfgs["weight"]})
            if cfgs["input"] is not None:
                entries.append({"quantizer_name": iname, "parent_class": cls, "cfg": cfgs["input"]})
            else:
                entries.append({"quantizer_name": iname, "parent_class": cls, "enable": False})
    return {"quant_cfg": entries, "algorithm": "max"}


def summary(plans: Iterable[LayerPlan]) -> dict:
    """Layer counts and weight bytes by format, for manifests and the report."""
    out: dict[str, dict] = {}
    for p in plans:
        s = out.setdefault(p.format, {"layers": 0, "params": 0, "weight_bytes": 0.0})
        s["layers"] += 1
        s["params"] += p.params
        s["weight_bytes"] += p.weight_bytes()
    return out
