"""The CUDA serving graph: one FP32 graph from any export, ONNX Runtime's diffusion fusions, then FP16.

ONNX Runtime's CUDA provider has no INT8/INT4/FP8 kernels for Q/DQ graphs: a quantized export
runs every op in FP32 there (11.8 ms vs 6.2 ms per FP16 step on an H200, DESIGN.md §6). Its
diffusion optimizer (``onnxruntime.transformers.optimizer``, ``model_type="unet"``) fuses
attention into ``MultiHeadAttention`` (flash attention), GroupNorm into ``GroupNorm`` /
``SkipGroupNorm`` (channels-last) and convolutions into ``NhwcConv`` — but only on a plain float
graph exported with diffusers' classic attention arithmetic (``export.onnx.classic_attention``).
So every export is first brought to one canonical FP32 graph (:func:`.dequantize.prepare_fp32`:
low-bit weights dequantized, activation Q/DQ dropped, FP16 upcast), then fused (:func:`fuse`) and converted to FP16 with the optimizer's own converter
(:func:`to_fp16`: it keeps ``Resize`` scales and ``GroupNorm`` gamma/beta FP32, and here the
timestep's sinusoidal embedding too, where FP16 would round ``t * f`` by up to half a radian).
Everything here is graph work in Python (onnx + numpy): it runs on a machine without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging

from adm_export.engines.onnxruntime.dequantize import FLOAT_NAMES
from adm_export.export.onnx_graph import node_attr

logger = logging.getLogger(__name__)

# Hidden sizes (the GEGLU projection's output, before the split) that ONNX Runtime's
# BiasSplitGelu CUDA kernel accepts (onnxruntime-gpu 1.31; older builds: 2560/5120/10240). Any
# other width makes the fused op fail at run time, so the fusion is enabled only when every
# GEGLU of the graph has one of these (AudioLDM-S has 2048: off).
SPLIT_GELU_WIDTHS = frozenset({2560, 5120, 6144, 10240, 12288})
# The optimizer's fused op types, as reported in ``layers.json`` -> ``fusions``.
FUSED_OPS = ("MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu",
             "BiasAdd", "LayerNormalization", "SkipLayerNormalization")
# Ops that do the arithmetic of a layer (counted by precision in ``layer_precisions``).
COMPUTE_OPS = frozenset({"Conv", "NhwcConv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm",
                         "MultiHeadAttention", "Attention"})
# FusionOptions switches of the fusions whose ops only the CUDA provider implements.
_CUDA_ONLY_SWITCHES = ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                       "enable_bias_add")


# -- fusion ---------------------------------------------------------------------------------------
def geglu_widths(model) -> list[int]:
    """Hidden sizes of the graph's GEGLU feed-forwards (the bias length of ``Add -> Slice -> Gelu``)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    prod = {o: n for n in graph.node for o in n.output}
    widths = set()
    for gelu in graph.node:
        if gelu.op_type not in ("Gelu", "Erf"):
            continue
        # Exported Gelu is x * 0.5 * (1 + Erf(x / sqrt 2)): climb from Erf through Div to the Slice.
        node = gelu
        for _ in range(3):
            node = prod.get(node.input[0])
            if node is None or node.op_type == "Slice":
                break
        if node is None or node.op_type != "Slice":
            continue
        add = prod.get(node.input[0])
        if add is None or add.op_type != "Add":
            continue
        for name in add.input:
            if name in inits and len(inits[name].dims) == 1:
                widths.add(int(numpy_helper.to_array(inits[name]).shape[0]))
    return sorted(widths)


