"""Full-precision ONNX export of the denoiser (FP16 or FP32): the baseline the engines race against.

The GPU baseline is the unquantized denoiser in FP16, exported by tracing the FP16 torch module
itself (``module.half()``), not by converting an FP32 graph afterwards: onnxconverter-common's
``convert_float_to_float16`` also turns the ``scales`` constant of every ``Resize`` (the U-Net's
upsamplers) into FP16, which ONNX Runtime rejects, and blocking the Resize op type does not keep
the constant feeding it in FP32 (DESIGN.md §6). Traced in FP16, the exporter writes the weights
and activations in FP16 and keeps ``Resize`` scales and the timestep path in FP32 as ONNX requires;
:func:`check_fp16_graph` verifies both.

The result is an ordinary ``onnx`` artifact (``precision`` ``fp16`` or ``fp32``), so
``adm-export engine`` and ``generate --engine`` serve it like a quantized export.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from adm_export.artifacts import atomic_dir, write_manifest
from adm_export.config import FullPrecisionExportConfig, to_dict
from adm_export.devices import check_device

logger = logging.getLogger(__name__)

STAGE = "onnx"
ONNX_FILE = "unet.onnx"


def _example(spec, frames: int, fp16: bool, device: str) -> dict:
    """Random inputs: ``sample`` and the conditioning in the export dtype, the timestep in FP32."""
    import torch

    inputs = spec.dummy_inputs(2, frames)
    dtype = torch.float16 if fp16 else torch.float32
    return {k: (v if k == "timestep" else v.to(dtype)).to(device) for k, v in inputs.items()}


def check_fp16_graph(model) -> dict:
    """Check an FP16 export: FP16 weights, FP32 ``Resize`` scales (ONNX Runtime rejects FP16 ones).

    Returns:
        Counts of initializers by dtype, the ``Resize`` nodes checked, and the graph's input and
        output dtypes.

    Raises:
        ValueError: A ``Resize`` reads FP16 ``roi``/``scales`` (the conversion bug DESIGN.md §6 names).
    """
    import collections

    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    bad = []
    resize = 0
    for n in graph.node:
        if n.op_type != "Resize":
            continue
        resize += 1
        for name in n.input[1:3]:  # roi, scales
            t = inits.get(name) or consts.get(name)
            if t is not None and t.data_type == TensorProto.FLOAT16:
                bad.append(f"{n.name}:{name}")
    if bad:
        raise ValueError(f"Resize nodes read FP16 roi/scales, which ONNX Runtime rejects: {bad[:5]}")
    dtypes = collections.Counter(TensorProto.DataType.Name(i.data_type).lower() for i in graph.initializer)
    big_fp32 = sum(1 for i in graph.initializer
                   if i.data_type == TensorProto.FLOAT and numpy_helper.to_array(i).size >= 1024)
    name = lambda v: TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()  # noqa: E731
    return {
        "initializers": dict(dtypes),
        "large_fp32_initializers": big_fp32,
        "resize_nodes": resize,
        "inputs": {v.name: name(v) for v in graph.input},
        "outputs": {v.name: name(v) for v in graph.output},
    }


def export_full_precision(cfg: FullPrecisionExportConfig, out: str | Path, adapter=None, force: bool = False) -> dict:
    """Export the unquantized denoiser (FP16 or FP32) as an ``onnx`` artifact.

    Args:
        cfg: Export settings.
        out: Output folder (``unet.onnx`` and ``manifest.json``).
        adapter: An already loaded model adapter; loaded from ``cfg.model`` otherwise.
        force: Overwrite ``out``.

    Returns:
        The artifact's manifest (sizes, FP16 graph check, parity).
    """
    import onnx
    import torch

    from adm_export.engines.onnxruntime import OrtEngine, OrtOptions
    from adm_export.export.onnx import onnx_file_bytes, save_onnx, torch_to_onnx
    from adm_export.numerics import rel_l2
    from adm_export.models import load_model

    check_device(cfg.device)
    # 1. The module in the export dtype, on the tracing device.
    adapter = adapter or load_model(cfg.model)
    spec = adapter.denoiser_spec()
    frames = spec.frames_for_seconds(cfg.audio_seconds)
    module = copy.deepcopy(adapter.denoiser).eval().to(cfg.device)
    if cfg.fp16:
        module = module.half()
    example = _example(spec, frames, cfg.fp16, cfg.device)

    with atomic_dir(out, force=force) as tmp:
        # 2. Trace in the export dtype (no float -> float16 conversion pass: see the module doc).
        path = tmp / ONNX_FILE
        torch_to_onnx(adapter, module, path, cfg.opset, example)
        model = onnx.load(str(path))
        check = check_fp16_graph(model) if cfg.fp16 else None
        model.producer_name = "adm-export"
        export_bytes = save_onnx(model, path)
        del model

        # 3. Parity: ONNX Runtime vs the torch module in the same dtype, beside the FP16 rounding
        #    error (torch FP16 vs torch FP32) that bounds what can be expected.
        parity = None
        if cfg.parity:
            with torch.inference_mode():
                wrapped = adapter.export_module(module)
                ref = wrapped(*example.values()).float()
                full = adapter.export_module(copy.deepcopy(adapter.denoiser).to(cfg.device).float())
                ref32 = full(*(v.float() for v in example.values())).float()
            options = OrtOptions.for_device(cfg.device)
            engine = OrtEngine(path, spec, options)
            got = engine(example).float().to(ref.device)
            gap = rel_l2(got, ref)
            floor = rel_l2(ref, ref32)
            tol = 2 * floor + 1e-3 if cfg.fp16 else spec.parity_rel_l2
            parity = {
                "onnx_vs_torch_rel_l2": [gap], "onnx_vs_torch_max": gap, "onnx_vs_torch_mean": gap,
                "rounding_floor_rel_l2": [floor], "rounding_floor_max": floor, "rounding_floor_mean": floor,
                "quant_error_rel_l2": [0.0], "quant_error_max": 0.0, "quant_error_mean": 0.0,
                "tolerance": tol, "passed": gap <= tol, "device": cfg.device,
            }
            if not parity["passed"]:
                logger.warning("%s export: ONNX Runtime vs torch %.2e exceeds tolerance %.2e", cfg.precision, gap, tol)
        params = adapter.denoiser_parameter_count()
        sizes = {
            "unet_fp32_bytes": params * 4,
            "unet_fp16_bytes": params * 2,
            "unet_export_bytes": export_bytes,
            "reduction_vs_fp32": round(export_bytes / (params * 4), 4),
            "reduction_vs_fp16": round(export_bytes / (params * 2), 4),
        }
        logger.info("exported %s denoiser: %.1f MB%s", cfg.precision, onnx_file_bytes(path) / 1e6,
                    f"; parity {parity['onnx_vs_torch_max']:.2e} (FP16 rounding {parity['rounding_floor_max']:.2e})"
                    if parity else "")
        manifest = write_manifest(
            tmp, STAGE, adapter.identity(), to_dict(cfg),
            extra={
                "spec": spec.to_dict(),
                "precision": cfg.precision,
                "frames": frames,
                "sizes": sizes,
                "fp16_check": check,
                "parity": parity or {},
            },
        )
    return manifest
