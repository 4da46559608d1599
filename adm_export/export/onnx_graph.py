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

Over 500 lines on purpose: these passes share the graph helpers at the top (producers, consumers,
initializer access) and run in order on one graph; split, every module would carry the same helpers
or import them from a fourth.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


def _producers(graph) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def consumers(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    out = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            out[i].append(n)
    return out


def node_attr(node, name, default=None):
    """The value of a node attribute, or ``default``."""
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
    readers = consumers(graph)
    remove_nodes: set[int] = set()
    new_inits: list = []
    stats = {"folded": 0, "transposes": 0, "fp32_bytes_removed": 0}
    rename: dict[str, str] = {}

    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] not in inits:
            continue
        dqs = readers.get(q.output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            continue
        dq = dqs[0]
        w = numpy_helper.to_array(inits[q.input[0]])
        scale = numpy_helper.to_array(inits[q.input[1]])
        zp = numpy_helper.to_array(inits[q.input[2]]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        axis = node_attr(q, "axis", 1)
        qw = quantize_like_onnx(w, scale, zp, axis)
        # Fold a following Transpose into the integer weight (linear layers export as W^T).
        users = readers.get(dq.output[0], [])
        if len(users) == 1 and users[0].op_type == "Transpose" and qw.ndim >= 2:
            tr = users[0]
            perm = list(node_attr(tr, "perm", list(reversed(range(qw.ndim)))))
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
    DequantizeLinear, as ``weight_only`` when only its weight does (W4A16); ``half_quantized``
    lists ops whose activation has Q/DQ but whose weight does not (a bug in a recipe or an export), ``float_weights_behind_qdq`` lists DequantizeLinear nodes whose input
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
        elif dq[1] and not dq[0]:
            # Weight-only (W4A16): the activation stays in float by design, not a half-done Q/DQ.
            counts[f"{n.op_type}:weight_only"] += 1
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
        "weight_only_ops": sum(v for k, v in counts.items() if k.endswith(":weight_only")),
        "half_quantized": half,
        "float_weights_behind_qdq": unfolded,
        "quantized_weight_dtypes": dict(weight_dtypes),
        "node_count": len(graph.node),
    }


# -- low-bit weight encoding (every format) ------------------------------------------------------
def module_of(node, scope_prefix: str | None = "unet") -> str | None:
    """Module path of a compute node named by the TorchScript exporter (``/unet/a.0/b/Conv``).

    ``scope_prefix`` is the wrapper attribute the exported module holds the denoiser under (the
    adapters' export modules call it ``unet``); it is not part of the layer name.
    """
    parts = node.name.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[-1] != node.op_type:
        return None
    path = parts[1:-1]
    if scope_prefix and path and path[0] == scope_prefix:
        path = path[1:]
    # A child with a numeric name keeps its parent's name in its scope (nn.Sequential children:
    # ".../in_layers/in_layers.2/Conv", Make-An-Audio's LDM U-Net): drop the repeated parent.
    names: list[str] = []
    for part in path:
        if names and part.startswith(names[-1] + "."):
            names[-1] = part
        else:
            names.append(part)
    return ".".join(names) or None


def _weight_layout(node) -> tuple[int, ...] | None:
    """Permutation from the torch weight layout to the ONNX one for the node's weight input."""
    if node.op_type == "Conv":
        return None
    if node.op_type == "Gemm":
        return None if node_attr(node, "transB", 0) else (1, 0)
    return (1, 0)  # MatMul: x @ W^T exported with the transposed weight


def _dequantize(codes: np.ndarray, scale: np.ndarray, axis: int | None, block: int | None) -> np.ndarray:
    x = codes.astype(np.float32)
    if axis is None:
        return x * scale.astype(np.float32)
    if block:
        s = np.repeat(scale.astype(np.float32), block, axis=axis)
        s = np.take(s, np.arange(x.shape[axis]), axis=axis)
        return x * s
    shape = [1] * x.ndim
    shape[axis] = -1
    return x * scale.astype(np.float32).reshape(shape)


def encode_weights(model, codecs: dict[str, dict], scope_prefix: str | None = "unet") -> dict:
    """Replace the float weight of every quantized layer by low-bit codes feeding DequantizeLinear.

    The model was exported with each quantized layer's weight already equal to its fake-quant
    value (``codes x scale``) and no weight Q/DQ; ``codecs`` (from the torch model) gives, per
    layer, ``codes`` (int8 / ``ml_dtypes`` int4 or float8_e4m3fn, torch layout), ``scale``
    (FP32: per output channel ``axis=0``, per tensor ``axis=None``, or per block of ``block``
    along ``axis``). Each weight initializer is located through its consumer node's module path,
    re-laid out (a linear layer's MatMul holds W^T), checked to dequantize to exactly the
    exported values (so no weight is ever mismatched), and replaced: ``<name>_quantized`` ->
    DequantizeLinear -> the original tensor name, so the consumer is untouched. The float tensor
    is removed: no full-precision copy of a quantized weight is left.

    Returns:
        ``{"encoded": n, "by_format": {...}, "float_bytes_removed": b, "stored_bytes": b}``.

    Raises:
        RuntimeError: a layer's weight was not found, or its codes do not reproduce it (a bug).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = consumers(graph)
    stats = {"encoded": 0, "by_format": collections.Counter(), "float_bytes_removed": 0, "stored_bytes": 0}
    new_nodes, drop, seen = [], set(), set()
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        layer = module_of(node, scope_prefix)
        if layer not in codecs:
            continue
        wname = node.input[1]
        if wname not in inits or len(readers.get(wname, [])) != 1:
            raise RuntimeError(f"{node.name}: weight {wname!r} of quantized layer {layer} is not a private "
                               f"initializer; cannot encode it")
        c = codecs[layer]
        w = numpy_helper.to_array(inits[wname]).astype(np.float32)
        codes, scale, axis, block = c["codes"], np.asarray(c["scale"], np.float32), c["axis"], c.get("block")
        perm = _weight_layout(node)
        if perm is not None:
            codes = np.ascontiguousarray(np.transpose(codes, perm))
            if scale.ndim == codes.ndim:
                scale = np.ascontiguousarray(np.transpose(scale, perm))
            if axis is not None:
                axis = perm.index(axis)
        if codes.shape != w.shape:
            raise RuntimeError(f"{node.name}: codes {codes.shape} vs exported weight {w.shape}")
        deq = _dequantize(codes, scale, axis, block)
        tol = 1e-5 * float(np.abs(w).max() or 1.0)
        err = float(np.abs(deq - w).max())
        if err > tol:
            raise RuntimeError(f"{node.name}: {c['format']} codes reproduce the exported weight only to {err:.3g} "
                               f"(tolerance {tol:.3g})")
        qname = wname + "_quantized"
        sname = wname + "_scale"
        graph.initializer.append(numpy_helper.from_array(codes, qname))
        graph.initializer.append(numpy_helper.from_array(scale.reshape(-1) if (axis is not None and not block)
                                                         else scale, sname))
        attrs = {}
        if axis is not None:
            attrs["axis"] = axis
        if block:
            attrs["block_size"] = int(block)
        new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [wname],
                                          name=f"{node.name}_weight_dq", **attrs))
        drop.add(wname)
        seen.add(layer)
        stats["encoded"] += 1
        stats["by_format"][c["format"]] += 1
        stats["float_bytes_removed"] += w.nbytes
        stats["stored_bytes"] += int(np.prod(codes.shape) * (0.5 if c["format"] == "int4" else 1)) + scale.nbytes
    missing = sorted(set(codecs) - seen)
    if missing:
        raise RuntimeError(f"quantized layers not found in the ONNX graph: {missing[:5]} ({len(missing)} total)")
    keep = [i for i in graph.initializer if i.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = new_nodes + list(graph.node)  # producers before consumers
    del graph.node[:]
    graph.node.extend(nodes)
    stats["by_format"] = dict(stats["by_format"])
    return stats


def rewrite_trt_fp8(model) -> int:
    """Rewrite ModelOpt's ``trt::TRT_FP8QuantizeLinear/DequantizeLinear`` as standard ONNX Q/DQ.

    Standard QuantizeLinear/DequantizeLinear with an FLOAT8E4M3FN zero point (opset >= 19) mean
    the same (``saturate(x / scale)`` to E4M3, then ``q x scale``), and ONNX Runtime and TensorRT
    both load them, where the TensorRT-domain ops load nowhere but TensorRT.

    Returns:
        Number of nodes rewritten.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    zp = "adm_fp8_zero_point"
    n = 0
    for node in graph.node:
        if node.domain == "trt" and node.op_type in ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"):
            node.op_type = node.op_type.replace("TRT_FP8", "")
            node.domain = ""
            if len(node.input) == 2:
                node.input.append(zp)
            n += 1
    if n:
        graph.initializer.append(helper.make_tensor(zp, TensorProto.FLOAT8E4M3FN, [], [0.0]))
        # The exporter typed the custom ops' outputs on its own; let consumers infer them again.
        del graph.value_info[:]
    leftover = [x.op_type for x in graph.node if x.domain == "trt"]
    if leftover:
        raise RuntimeError(f"TensorRT-domain ops left after the FP8 rewrite: {sorted(set(leftover))}")
    keep = [o for o in model.opset_import if o.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return n


def set_opset(model, opset: int) -> None:
    """Convert the default-domain opset (e.g. 17 -> 21 for INT4 / FP8 Q/DQ), keeping other domains."""
    from onnx import version_converter

    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current == opset:
        return
    converted = version_converter.convert_version(model, opset)
    model.CopyFrom(converted)


def float_copies_of_quantized_weights(model) -> list[str]:
    """Float initializers holding the dequantized values of a low-bit weight (should be none)."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    floats = [i for i in graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
              and len(i.dims) >= 2]
    by_size = collections.defaultdict(list)
    for f in floats:
        by_size[int(np.prod(f.dims))].append(f)
    hits = []
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        q = inits[n.input[0]]
        if q.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            hits.append(q.name)
            continue
        size = int(np.prod(q.dims))
        cand = by_size.get(size, [])
        if not cand:
            continue
        codes = numpy_helper.to_array(q).astype(np.float32)
        views = [codes.reshape(-1)]
        if codes.ndim == 2:
            views.append(codes.T.reshape(-1))  # a linear layer's weight is also held transposed
        for f in cand:
            v = numpy_helper.to_array(f).astype(np.float32).reshape(-1)
            # A float copy is proportional to the codes (per channel or block): a near-perfect
            # correlation is scale-free and cheap to test.
            if any(np.std(v) > 0 and np.std(c) > 0 and abs(np.corrcoef(v, c)[0, 1]) > 0.98 for c in views):
                hits.append(f.name)
    return hits


def activations_to_uint8(model) -> int:
    """Re-express INT8 activation Q/DQ pairs (zero point 0) as UINT8 with zero point 128.

    Exactly the same values (the symmetric INT8 grid -128..127 shifted by 128 is 0..255), but ONNX
    Runtime's CPU provider fuses DQ -> Conv -> Q into QLinearConv only for UINT8 activations
    (its Conv selector refuses signed activations where ``int8_allowed`` is off, as on this x86
    build); INT8 weights stay INT8 (u8s8 kernels). Used for ``--placement onnxruntime`` only:
    TensorRT wants signed symmetric Q/DQ.

    Returns:
        Number of Q/DQ nodes changed.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    prod = _producers(graph)
    shifted: dict[str, str] = {}
    n = 0

    def u8(name):
        if name not in shifted:
            zp = numpy_helper.to_array(inits[name])
            shifted[name] = name + "_u8"
            graph.initializer.append(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8),
                                                             shifted[name]))
        return shifted[name]

    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        zp = inits.get(node.input[2])
        if zp is None or zp.data_type != 3:  # TensorProto.INT8
            continue
        node.input[2] = u8(node.input[2])
        n += 1
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in prod and prod[node.input[0]].op_type == "QuantizeLinear":
            q = prod[node.input[0]]
            if len(node.input) >= 3 and q.input[2].endswith("_u8"):
                node.input[2] = q.input[2]
                n += 1
    if n:
        del graph.value_info[:]
    remove_unused_initializers(model)
    return n


