"""The layer report: which precision each convolution / matmul of a built engine runs in.

Evidence, best first (``source`` in the report): the engine inspector (needs a GPU to deserialize),
TensorRT-RTX's plan listing (undocumented; read on a best-effort basis), the parsed network
definition (what the graph asks for). See the package docstring.
"""

from __future__ import annotations

import json
import logging
import re

logger = logging.getLogger(__name__)

_COMPUTE_TYPES = {"CONVOLUTION", "DECONVOLUTION", "MATRIX_MULTIPLY"}
_QDQ_TYPES = {"QUANTIZE", "DEQUANTIZE", "DYNAMIC_QUANTIZE"}
_PASS_THROUGH_TYPES = {"SHUFFLE", "SQUEEZE", "UNSQUEEZE"}  # move data without changing its type
_NON_NUMERIC = {"bool", "int32", "int64", None}
_COMPUTE_HINT = re.compile(r"conv|corrltn|gemm|matrix|matmul|fully|fc|deconv|xmma|fprop|mma", re.I)
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]\n]+)\]")

# nvinfer DataType names -> report names.
_TRT_DTYPES = {
    "FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "INT8": "int8", "UINT8": "uint8", "FP8": "fp8",
    "INT4": "int4", "FP4": "fp4", "INT32": "int32", "INT64": "int64", "BOOL": "bool", "E8M0": "e8m0",
}
# TensorRT-RTX plan listing type names -> report names.
_PLAN_DTYPES = {
    "float": "fp32", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16", "int8": "int8",
    "uint8": "uint8", "int4": "int4", "int32": "int32", "int64": "int64", "bool": "bool",
}



def _trt_dtype(dtype) -> str:
    name = getattr(dtype, "name", str(dtype)).split(".")[-1]
    return _TRT_DTYPES.get(name, name.lower())


