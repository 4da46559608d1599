"""ModelOpt fake quantization of the denoiser with per-layer plans, and its saved state.

The denoiser is copied before quantization so the caller's full-precision model stays intact
(``build`` and ``eval`` need it as the baseline). The ``quantize`` stage
(:mod:`adm_export.quantize.stage`) saves the result with ``mto.save`` (the ModelOpt state and the
weights); :func:`load_quantized` restores it onto a fresh copy of the same model.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

from adm_export.artifacts import check_same_model, read_manifest
from adm_export.calibration.cache import CalibrationCache
from adm_export.config import QuantizeConfig
from adm_export.errors import InvalidInputError
from adm_export.numerics import import_modelopt
from adm_export.progress import progress

STAGE = "quantized"
STATE_FILE = "unet.modelopt.pth"


def quantize_denoiser(adapter, cache: CalibrationCache, cfg: QuantizeConfig, plans=None):
    """Return a quantized copy of the adapter's denoiser, calibrated by replaying the cache.

    Args:
        adapter: The model adapter.
        cache: Calibration cache.
        cfg: Quantization settings.
        plans: Per-layer plans (``policy.LayerPlan``); default: the preset's, resolved on the model.
    """
    if plans is None:
        plans, _, _ = plan_layers(cfg, adapter)
    placement = resolve_placement(cfg, adapter.family)["value"]
    return quantize_with_plans(adapter, list(cache.points()), plans, placement)


def resolve_placement(cfg: QuantizeConfig, family: str | None = None) -> dict:
    """``--placement`` or else the one ``--target`` needs (for this model family): ``{"value", "reason", "source"}``."""
    from adm_export.formats.capabilities import placement_for

    return placement_for(cfg.target, cfg.placement, family)


def output_quantized_layers(plans, placement) -> list[str]:
    """Layers whose output gets an INT8 quantizer: INT8 convolutions where the placement asks for it.

    ONNX Runtime runs an integer convolution (QLinearConv) only for DQ -> Conv -> Q. Linear layers
    already run as MatMulIntegerToFloat without it, so only convolutions pay the extra rounding.
    """
    from adm_export.formats.capabilities import PLACEMENTS, Placement

    if not PLACEMENTS[Placement(placement)].conv_outputs:
        return []
    return [p.name for p in plans if p.kind == "conv" and p.format == "int8"]


def quantize_with_plans(adapter, points: list[dict], plans, placement="tensorrt"):
    """Quantize a copy of the denoiser with explicit per-layer plans, calibrated on ``points``."""
    from adm_export.devices import to_module
    from adm_export.formats import policy as pol

    mtq, _ = import_modelopt()
    model = copy.deepcopy(adapter.denoiser).eval()

    def forward_loop(m):
        wrapped = adapter.export_module(m)
        for inputs in progress(points, desc="quantize: calibrating", unit="point"):
            wrapped(*to_module(inputs, m).values())

    import torch

    qcfg = pol.compile_quant_cfg(plans, output_quantized_layers(plans, placement))
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(model, qcfg, forward_loop)
    round_high_precision_weights(model)
    check_realized(model, plans)
    return model


def check_realized(model, plans) -> None:
    """Fail loudly if ModelOpt's quantizers do not implement the plan (a compile bug, not user error)."""
    layers = dict(model.named_modules())
    for p in plans:
        m = layers[p.name]
        wq = getattr(m, "weight_quantizer", None)
        on = wq is not None and getattr(wq, "is_enabled", False)
        want = p.weight != "fp16"
        if on != want:
            raise RuntimeError(f"layer {p.name}: weight quantizer {'on' if on else 'off'}, plan says {p.weight}")
        if on:
            bits = {"int8": 8, "fp8": (4, 3), "int4": 4}[p.weight]
            got = tuple(wq.num_bits) if isinstance(wq.num_bits, (tuple, list)) else wq.num_bits
            if got != bits:
                raise RuntimeError(f"layer {p.name}: weight quantizer has {wq.num_bits} bits, plan says {p.weight}")


def plan_layers(cfg: QuantizeConfig, adapter):
    """Resolve the policy (preset or ``--policy``) on the denoiser and check it against ``--target``.

    Returns:
        ``(plans, policy, capability_report)``; ``auto`` layers are left for the search.
    """
    from adm_export.formats import capabilities, policy as pol

    policy = pol.load_policy(cfg.policy) if cfg.policy else pol.preset(cfg.precision.value)
    if policy.searched and cfg.size_budget is None:
        raise InvalidInputError(f"policy {policy.name!r} leaves formats to the search ('auto'); give --size-budget F")
    plans = pol.resolve(policy, adapter.denoiser)
    modules = {n: m for n, _, m in pol.compute_layers(adapter.denoiser)}
    fixed = [p for p in plans if p.format != "auto"]
    flag = "--policy" if cfg.policy else f"--precision {cfg.precision.value}"
    checked, report = capabilities.check_plans(fixed, cfg.target, cfg.allow_adjust, modules, policy.int4_convs, flag)
    by_name = {p.name: p for p in checked}
    plans = [by_name.get(p.name, p) for p in plans]
    changed = {c["layer"] for c in report["changes"]}
    groups: dict = {}
    for p in plans:
        if p.format not in (p.requested, "auto") and p.name not in changed:
            g = groups.setdefault((p.requested, p.format, p.kind), {"requested": p.requested, "format": p.format,
                                                                     "kind": p.kind, "layers": 0, "example": p.name,
                                                                     "why": p.why})
            g["layers"] += 1
    report["fallbacks"] = list(groups.values())
    return plans, policy, report


def round_high_precision_weights(model) -> int:
    """Round the weights of conv/linear layers that stay unquantized to FP16 precision.

    Those layers are "kept in FP16": the engines run them in FP16 and the export stores them in
    FP16. Rounding them here makes the torch fake-quant model compute exactly what is exported,
    so parity compares like with like and the measured quantization error includes it.

    Returns:
        The number of layers rounded.
    """
    import torch

    n = 0
    for module in model.modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        wq = getattr(module, "weight_quantizer", None)
        if wq is not None and getattr(wq, "is_enabled", False):
            continue
        with torch.no_grad():
            module.weight.copy_(module.weight.half().float())
        n += 1
    return n


def quantizer_counts(model) -> dict:
    """Enabled weight/input/output quantizers, and the layers that carry a weight quantizer."""
    counts = {"weight": 0, "input": 0, "output": 0, "other": 0}
    for name, module in model.named_modules():
        # TensorQuantizer and its subclasses (StaticBlockScaleQuantizer for INT4 blocks).
        if not type(module).__name__.endswith("Quantizer") or not getattr(module, "is_enabled", False):
            continue
        kind = name.rsplit(".", 1)[-1].replace("_quantizer", "")
        counts[kind if kind in counts else "other"] += 1
    return counts


def load_quantized(folder: str | Path, adapter, flag: str = "--quantized"):
    """Restore a quantized denoiser saved by the ``quantize`` stage onto a copy of the adapter's denoiser.

    Returns:
        ``(module, manifest)``.
    """
    manifest = read_manifest(folder, STAGE, flag)
    check_same_model(manifest, adapter.identity(), flag)
    _, mto = import_modelopt()
    model = copy.deepcopy(adapter.denoiser).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        model = mto.restore(model, str(Path(folder) / STATE_FILE))
    return model, manifest