def _constant(name: str, inits: dict, prod: dict) -> np.ndarray | None:
    """The value of an initializer or of a ``Constant`` node's tensor (an unfolded export keeps
    those), else ``None``."""
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = prod.get(name)
    value = node_attr(node, "value") if node is not None and node.op_type == "Constant" else None
    return numpy_helper.to_array(value) if value is not None else None


def _all_zero(name: str, inits: dict, prod: dict) -> bool:
    """Whether tensor ``name`` is a constant zero: a zero initializer or ``Constant``, a
    ``ConstantOfShape`` of zero, or a ``Mul`` of such a zero by a finite constant (the exporter's
    ``empty * beta`` with beta 0)."""
    from onnx import numpy_helper

    value = _constant(name, inits, prod)
    if value is not None:
        return not np.any(value)
    node = prod.get(name)
    if node is None:
        return False
    if node.op_type == "ConstantOfShape":
        value = node_attr(node, "value")
        return value is None or not np.any(numpy_helper.to_array(value))
    if node.op_type == "Mul" and len(node.input) == 2:
        a, b = node.input
        finite = lambda n: (v := _constant(n, inits, prod)) is not None and np.all(np.isfinite(v))  # noqa: E731
        return (_all_zero(a, inits, prod) and (finite(b) or _all_zero(b, inits, prod))) or \
            (_all_zero(b, inits, prod) and finite(a))
    return False