def network_info(network) -> dict:
    """Layers of the parsed network, its Q/DQ layer names, and the precision of each conv/matmul."""
    layers, producer = [], {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        entry = {"name": layer.name, "type": layer.type.name, "inputs": [], "outputs": []}
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            entry["inputs"].append(None if t is None else {"name": t.name, "dtype": _trt_dtype(t.dtype)})
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            entry["outputs"].append({"name": t.name, "dtype": _trt_dtype(t.dtype)})
            producer[t.name] = entry
        layers.append(entry)

    def source_dtype(tensor: dict | None, depth: int = 0) -> str | None:
        """The type a tensor was dequantized from, looking through reshapes/transposes."""
        if tensor is None:
            return None
        prod = producer.get(tensor["name"])
        if prod is not None and depth < 8:
            if prod["type"] == "DEQUANTIZE" and prod["inputs"] and prod["inputs"][0]:
                return prod["inputs"][0]["dtype"]
            if prod["type"] in _PASS_THROUGH_TYPES and prod["inputs"]:
                return source_dtype(prod["inputs"][0], depth + 1)
        return tensor["dtype"]

    compute = []
    for entry in layers:
        if entry["type"] in _COMPUTE_TYPES:
            ins = entry["inputs"]
            compute.append({
                "name": entry["name"],
                "type": entry["type"],
                "activation_dtype": source_dtype(ins[0] if ins else None),
                "weight_dtype": source_dtype(ins[1]) if len(ins) > 1 else None,
            })
    qdq = {entry["name"] for entry in layers if entry["type"] in _QDQ_TYPES}
    return {"layers": layers, "compute": compute, "qdq": qdq}


def engine_information(trt, trt_logger, plan: bytes, shapes: dict) -> dict | None:
    """Engine inspector JSON, or None where the engine cannot be deserialized (no GPU)."""
    trt_logger.quiet = True
    try:
        runtime = trt.Runtime(trt_logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            logger.debug("The engine cannot be deserialized on this machine; no engine inspector")
            return None
        inspector = engine.create_engine_inspector()
        context = None
        try:  # with dynamic shapes, formats are known only for concrete shapes
            context = engine.create_execution_context()
            for name, (_, opt, _) in shapes.items():
                context.set_input_shape(name, opt)
            inspector.execution_context = context
        except Exception as exc:
            logger.debug("No execution context for the engine inspector: %s", exc)
        text = inspector.getengine_information(trt.LayerInformationFormat.JSON)
        return json.loads(text)
    except Exception as exc:
        logger.debug("Engine inspector unavailable: %s", exc)
        return None
    finally:
        trt_logger.quiet = False


def _dtype_from_format(text: str) -> str | None:
    """Data type from an inspector "Format/Datatype" string such as "Row major linear FP32"."""
    t = str(text).lower()
    if not t or t.startswith("n/a"):
        return None
    for keys, name in (
        # Order matters: "uint8" contains "int8", "bfloat16" contains "float".
        (("fp8", "e4m3", "float8"), "fp8"), (("uint8",), "uint8"), (("int8",), "int8"),
        (("int4",), "int4"), (("fp4", "e2m1"), "fp4"), (("bf16", "bfloat16"), "bf16"),
        (("half", "fp16", "float16"), "fp16"), (("float", "fp32"), "fp32"), (("int32",), "int32"),
        (("int64",), "int64"), (("bool",), "bool"),
    ):
        if any(k in t for k in keys):
            return name
    return None


def layers_from_inspector(info: dict) -> list[dict]:
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # non-detailed verbosity gives names only
            layer = {"Name": layer}
        name = str(layer.get("Name", ""))
        onnx = _ONNX_LAYER.findall(str(layer.get("Metadata", "")))
        if not onnx:  # no metadata: fused layers are named "a + b + c"
            onnx = [part.strip() for part in name.split(" + ") if part.strip()]

        def dtypes(key):
            return [_dtype_from_format(t.get("Format/Datatype", "")) for t in layer.get(key, [])
                    if isinstance(t, dict)]

        layers.append({
            "name": name,
            "type": str(layer.get("LayerType", "")),
            "tactic": layer.get("TacticName"),
            "origin": "inspector",
            "onnx_layers": onnx,
            "inputs": dtypes("Inputs"),
            "outputs": dtypes("Outputs"),
        })
    return layers


# One op per line: '  corrltn={ name="conv" output={...} input={...} ... layers="[ONNX Layer: conv]',
# further '[ONNX Layer: ...]' lines follow when a kernel implements several ONNX nodes.
_PLAN_OP = re.compile(
    rb'^  ([a-z][a-z0-9_]*)=\{ name="?([^"\s]+)"?([^\n]*(?:\n[\x1e\x1f]?\[ONNX Layer:[^\n]*)*)', re.M
)
_PLAN_TENSOR = re.compile(rb"^  (?:sub_)?tensor=\{ ([^\n]*)", re.M)


def _plan_dtype(name: str) -> str:
    if name.startswith("fp8"):
        return "fp8"
    if name.startswith("fp4"):
        return "fp4"
    return _PLAN_DTYPES.get(name, name)


def layers_from_plan(plan: bytes) -> list[dict]:
    """Kernels listed in a TensorRT-RTX plan (undocumented text; best effort, empty if not found)."""
    try:
        types = {}
        for match in _PLAN_TENSOR.finditer(plan):
            body = match.group(1)
            name, dtype = re.search(rb' name="([^"]+)"', body), re.search(rb" type=(\w+)", body)
            if name and dtype:
                types[name.group(1).decode("utf-8", "replace")] = _plan_dtype(dtype.group(1).decode())
        layers = []
        for match in _PLAN_OP.finditer(plan):
            kind, name, body = (g.decode("utf-8", "replace") for g in match.groups())
            onnx = _ONNX_LAYER.findall(body)
            if not onnx or kind == "tensor":
                continue
            inputs = re.search(r"\binput=\{([^}]*)\}", body)
            names = re.findall(r'"([^"]+)"', inputs.group(1)) if inputs else []
            layers.append({
                "name": name,
                "type": kind,
                "tactic": None,
                "origin": "plan",
                "onnx_layers": list(dict.fromkeys(onnx)),
                "inputs": [types.get(n) for n in names],
                "outputs": [],
            })
        return layers
    except Exception as exc:  # an unexpected layout must not fail the build
        logger.debug("Could not read the plan's kernel listing: %s", exc)
        return []


def _match_engine_layer(name: str, engine_layers: list[dict]) -> dict | None:
    containing = [l for l in engine_layers if name in l["onnx_layers"]]
    for layer in containing:
        if layer["name"] == name:
            return layer
    for layer in containing:
        if _COMPUTE_HINT.search(f"{layer['type']} {layer.get('tactic') or ''} {layer['name']}"):
            return layer
    return containing[0] if containing else None


def _precision(activation: str | None, weight: str | None) -> str:
    activation = activation or "unknown"
    if weight in _NON_NUMERIC or weight == activation:
        return activation
    return f"{weight}w/{activation}a"  # e.g. int4 weight-only GEMM: "int4w/fp16a"


def _compute_rows(net: dict, engine_layers: list[dict] | None) -> tuple[list[dict], int]:
    rows, covered = [], 0
    for c in net["compute"]:
        activation, weight, matched = c["activation_dtype"], c["weight_dtype"], None
        if engine_layers:
            matched = _match_engine_layer(c["name"], engine_layers)
        from_engine = False
        if matched is not None:
            numeric = [d for d in matched["inputs"] if d not in _NON_NUMERIC]
            if numeric:
                activation, from_engine = numeric[0], True
                covered += 1
                # The plan listing gives the weight operand's type too (second input).
                second = matched["inputs"][1] if len(matched["inputs"]) > 1 else None
                if matched["origin"] == "plan" and second not in _NON_NUMERIC:
                    weight = second
        rows.append({
            "name": c["name"],
            "type": c["type"],
            "precision": _precision(activation, weight),
            "activation_dtype": activation,
            "weight_dtype": weight,
            "engine_layer": matched["name"] if matched is not None else None,
            "precision_from": "engine" if from_engine else "network",
        })
    return rows, covered


def choose_source(net: dict, candidates: list[tuple[str, list[dict]]]):
    """Pick the engine evidence that covers most convolutions/matmuls; else the network definition."""
    best = ("network_definition", None, _compute_rows(net, None)[0], 0)
    for source, layers in candidates:
        if not layers:
            continue
        rows, covered = _compute_rows(net, layers)
        if covered > best[3] or (best[1] is None and not net["compute"]):
            best = (source, layers, rows, covered)
    return best[0], best[1], best[2]
