"""One canonical FP32 graph from any export: the input of the CUDA engine's fusions.

* low-bit weights (INT8 / INT4 / FP8 initializers behind ``DequantizeLinear``) are dequantized to
  FP32 initializers with ONNX's own formula, so each weight keeps exactly its quantization grid
  value (bit-identical to ONNX Runtime's ``DequantizeLinear``, tested); weights stored FP16 +
  ``Cast`` become plain initializers;
* activation ``QuantizeLinear -> DequantizeLinear`` pairs are removed: activations are not
  quantized on ONNX Runtime CUDA, which has no INT8/FP8 kernels for Q/DQ graphs (it would only add
  FP32 rounding work);
* an FP16-traced export is upcast (exactly) to FP32.

Plain onnx + numpy: runs anywhere.
"""

from __future__ import annotations

import collections

import numpy as np

from adm_export.export.onnx_graph import consumers, node_attr

FLOAT_NAMES = {1: "fp32", 10: "fp16", 11: "fp64", 16: "bf16"}
_GRID_NAMES = {3: "int8", 2: "uint8", 22: "int4", 21: "uint4", 17: "fp8", 18: "fp8", 19: "fp8", 20: "fp8"}


def _replace_nodes(graph, keep: list) -> None:
    del graph.node[:]
    graph.node.extend(keep)


def fold_constant_casts(model) -> int:
    """Replace ``Cast`` nodes of float initializers by initializers of the target float type.

    The quantized export stores the layers kept out of quantization as FP16 weights + ``Cast`` to
    FP32; the optimizer's patterns (and its NHWC weight transpose) want plain initializers.

    Returns:
        Number of casts folded.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    keep, folded = [], 0
    for node in graph.node:
        src = inits.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        to = node_attr(node, "to") if src is not None else None
        if src is None or src.data_type not in FLOAT_NAMES or to not in FLOAT_NAMES:
            keep.append(node)
            continue
        dtype = helper.tensor_dtype_to_np_dtype(to)
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(src).astype(dtype), node.output[0]))
        folded += 1
    _replace_nodes(graph, keep)
    return folded


def dequantize_array(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int,
                     block_size: int) -> np.ndarray:
    """ONNX ``DequantizeLinear`` in numpy: ``(x - zero_point) * scale`` in the scale's float type.

    Per tensor (scalar scale), per axis (1-D scale along ``axis``) or blocked (scale of the same
    rank with ``ceil(n / block_size)`` along ``axis``), exactly as ONNX Runtime computes it: the
    integer difference is exact in FP32, then one FP32 multiplication.
    """
    xf = x.astype(np.float32)
    if zero_point is not None:
        zf = zero_point.astype(np.float32)
    else:
        zf = np.zeros((), np.float32)
    s = scale.astype(np.float32)
    axis = axis % x.ndim if x.ndim else 0
    if s.ndim == 0 or s.size == 1 and block_size == 0:
        s, zf = s.reshape(()), zf.reshape(())
    elif block_size:
        s = np.take(np.repeat(s, block_size, axis=axis), np.arange(x.shape[axis]), axis=axis)
        if zf.ndim:
            zf = np.take(np.repeat(zf, block_size, axis=axis), np.arange(x.shape[axis]), axis=axis)
    else:
        shape = [1] * x.ndim
        shape[axis] = -1
        s = s.reshape(shape)
        if zf.ndim:
            zf = zf.reshape(shape)
    return ((xf - zf) * s).astype(scale.dtype)


def dequantize_weights(model) -> dict:
    """Turn every ``DequantizeLinear`` of an initializer into a float initializer (same values).

    Returns:
        ``{"tensors": n, "grid": {"int8": n8, "int4": n4, "fp8": nf}, "low_bit_bytes": b}``:
        how many weights were dequantized, from which grid, and how many bytes they had stored.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    keep = []
    grid: collections.Counter = collections.Counter()
    low_bit_bytes = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            keep.append(node)
            continue
        src = inits[node.input[0]]
        x = numpy_helper.to_array(src)
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        y = dequantize_array(x, scale, zp, node_attr(node, "axis", 1), node_attr(node, "block_size", 0))
        graph.initializer.append(numpy_helper.from_array(y, node.output[0]))
        grid[_GRID_NAMES.get(src.data_type, str(src.data_type))] += 1
        low_bit_bytes += x.size // 2 if src.data_type in (21, 22) else x.nbytes
    _replace_nodes(graph, keep)
    return {"tensors": sum(grid.values()), "grid": dict(sorted(grid.items())), "low_bit_bytes": int(low_bit_bytes)}