def _attention_scores(name: str, prod: dict) -> bool:
    """Whether ``name`` is a ``MatMul`` output, or one scaled by a ``Mul``/``Div`` (``alpha * q k^T``)."""
    node = prod.get(name)
    if node is None:
        return False
    if node.op_type == "MatMul":
        return True
    return node.op_type in ("Mul", "Div") and any(
        prod.get(i) is not None and prod[i].op_type == "MatMul" for i in node.input)


def fold_zero_attention_bias(model) -> int:
    """Remove ``Add(scores, zeros)`` where the second term is a constant zero: the scores go on.

    diffusers' classic attention computes the scores as ``baddbmm(empty, q, k^T, beta=0,
    alpha=scale)``, which the TorchScript exporter writes as ``Add(Mul(MatMul(q, k^T), alpha),
    Mul(ConstantOfShape(0), 0))``: a zero tensor the size of the attention scores is made,
    multiplied and added on every call (three passes over B x heads x L x L values on the CPU)
    to add nothing (with static shapes, constant folding leaves an all-zero initializer instead).
    A masked attention (a real bias, beta = 1) is left alone. Broadcasting is safe: the zero term
    is the size of the scores, never larger than them. Only an addition to a (scaled) ``MatMul``
    output is removed: a zero GroupNorm beta (``Add(Mul(norm, gamma), 0)``, as in a freshly
    initialised model) stays, because ONNX Runtime's diffusion optimizer matches GroupNorm and
    SiLU by that pattern (without the Add it mistook the gamma ``Mul`` for QuickGelu's and failed).

    Returns:
        The number of additions removed.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    prod = _producers(graph)
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or node.output[0] in outputs:
            continue
        for keep, other in ((0, 1), (1, 0)):
            if not _all_zero(node.input[other], inits, prod) or not _attention_scores(node.input[keep], prod):
                continue
            rename[node.output[0]] = node.input[keep]
            drop.add(id(node))
            break
    if not drop:
        return 0
    kept = [n for n in graph.node if id(n) not in drop]
    for n in kept:
        for k, name in enumerate(n.input):
            while name in rename:
                name = rename[name]
            n.input[k] = name
    del graph.node[:]
    graph.node.extend(kept)
    remove_dead_nodes(model)
    del graph.value_info[:]
    return len(drop)


def remove_dead_nodes(model) -> int:
    """Drop nodes none of whose outputs is used (by a node or as a graph output), repeatedly."""
    graph = model.graph
    removed = 0
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        kept = [n for n in graph.node if any(o in used for o in n.output if o)]
        if len(kept) == len(graph.node):
            break
        removed += len(graph.node) - len(kept)
        del graph.node[:]
        graph.node.extend(kept)
    remove_unused_initializers(model)
    return removed


def activations_to_int8(model) -> int:
    """The inverse of :func:`activations_to_uint8`: UINT8 activation Q/DQ (zero point 128) back to INT8 (zero point 0).

    Exactly the same values. TensorRT(-RTX) parses only signed, symmetric Q/DQ (a UINT8 zero
    point is a DLA-only feature and is refused), so the engine stage builds a TensorRT plan of an
    ONNX-Runtime-placement export from this form.

    Returns:
        Number of Q/DQ nodes changed.

    Raises:
        ValueError: a UINT8 activation zero point other than 128 (not a shifted symmetric grid).
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    signed: dict[str, str] = {}
    n = 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        if node.input[0] in inits:  # a weight: its zero point is INT8 already
            continue
        zp = inits.get(node.input[2])
        if zp is None or zp.data_type != TensorProto.UINT8:
            continue
        if node.input[2] not in signed:
            values = numpy_helper.to_array(zp)
            if np.any(values != 128):
                raise ValueError(f"{node.name}: UINT8 zero point {values.tolist()} is not the shifted symmetric 128")
            signed[node.input[2]] = node.input[2] + "_s8"
            graph.initializer.append(numpy_helper.from_array(np.zeros(values.shape, np.int8), signed[node.input[2]]))
        node.input[2] = signed[node.input[2]]
        n += 1
    if n:
        del graph.value_info[:]
    remove_unused_initializers(model)
    return n


