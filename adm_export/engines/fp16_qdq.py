"""FP16-typed Q/DQ graphs for strongly typed TensorRT (TensorRT 11, TensorRT-RTX).

A strongly typed network computes every layer in the type its ONNX graph gives it, and TensorRT
11 and TensorRT-RTX have no FP16 builder flag left to relax that. The quantized export is FP32
outside its Q/DQ pairs (the layers kept out of quantization store FP16 weights + ``Cast`` to FP32),
so its TensorRT-RTX plan ran those layers and every attention matmul in FP32 (default build:
``{"fp32": 48, "int8": 98}``). :func:`to_fp16_typed_qdq` rewrites the graph the way NVIDIA's
diffusion recipe exports it (an FP16 model with Q/DQ):

* activations FP16, weights of the kept layers FP16, Q/DQ scales FP16 (``QuantizeLinear`` /
  ``DequantizeLinear`` take FP16 scales from opset 19, so the graph is raised to 19 when lower),
  so a quantized layer reads ``DequantizeLinear -> FP16`` and an unquantized one FP16;
* FP32 only where it is needed: the graph's inputs and output (the engine's bindings stay FP32,
  cast inside), the timestep's sinusoidal embedding (``t * f`` with ``t`` up to 1000 rounds by up
  to half a radian in FP16), and ``Resize`` scales (FP32 by the operator's definition).

Integer / FP8 weights behind ``DequantizeLinear`` are untouched (their scales become FP16).
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging

logger = logging.getLogger(__name__)

FP16_QDQ_OPSET = 19


def to_fp16_typed_qdq(model) -> dict:
    """Rewrite a Q/DQ export as an FP16-typed Q/DQ graph, in place (see the module doc).

    Args:
        model: An ONNX ``ModelProto`` (the ``export`` stage's ``unet.onnx``).

    Returns:
        ``{"opset", "fp32_nodes", "fp32_kept", "scales_fp16", "compute": {...}}``: what changed and
        the compute ops by the type of their activation input.

    Raises:
        RuntimeError: A DequantizeLinear feeding a convolution or matmul still has an FP32 scale.
    """
    import onnx
    from onnx import TensorProto
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    from adm_export.engines.onnxruntime import dequantize, fusions
    from adm_export.export import onnx_graph

    onnx_graph.constants_to_initializers(model)
    # Kept layers: FP16 weight + Cast to FP32 -> one initializer (exact), converted back to FP16 below.
    folded = dequantize.fold_constant_casts(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < FP16_QDQ_OPSET:
        onnx_graph.set_opset(model, FP16_QDQ_OPSET)
    fusions.name_nodes(model)
    keep = fusions.timestep_path(model)
    del model.graph.value_info[:]
    noise = io.StringIO()
    with contextlib.redirect_stderr(noise), contextlib.redirect_stdout(noise):
        converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    model.CopyFrom(converted)
    # The converter appends the input/output casts at the end of the node list.
    OnnxModel(model).topological_sort()
    onnx_graph.remove_unused_initializers(model)
    inits = {i.name: i for i in model.graph.initializer}
    fp32_scales = [n.name for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and n.input[1] in inits and inits[n.input[1]].data_type == TensorProto.FLOAT]
    if fp32_scales:
        raise RuntimeError(f"Q/DQ nodes with FP32 scales left after the FP16 conversion: {fp32_scales[:5]}")
    counts = fusions.compute_precisions(model)
    return {
        "opset": max(opset, FP16_QDQ_OPSET),
        "casts_folded": folded,
        "fp32_kept": {"nodes": len(keep), "why": "graph inputs/output (cast inside), timestep sinusoidal embedding, "
                      "Resize scales"},
        "scales_fp16": sum(1 for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")),
        "compute": counts,
        "ops": dict(collections.Counter(n.op_type for n in model.graph.node)),
        "onnx_version": onnx.__version__,
    }
