"""Compact export of every format on a small conv + linear network.

Each format is quantized with ModelOpt (fake quant, CPU), exported, and its weights encoded as
low-bit initializers feeding standard DequantizeLinear: the file must hold no float copy of a
quantized weight, standard ONNX ops only, the opset the format needs, and ONNX Runtime (CPU)
must reproduce the torch fake-quant output.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt.torch.quantization")


def _net():
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(32, 64, 3, padding=1)
            self.proj = torch.nn.Linear(64, 128)
            self.out = torch.nn.Linear(128, 64)

        def forward(self, x):
            h = torch.nn.functional.silu(self.conv(x))  # (B, 64, H, W)
            h = h.flatten(2).transpose(1, 2)  # (B, HW, 64)
            return self.out(torch.nn.functional.gelu(self.proj(h)))

    class Wrapper(torch.nn.Module):  # the adapters' export modules hold the denoiser as `unet`
        def __init__(self):
            super().__init__()
            self.unet = Block()

        def forward(self, x):
            return self.unet(x)

    torch.manual_seed(0)
    return Wrapper().eval()


FORMATS = {
    "int8": ("int8", False, 17, onnx.TensorProto.INT8),
    "fp8": ("fp8", False, 21, onnx.TensorProto.FLOAT8E4M3FN),
    "w4a8": ("w4a8", False, 21, onnx.TensorProto.INT4),
    "w4a8-int4-convs": ("w4a8", True, 21, onnx.TensorProto.INT4),
    "w4a16": ("w4a16", False, 21, onnx.TensorProto.INT4),
}


@pytest.fixture(scope="module")
def data():
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 32, 6, 6, generator=g) for _ in range(4)]


def _export(name, data, tmp_path):
    import torch

    import modelopt.torch.quantization as mtq
    from adm_export.export import onnx_graph
    from adm_export.export.onnx import export_model_copy, weight_codecs
    from adm_export.formats import policy as pol

    fmt, int4_convs, opset, _ = FORMATS[name]
    wrapper = _net()
    plans = pol.resolve(pol.Policy(name, (pol.Rule("*", pol.Format(fmt)),), int4_convs), wrapper.unet)
    q = copy.deepcopy(wrapper)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(q.unet, pol.compile_quant_cfg(plans), lambda m: [m(x) for x in data])
    codecs = weight_codecs(q.unet, plans)
    exp = copy.deepcopy(q)
    exp.unet = export_model_copy(q.unet, codecs)
    path = tmp_path / f"{name}.onnx"
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(exp, (data[0],), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}}, opset_version=min(opset, 20), dynamo=False)
    model = onnx.load(str(path))
    onnx_graph.constants_to_initializers(model)
    onnx_graph.rewrite_trt_fp8(model)
    stats = onnx_graph.encode_weights(model, codecs)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    onnx.checker.check_model(model)
    return q, plans, model, stats


@pytest.mark.parametrize("name", list(FORMATS))
def test_format_exports_compact_standard_and_matches_torch(name, data, tmp_path):
    import torch

    from adm_export.export import onnx_graph
    from adm_export.numerics import rel_l2

    fmt, int4_convs, opset, dtype = FORMATS[name]
    q, plans, model, stats = _export(name, data, tmp_path)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    # Standard ops only, at the opset the format needs.
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
    # Every quantized layer's weight is a low-bit initializer behind a DequantizeLinear ...
    quantized = [p for p in plans if p.weight != "fp16"]
    assert stats["encoded"] == len(quantized)
    prod = {o: n for n in graph.node for o in n.output}
    seen = {}
    for n in graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm"):
            dq = prod.get(n.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear":
                seen[n.op_type] = inits[dq.input[0]].data_type
                if inits[dq.input[0]].data_type == onnx.TensorProto.INT4:
                    # packed two codes per byte, blocks along the input (K) axis
                    w = inits[dq.input[0]]
                    assert len(w.raw_data) == int(np.prod(w.dims)) // 2
                    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
                    assert attrs["block_size"] in (32, 64, 128)
                    k_axis = {"Conv": 1, "MatMul": 0, "Gemm": 1}[n.op_type]
                    assert attrs["axis"] == k_axis
    assert seen["MatMul"] == dtype
    conv_dtype = dtype if (fmt not in ("w4a8", "w4a16") or int4_convs) else onnx.TensorProto.INT8
    if fmt == "w4a16" and not int4_convs:
        assert "Conv" not in seen  # weight-only INT4 is for linears: the conv stays FP16/FP32
    else:
        assert seen["Conv"] == conv_dtype
    # ... and no full-precision copy of a quantized weight is left anywhere.
    assert onnx_graph.float_copies_of_quantized_weights(model) == []
    big_floats = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2
                  and not i.name.endswith("_scale")]  # INT4 block scales are 2-D FP32
    kept = {f"unet.{p.name}.weight" for p in plans if p.weight == "fp16"}  # unquantized layers keep theirs
    assert set(big_floats) == kept
    # ONNX Runtime (CPU) reproduces the torch fake-quant model.
    # Accuracy level 0: ONNX Runtime's default MatMulNBits (level 4) would also quantize the INT4
    # MatMuls' activations at run time (see export.onnx.parity_session).
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for x in data[:2]:
            ref = q(x)
            got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
            assert rel_l2(got, ref) < 2e-3, name


def test_weight_only_ops_are_not_reported_as_half_quantized(data, tmp_path):
    from adm_export.export import onnx_graph

    _, _, model, _ = _export("w4a16", data, tmp_path)
    report = onnx_graph.qdq_report(model)
    assert report["half_quantized"] == [] and report["weight_only_ops"] == 2


def test_onnxruntime_placement_fuses_integer_convolution(data, tmp_path):
    """DQ -> Conv -> Q with UINT8 activations: ONNX Runtime runs QLinearConv, with the same output."""
    import collections

    import torch

    import modelopt.torch.quantization as mtq
    from adm_export.export import onnx_graph
    from adm_export.export.onnx import export_model_copy, weight_codecs
    from adm_export.formats import policy as pol
    from adm_export.quantize.modelopt import output_quantized_layers

    wrapper = _net()
    plans = pol.resolve(pol.preset("int8"), wrapper.unet)
    outputs = output_quantized_layers(plans, "onnxruntime")
    assert outputs == ["conv"] and output_quantized_layers(plans, "tensorrt") == []
    q = copy.deepcopy(wrapper)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(q.unet, pol.compile_quant_cfg(plans, outputs), lambda m: [m(x) for x in data])
    codecs = weight_codecs(q.unet, plans)
    exp = copy.deepcopy(q)
    exp.unet = export_model_copy(q.unet, codecs)
    path = tmp_path / "p.onnx"
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(exp, (data[0],), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                          dynamo=False)
    model = onnx.load(str(path))
    onnx_graph.constants_to_initializers(model)
    onnx_graph.encode_weights(model, codecs)
    signed = model.SerializeToString()
    assert onnx_graph.activations_to_uint8(model) > 0
    x = data[1].numpy()

    def run(blob, optimized):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(optimized)
        s = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
        return s.run(None, {"x": x})[0], ops

    y_signed, ops_signed = run(signed, tmp_path / "s.onnx")
    y_u8, ops_u8 = run(model.SerializeToString(), tmp_path / "u.onnx")
    assert ops_u8["QLinearConv"] == 1 and ops_u8["Conv"] == 0
    assert ops_signed["QLinearConv"] == 0  # signed activations: ONNX Runtime leaves the Conv in float
    np.testing.assert_allclose(y_u8, y_signed, rtol=0, atol=1e-6)  # the same numbers, only faster kernels