def shorten_tensor_names(model) -> int:
    """Rename intermediate tensors to short ids (``t<k>``); returns the bytes saved (approx.).

    The TorchScript exporter names every intermediate tensor after its module path
    (``/unet/down_blocks.1/attentions.0/.../QuantizeLinear_output_0``), each written twice (producer
    and consumer): about 1.5 MB of a full-size U-Net file, enough to matter for a size target.
    Node names (which carry the module path, and which TensorRT's layer report shows), graph
    inputs/outputs and parameter-derived initializer names are kept.
    """
    graph = model.graph
    keep = {i.name for i in graph.input} | {o.name for o in graph.output}
    rename: dict[str, str] = {}
    saved = 0
    # Exporter-generated constants ("/unet/.../Constant_output_0", "onnx::Mul_123": Q/DQ scales,
    # zero points, shape constants) get short names too; parameter-derived names ("unet.<module>
    # .weight_quantized", its "_scale") are kept: they say which layer a weight belongs to.
    for init in graph.initializer:
        if init.name.startswith(("/", "onnx::")) and init.name not in keep:
            new = rename.setdefault(init.name, f"c{len(rename)}")
            saved += len(init.name) - len(new)
            init.name = new
    keep |= {i.name for i in graph.initializer}
    for node in graph.node:
        for k, name in enumerate(node.output):
            if name and name not in keep:
                new = rename.setdefault(name, f"t{len(rename)}")
                saved += len(name) - len(new)
                node.output[k] = new
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                saved += len(name) - len(rename[name])
                node.input[k] = rename[name]
    del graph.value_info[:]
    return saved


