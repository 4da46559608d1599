"""ONNX graph passes on exported Q/DQ models (plain ``onnx`` protos, no extra dependency).

* :func:`constants_to_initializers` turns ``Constant`` nodes into initializers, so every later
  pass sees constants in one place.
* :func:`fold_weight_quantization` replaces ``W(fp32) -> QuantizeLinear -> DequantizeLinear``
  by ``W(int8) -> DequantizeLinear``: the exporter keeps every quantized weight in FP32 plus its
  Q/DQ pair, so a "quantized" file would be larger than the FP32 one. A ``Transpose`` directly
  after the DequantizeLinear (how linear layers are exported) is folded into the INT8 weight, so
  the DequantizeLinear feeds the MatMul directly, the pattern TensorRT and ONNX Runtime fuse.
* :func:`qdq_report` checks that every quantized Conv/MatMul/Gemm has DequantizeLinear on both its
  activation and its weight, and counts what is left in float.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


def _producers(graph) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph) -> dict[str, list]:
    out = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            out[i].append(n)
    return out


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def constants_to_initializers(model) -> int:
    """Move ``Constant`` nodes holding a tensor into the graph's initializers; returns how many."""
    from onnx import numpy_helper

    graph = model.graph
    keep, moved = [], 0
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0])
            graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return moved


def quantize_like_onnx(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    """ONNX QuantizeLinear semantics in numpy: saturate(round_half_even(x / scale) + zero_point)."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis if axis is not None else 1] = -1
        scale = scale.reshape(shape)
        zero_point = zero_point.reshape(shape)
    info = np.iinfo(zero_point.dtype)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zero_point.astype(np.float32)
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


def fold_weight_quantization(model) -> dict:
    """Store quantized weights as integer initializers feeding DequantizeLinear.

    Returns:
        Counts: ``folded`` weights, ``transposes`` folded, ``fp32_bytes_removed``.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    remove_nodes: set[int] = set()
    new_inits: list = []
    stats = {"folded": 0, "transposes": 0, "fp32_bytes_removed": 0}
    rename: dict[str, str] = {}

    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] not in inits:
            continue
        dqs = consumers.get(q.output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            continue
        dq = dqs[0]
        w = numpy_helper.to_array(inits[q.input[0]])
        scale = numpy_helper.to_array(inits[q.input[1]])
        zp = numpy_helper.to_array(inits[q.input[2]]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        axis = _attr(q, "axis", 1)
        qw = quantize_like_onnx(w, scale, zp, axis)
        # Fold a following Transpose into the integer weight (linear layers export as W^T).
        users = consumers.get(dq.output[0], [])
        if len(users) == 1 and users[0].op_type == "Transpose" and qw.ndim >= 2:
            tr = users[0]
            perm = list(_attr(tr, "perm", list(reversed(range(qw.ndim)))))
            qw = np.ascontiguousarray(np.transpose(qw, perm))
            if scale.size > 1:
                _set_attr(dq, "axis", perm.index(axis))
            rename[tr.output[0]] = dq.output[0]
            remove_nodes.add(id(tr))
            stats["transposes"] += 1
        name = q.input[0] + "_quantized"
        new_inits.append(numpy_helper.from_array(qw, name))
        dq.input[0] = name
        remove_nodes.add(id(q))
        stats["folded"] += 1
        stats["fp32_bytes_removed"] += w.nbytes

    kept = [n for n in graph.node if id(n) not in remove_nodes]
    for n in kept:
        for k, name in enumerate(n.input):
            if name in rename:
                n.input[k] = rename[name]
    for o in graph.output:
        if o.name in rename:  # pragma: no cover - a transposed weight is never a graph output
            o.name = rename[o.name]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    remove_unused_initializers(model)
    return stats


def _set_attr(node, name, value) -> None:
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def store_float_weights_fp16(model, min_elements: int = 1024) -> dict:
    """Store large FP32 initializers that are exact in FP16 as FP16 plus a ``Cast`` to FP32.

    The layers kept out of INT8 have their weights rounded to FP16 at quantization time
    (``quantize.round_high_precision_weights``), so this halves their storage without changing a
    single value; ONNX Runtime and TensorRT fold the Cast when they load the model.

    Returns:
        ``{"tensors": n, "bytes_saved": b}``.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    new_nodes, stats = [], {"tensors": 0, "bytes_saved": 0}
    for i, init in enumerate(list(graph.initializer)):
        if init.data_type != TensorProto.FLOAT:
            continue
        a = numpy_helper.to_array(init)
        if a.size < min_elements:
            continue
        h = a.astype(np.float16)
        if not np.array_equal(h.astype(np.float32), a):
            continue
        name = init.name
        graph.initializer[i].CopyFrom(numpy_helper.from_array(h, name + "_fp16"))
        new_nodes.append(helper.make_node("Cast", [name + "_fp16"], [name], to=TensorProto.FLOAT,
                                          name=name + "_cast"))
        stats["tensors"] += 1
        stats["bytes_saved"] += a.nbytes - h.nbytes
    # Casts first: every node that reads the weight comes after its producer (topological order).
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return stats


def remove_unused_initializers(model) -> int:
    """Drop initializers no node uses; returns how many were removed."""
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    removed = len(graph.initializer) - len(keep)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return removed


def qdq_report(model) -> dict:
    """Which compute ops run quantized, and whether any quantized weight is still stored in float.

    A compute op counts as quantized when both its activation input and its weight come from
    DequantizeLinear; ``half_quantized`` lists ops with Q/DQ on only one of them (a bug in a
    recipe or an export), ``float_weights_behind_qdq`` lists DequantizeLinear nodes whose input
    is a float initializer (a weight that was not folded).
    """
    from onnx import TensorProto

    graph = model.graph
    prod = _producers(graph)
    inits = {i.name: i for i in graph.initializer}
    counts = collections.Counter()
    half = []
    for n in graph.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        srcs = [prod.get(i) for i in n.input[:2]]
        dq = [s is not None and s.op_type == "DequantizeLinear" for s in srcs]
        if all(dq):
            counts[f"{n.op_type}:quantized"] += 1
        else:
            counts[f"{n.op_type}:float"] += 1
            if any(dq):
                half.append(n.name)
    unfolded = [
        n.name for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
        and inits[n.input[0]].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
    ]
    weight_dtypes = collections.Counter(
        TensorProto.DataType.Name(inits[n.input[0]].data_type).lower()
        for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
    )
    return {
        "ops": dict(sorted(counts.items())),
        "quantized_ops": sum(v for k, v in counts.items() if k.endswith(":quantized")),
        "float_ops": sum(v for k, v in counts.items() if k.endswith(":float")),
        "half_quantized": half,
        "float_weights_behind_qdq": unfolded,
        "quantized_weight_dtypes": dict(weight_dtypes),
        "node_count": len(graph.node),
    }