def drop_activation_qdq(model) -> int:
    """Remove activation ``QuantizeLinear -> DequantizeLinear`` pairs (the consumers read the float input).

    Returns:
        Number of pairs removed.

    Raises:
        RuntimeError: A Q/DQ node is left that is neither a weight nor such a pair (a graph this
            pass does not understand; serving it would silently keep quantization).
    """
    from onnx import helper

    graph = model.graph
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    drop: set[int] = set()
    rename: dict[str, str] = {}
    extra = []
    pairs = 0
    for q in graph.node:
        if q.op_type != "QuantizeLinear":
            continue
        users = readers.get(q.output[0], [])
        if not users or any(u.op_type != "DequantizeLinear" for u in users) or q.output[0] in outputs:
            continue
        for dq in users:
            if dq.output[0] in outputs:  # keep the graph output's name: an Identity instead of a rename
                extra.append(helper.make_node("Identity", [q.input[0]], [dq.output[0]], name=f"{dq.name}_identity"))
            else:
                rename[dq.output[0]] = q.input[0]
            drop.add(id(dq))
            pairs += 1
        drop.add(id(q))
    keep = [n for n in graph.node if id(n) not in drop] + extra
    for n in keep:
        for k, name in enumerate(n.input):
            if name in rename:
                n.input[k] = rename[name]
    _replace_nodes(graph, keep)
    left = sorted({n.op_type for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")})
    if left:
        raise RuntimeError(f"Q/DQ nodes left after dequantization: {left} (neither weights nor activation pairs)")
    return pairs


def upcast_fp16(model) -> int:
    """Turn an FP16 graph into the same graph in FP32 (FP16 -> FP32 is exact).

    Initializers, ``Cast(to=FLOAT16)``, ``ConstantOfShape`` values and the graph's inputs and
    outputs change type; nothing else in a traced U-Net carries a float type of its own.

    Returns:
        Number of tensors and attributes changed.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    changed = 0
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT16:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32),
                                                                  init.name))
            changed += 1
    for node in graph.node:
        if node.op_type == "Cast" and node_attr(node, "to") == TensorProto.FLOAT16:
            for a in node.attribute:
                if a.name == "to":
                    a.i = TensorProto.FLOAT
            changed += 1
        elif node.op_type == "ConstantOfShape":
            value = node_attr(node, "value")
            if value is not None and value.data_type == TensorProto.FLOAT16:
                arr = numpy_helper.to_array(value).astype(np.float32)
                for a in list(node.attribute):
                    if a.name == "value":
                        node.attribute.remove(a)
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr)))
                changed += 1
    for v in (*graph.input, *graph.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
            changed += 1
    return changed


def prepare_fp32(model) -> dict:
    """Bring any export (FP32, FP16, quantized Q/DQ) to the canonical FP32 graph, in place.

    Returns:
        What changed: casts folded, weights dequantized (with their grid), activation Q/DQ pairs
        dropped, FP16 tensors upcast.
    """
    from adm_export.export import onnx_graph

    onnx_graph.constants_to_initializers(model)
    stats = {"casts_folded": fold_constant_casts(model)}
    onnx_graph.remove_unused_initializers(model)  # the FP16 sources of the folded casts
    stats["weights_dequantized"] = dequantize_weights(model)
    stats["activation_qdq_pairs_dropped"] = drop_activation_qdq(model)
    stats["fp16_tensors_upcast"] = upcast_fp16(model)
    onnx_graph.remove_unused_initializers(model)
    # Types and shapes of intermediate tensors changed: let the optimizer infer them again.
    del model.graph.value_info[:]
    return stats