# Shape and data-movement ops: their node names (the exporter's module path plus the op) say
# nothing a reader or TensorRT's layer report needs.
_PLUMBING_OPS = frozenset({"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "ConstantOfShape", "Cast", "Identity",
                           "Range", "Expand", "Equal", "Where", "Slice", "Reshape", "Transpose"})


def shorten_plumbing_node_names(model) -> int:
    """Give shape and data-movement nodes short names (``s<k>``); returns the bytes saved (approx.).

    The classic attention arithmetic that ONNX Runtime's fusions need (``export.onnx.classic_attention``)
    traces each head split as Shape/Gather/Unsqueeze/Concat/Reshape chains, each node named after
    its full module path: about 1.3 % of the tiny U-Net's quantized file. Compute, Q/DQ,
    normalisation and activation nodes keep their names (the layer report and the weight
    encoding read them).
    """
    saved, k = 0, 0
    for node in model.graph.node:
        if node.op_type in _PLUMBING_OPS:
            new = f"s{k}"
            saved += len(node.name) - len(new)
            node.name = new
            k += 1
    return saved


def dedupe_scalar_initializers(model) -> int:
    """Share identical INT64 scalar / 1-element initializers (the exporter's shape constants).

    Q/DQ scales and zero points are deliberately left alone: ONNX Runtime's QDQ transformers
    rewrite zero-point initializers in place (e.g. INT8 -> UINT8), and sharing one between Q/DQ
    pairs it treats differently changed the output (measured: 0.08 max abs on the tiny U-Net).

    Returns:
        Number of initializers removed.
    """
    graph = model.graph
    keep_names = {i.name for i in graph.input} | {o.name for o in graph.output}
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for init in graph.initializer:
        if len(init.dims) > 1 or (len(init.dims) == 1 and init.dims[0] > 1) or init.name in keep_names:
            continue
        if init.data_type != 7:  # TensorProto.INT64
            continue
        key = (init.data_type, tuple(init.dims), init.SerializeToString(deterministic=True).replace(
            init.name.encode(), b""))
        if key in first:
            alias[init.name] = first[key]
        else:
            first[key] = init.name
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = alias[name]
    return remove_unused_initializers(model)