def _data_dependent(graph) -> set[str]:
    """Tensors whose values depend on the graph's input data (shapes alone do not count)."""
    shape_only = {"Shape", "Size", "ConstantOfShape", "EyeLike"}
    dependent = {v.name for v in graph.input} - {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type in shape_only:
            continue
        if node.op_type in ("Expand", "Reshape", "Tile", "Slice") and node.input and node.input[0] not in dependent:
            continue  # data taken from a constant; the other inputs only give shapes or indices
        if any(i in dependent for i in node.input):
            dependent.update(o for o in node.output if o)
    return dependent


def protect_masked_attention(model) -> int:
    """Keep attention with a mask out of the optimizer's attention fusion (it would drop the mask).

    diffusers' classic processor exports ``baddbmm(bias, q, k^T, beta, alpha)`` as
    ``Add(Mul(MatMul(q, k^T), alpha), Mul(bias, beta))`` before the softmax. ONNX Runtime's U-Net
    attention fusion (1.31/1.32) matches ``Softmax <- Add <- Mul <- MatMul`` and treats the
    ``Add`` as adding zero, which holds without a mask (``beta = 0``) but not for TANGO's text
    mask: fused, the masked cross-attention attended to padding (measured: 2.9e-2 relative error
    of the whole U-Net on the CPU). Swapping that ``Add``'s operands (it is commutative) makes the
    pattern fail to match, so a masked attention stays unfused and correct, and the fused-op
    counts say so.

    Returns:
        Number of attention blocks protected.
    """
    graph = model.graph
    prod = {o: n for n in graph.node for o in n.output}
    dependent = _data_dependent(graph)
    protected = 0
    for softmax in graph.node:
        add = prod.get(softmax.input[0]) if softmax.op_type == "Softmax" else None
        if add is None or add.op_type != "Add" or len(add.input) != 2:
            continue
        scores = prod.get(add.input[0])
        if scores is None or scores.op_type != "Mul" or not any(
                (p := prod.get(i)) is not None and p.op_type == "MatMul" for i in scores.input):
            continue
        if add.input[1] in dependent:
            add.input[0], add.input[1] = add.input[1], add.input[0]
            protected += 1
    return protected


def fusion_options(model, cuda: bool = True):
    """The optimizer's ``FusionOptions`` for this graph, and the decisions behind them.

    Args:
        model: The canonical FP32 graph.
        cuda: ``False`` turns off the fusions whose ops only the CUDA provider runs (GroupNorm,
            SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd), giving a graph the CPU provider can
            run to check the remaining fusions numerically.

    Returns:
        ``(FusionOptions, decisions)``.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions("unet")
    widths = geglu_widths(model)
    opts.enable_bias_splitgelu = bool(widths) and set(widths) <= SPLIT_GELU_WIDTHS
    decisions = {"bias_split_gelu": {"enabled": opts.enable_bias_splitgelu, "geglu_widths": widths,
                                     "kernel_widths": sorted(SPLIT_GELU_WIDTHS)}}
    if not cuda:
        for switch in _CUDA_ONLY_SWITCHES:
            setattr(opts, switch, False)
        # The CPU MultiHeadAttention kernel takes separate Q, K, V only ("Packed QKV ... not
        # implemented for CPU").
        opts.enable_packed_qkv = opts.enable_packed_kv = False
        decisions["cuda_only_fusions"] = False
    return opts, decisions


def fuse(model, cuda: bool = True):
    """Run ONNX Runtime's diffusion optimizer (Python fusions only, ``opt_level=0``) on an FP32 graph.

    Args:
        model: The canonical FP32 graph (:func:`.dequantize.prepare_fp32`); not modified.
        cuda: See :func:`fusion_options`.

    Returns:
        ``(optimizer, report)``: the optimizer's ``OnnxModel`` (its ``.model`` is the fused graph)
        and ``{"fusions": {op: n}, "decisions": ...}``.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    import onnx

    opts, decisions = fusion_options(model, cuda)
    work = onnx.ModelProto()
    work.CopyFrom(model)  # the optimizer rewrites the proto it is given
    decisions["masked_attention_left_unfused"] = protect_masked_attention(work)
    # The optimizer writes a tqdm bar and warnings to stderr; keep them out of the user's terminal.
    noise = io.StringIO()
    with contextlib.redirect_stderr(noise):
        opt = optimize_model(work, model_type="unet", opt_level=0, optimization_options=opts, use_gpu=cuda)
        stats = opt.get_fused_operator_statistics()
    if noise.getvalue().strip():
        logger.debug("onnxruntime optimizer: %s", noise.getvalue().strip()[-2000:])
    declare_contrib_domain(opt.model)
    fusions = {op: int(stats.get(op, 0)) for op in FUSED_OPS}
    return opt, {"fusions": fusions, "decisions": decisions}


def declare_contrib_domain(model) -> None:
    """Import the ``com.microsoft`` opset when contrib ops are used (the optimizer's own ``save`` does
    this; a model saved with ``onnx.save`` must carry it itself)."""
    from onnx import helper

    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
            o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def timestep_path(model, input_name: str = "timestep") -> list[str]:
    """Names of the nodes that compute a function of the timestep alone, up to the first layer.

    The sinusoidal embedding multiplies ``t`` (up to 1000) by frequencies: FP16 would round the
    product by up to half a radian before ``sin``/``cos``, so these nodes stay FP32 (the traced
    FP16 export keeps them FP32 for the same reason). A node that also reads the latent (or any
    other input's data) is not on the path, and neither is a linear layer (the converter casts to
    FP16 in front of it).
    """
    graph = model.graph
    dependent = _data_dependent(graph)
    stop = COMPUTE_OPS | {"QuantizeLinear", "DequantizeLinear"}
    on_path = {input_name}
    names = []
    for node in graph.node:
        data_inputs = [i for i in node.input if i in dependent]
        if node.op_type in stop or not data_inputs or any(i not in on_path for i in data_inputs):
            continue
        on_path.update(o for o in node.output if o)
        names.append(node.name)
    return names


def name_nodes(model) -> int:
    """Give every unnamed or duplicate-named node a unique name (the FP16 converter blocks nodes by name)."""
    used: set[str] = set()
    renamed = 0
    for k, n in enumerate(model.graph.node):
        if not n.name or n.name in used:
            base = f"{n.op_type}_adm{k}"
            n.name = base
            j = 0
            while n.name in used:
                j += 1
                n.name = f"{base}_{j}"
            renamed += 1
        used.add(n.name)
    return renamed


def to_fp16(opt, keep_fp32_nodes: list[str] = ()) -> None:
    """Convert the fused graph to FP16 in place with the optimizer's own converter (IO stays FP32).

    ``keep_io_types=True``: the engine's inputs and output stay FP32 (casts inside), so the graph
    serves the FP32 pipeline without host-side conversions.
    """
    noise = io.StringIO()
    with contextlib.redirect_stderr(noise):
        opt.convert_float_to_float16(keep_io_types=True, node_block_list=list(keep_fp32_nodes))
        opt.topological_sort()
    if noise.getvalue().strip():
        logger.debug("onnxruntime fp16 converter: %s", noise.getvalue().strip()[-2000:])


# -- what the served graph computes in ------------------------------------------------------------
def tensor_types(model) -> dict[str, int]:
    """The ONNX element type of every tensor, propagated through the graph in node order.

    ONNX shape inference does not know the optimizer's contrib ops, so the types are followed by
    rule: ``Cast`` sets its target, Q/DQ their quantized / scale type, shape ops INT64, any
    other op the type of its first float input (none of the served ops changes float type).
    """
    from onnx import TensorProto

    graph = model.graph
    types: dict[str, int] = {i.name: i.data_type for i in graph.initializer}
    for v in (*graph.input, *graph.value_info):
        types.setdefault(v.name, v.type.tensor_type.elem_type)
    int_ops = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}
    bool_ops = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "IsNaN", "IsInf"}
    for node in graph.node:
        if node.op_type == "Cast":
            out = node_attr(node, "to")
        elif node.op_type == "DequantizeLinear" and len(node.input) > 1:
            out = types.get(node.input[1])
        elif node.op_type == "QuantizeLinear":
            out = types.get(node.input[2]) if len(node.input) > 2 and node.input[2] else TensorProto.UINT8
        elif node.op_type in int_ops:
            out = TensorProto.INT64
        elif node.op_type in bool_ops:
            out = TensorProto.BOOL
        else:
            known = [types[i] for i in node.input if i in types]
            floats = [t for t in known if t in FLOAT_NAMES]
            out = floats[0] if floats else (known[0] if known else None)
        for o in node.output:
            if o and out is not None:
                types[o] = out
    return types


def compute_precisions(model) -> dict:
    """The served graph's compute ops by the precision they run in (their activation input's type).

    Returns:
        ``{"layer_precisions": {"fp16": n, ...}, "compute_ops": {"NhwcConv": n, ...},
        "weight_dtypes": {"fp16": n, ...}}`` (weights: the element type of each compute op's
        initializer input).
    """
    from onnx import TensorProto

    graph = model.graph
    types = tensor_types(model)
    inits = {i.name: i for i in graph.initializer}
    precisions: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    weights: collections.Counter = collections.Counter()
    name = lambda t: FLOAT_NAMES.get(t) or TensorProto.DataType.Name(t).lower() if t is not None else "unknown"  # noqa: E731
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        ops[node.op_type] += 1
        precisions[name(types.get(node.input[0]))] += 1
        for i in node.input[1:]:
            if i in inits:
                weights[name(inits[i].data_type)] += 1
                break
    return {"layer_precisions": dict(sorted(precisions.items())), "compute_ops": dict(sorted(ops.items())),
            "weight_dtypes": dict(sorted(weights.items()))}
