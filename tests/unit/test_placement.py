"""Q/DQ placement follows the serving target; the graph passes of the ONNX Runtime placement; the FP32 race."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adm_export.errors import InvalidInputError
from adm_export.formats.capabilities import (PLACEMENTS, TARGET_PLACEMENT, Placement, Target, placement_for,
                                              target_for)
from tests.helpers import one_error_line, run


def _session(model_or_path, optimized=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    blob = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


# -- the choice (data in formats/capabilities.py) --------------------------------------------------
def test_each_target_has_a_placement_and_a_reason(monkeypatch):
    assert set(TARGET_PLACEMENT) == set(Target) and set(PLACEMENTS) == set(Placement)
    assert placement_for("onnxruntime-cpu")["value"] == "onnxruntime"
    for target in ("tensorrt", "tensorrt-rtx", "onnxruntime-cuda"):
        choice = placement_for(target)
        assert choice["value"] == "tensorrt" and choice["source"] == "--target"
        assert choice["reason"].startswith(f"--target {target}: ")
    # --placement wins, and the reason says what the target would have used.
    forced = placement_for("onnxruntime-cpu", "tensorrt")
    assert forced == {"value": "tensorrt", "source": "--placement",
                      "reason": "given with --placement (--target onnxruntime-cpu would use onnxruntime)"}
    with pytest.raises(InvalidInputError, match="--placement 'qnn'"):
        placement_for("tensorrt", "qnn")
    # Every family gets its target's placement: Make-An-Audio too (its CPU export passes parity in the
    # onnxruntime placement, test_families); a family entry (data, with why) would override it.
    from adm_export.formats import capabilities

    assert capabilities.FAMILY_PLACEMENT == {}
    for family in ("make_an_audio", "audioldm", "tango"):
        assert placement_for("onnxruntime-cpu", family=family)["value"] == "onnxruntime"
    monkeypatch.setitem(capabilities.FAMILY_PLACEMENT, ("make_an_audio", Target.ORT_CPU),
                        (Placement.TENSORRT, "an example reason"))
    maa = placement_for("onnxruntime-cpu", family="make_an_audio")
    assert maa["value"] == "tensorrt" and maa["reason"].endswith("make_an_audio family: an example reason")
    assert placement_for("onnxruntime-cpu", family="audioldm")["value"] == "onnxruntime"
    assert placement_for("onnxruntime-cpu", "onnxruntime", family="make_an_audio")["value"] == "onnxruntime"


def test_engine_and_device_give_the_target():
    from adm_export.formats.capabilities import default_target

    assert target_for("onnxruntime", "cpu") == Target.ORT_CPU
    assert target_for("onnxruntime", "cuda") == Target.ORT_CUDA
    assert target_for("tensorrt-rtx", "cpu") == Target.TENSORRT_RTX
    assert target_for("tensorrt", "cuda") == Target.TENSORRT
    # Without --target, build and quantize take the table's (formats.capabilities.default_target).
    assert default_target("tensorrt-rtx", "cpu") == "tensorrt-rtx"
    assert default_target("none", "cuda") == "onnxruntime-cuda"
    with pytest.raises(InvalidInputError, match="--device 'tpu'"):
        target_for("onnxruntime", "tpu")


# -- the default build (CPU, ONNX Runtime engine) ------------------------------------------------
def test_cpu_build_uses_the_integer_kernel_placement(tiny_build):
    """`adm-export build` on the CPU: onnxruntime placement, integer convolutions, speed-up stated."""
    out, result, report = tiny_build
    choice = report["quantization"]["placement"]
    assert choice["value"] == "onnxruntime" and choice["source"] == "--target"
    assert "onnxruntime-cpu" in choice["reason"]
    onnx_manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert onnx_manifest["placement"] == "onnxruntime" and onnx_manifest["placement_choice"] == choice
    quant = json.loads((out / "quantized" / "manifest.json").read_text())
    assert quant["output_quantized"] and quant["quantizers"]["output"] == len(quant["output_quantized"])
    # What ONNX Runtime runs: every INT8 convolution as QLinearConv; only the kept ones in float.
    layers = json.loads((out / "engines" / "onnxruntime" / "layers.json").read_text())
    kept_convs = sum(1 for p in quant["layers"] if p["kind"] == "conv" and p["format"] == "fp16")
    assert layers["compute_ops"]["QLinearConv"] == len(quant["output_quantized"])
    assert layers["compute_ops"].get("Conv", 0) + layers["compute_ops"].get("FusedConv", 0) == kept_convs
    # The speed-up over FP32, measured on the same CPU, in report.json, report.md and the summary.
    engine = report["engine"]
    assert engine["speedup_vs_fp32"] == pytest.approx(engine["fp32_latency_ms"] / engine["latency_ms"], rel=1e-2)
    vs = engine["engines"]["onnxruntime"]["vs_fp32"]
    assert vs["fp32_reference"]["weights_dequantized"] == quant["quantizers"]["weight"]
    assert vs["engine"]["runs"] == vs["fp32_reference"]["runs"] >= 3
    md = (out / "report.md").read_text()
    assert "## Q/DQ placement" in md and "speed-up over FP32 on this CPU" in md
    assert f"CPU engine: {engine['speedup_vs_fp32']:.2f}x FP32" in result.output


def test_tensorrt_plan_builds_from_the_onnxruntime_placement(tiny_build):
    """One export feeds both engines: TensorRT-RTX builds from its signed-Q/DQ form and runs INT8 layers."""
    pytest.importorskip("tensorrt_rtx_bindings")
    _, _, report = tiny_build
    trt = report["engine"]["engines"]["tensorrt-rtx"]
    assert trt["built"] is True and trt["layer_precisions"].get("int8", 0) > 0
    assert "signed INT8" in trt["source_graph"]


def test_tensorrt_target_uses_the_tensorrt_placement(tiny_build, tmp_path):
    out, _, _ = tiny_build
    q = tmp_path / "q"
    r = run("quantize", "--calibration", out / "calibration", "--out", q, "--target", "tensorrt")
    assert r.exit_code == 0, r.output
    manifest = json.loads((q / "manifest.json").read_text())
    assert manifest["placement"] == "tensorrt" and manifest["output_quantized"] == []
    assert manifest["placement_choice"]["source"] == "--target" and "TensorRT" in manifest["placement_choice"]["reason"]
    # The placement is fixed at quantize time: an export asking for another one is refused in one line.
    r = run("export", "--quantized", q, "--calibration", out / "calibration", "--out", tmp_path / "o",
            "--placement", "onnxruntime")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "--placement 'onnxruntime'" in line and "'tensorrt'" in line
    assert not (tmp_path / "o").exists()


# -- graph passes ------------------------------------------------------------------------------------
def test_signed_view_for_tensorrt_is_exact(tiny_build, tmp_path):
    """activations_to_int8 undoes activations_to_uint8: the same outputs from signed Q/DQ only."""
    from adm_export.export import onnx_graph
    from adm_export.models import load_model

    out, _, _ = tiny_build
    model = onnx.load(str(out / "onnx" / "unet.onnx"))
    unsigned = model.SerializeToString()
    changed = onnx_graph.activations_to_int8(model)
    assert changed > 100
    zps = [i for i in model.graph.initializer if i.data_type == TensorProto.UINT8]
    assert zps == []
    spec = load_model("tiny-audioldm").denoiser_spec()
    feed = {k: v.numpy() for k, v in spec.dummy_inputs(2, 32, seed=3).items()}
    a = _session(onnx.load_from_string(unsigned), tmp_path / "u.onnx").run(None, feed)[0]
    b = _session(model, tmp_path / "s.onnx").run(None, feed)[0]
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    # Only a shifted symmetric grid (zero point 128) has a signed twin.
    bad = onnx.load_from_string(unsigned)
    zp = next(i for i in bad.graph.initializer if i.data_type == TensorProto.UINT8)
    zp.CopyFrom(numpy_helper.from_array(np.array(100, np.uint8), zp.name))
    with pytest.raises(ValueError, match="not the shifted symmetric 128"):
        onnx_graph.activations_to_int8(bad)


def _classic_attention_onnx(path, mask: bool, dynamic: bool = True):
    """One diffusers Attention with the classic processor (baddbmm -> softmax -> bmm), exported."""
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    attn = Attention(64, heads=2, dim_head=32).eval()
    attn.set_processor(AttnProcessor())

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x, bias):
            return self.attn(x, attention_mask=bias if mask else None)

    x, bias = torch.randn(2, 16, 64), torch.zeros(2, 1, 16)
    bias[:, :, -4:] = -1e4
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Dynamic axes as in the U-Net export (the zero bias is then ConstantOfShape -> Mul -> Add;
        # with static shapes constant folding leaves a zero initializer).
        axes = {"x": {0: "batch", 1: "tokens"}, "y": {0: "batch", 1: "tokens"}} if dynamic else None
        torch.onnx.export(Wrap(), (x, bias), str(path), input_names=["x", "bias"], output_names=["y"],
                          opset_version=17, dynamo=False, dynamic_axes=axes)
    return {"x": x.numpy(), "bias": bias.numpy()}


def test_zero_attention_bias_is_folded_and_a_mask_is_kept(tmp_path):
    from adm_export.export import onnx_graph

    for dynamic in (True, False):
        feed = _classic_attention_onnx(tmp_path / "a.onnx", mask=False, dynamic=dynamic)
        model = onnx.load(str(tmp_path / "a.onnx"))
        onnx_graph.constants_to_initializers(model)
        before = collections.Counter(n.op_type for n in model.graph.node)
        ref = _session(model).run(None, {"x": feed["x"]})[0]
        assert onnx_graph.fold_zero_attention_bias(model) == 1
        after = collections.Counter(n.op_type for n in model.graph.node)
        assert after["Add"] == before["Add"] - 1 and after["ConstantOfShape"] == 0
        assert before["ConstantOfShape"] == (1 if dynamic else 0)
        onnx.checker.check_model(model)
        np.testing.assert_array_equal(_session(model).run(None, {"x": feed["x"]})[0], ref)

    # A zero GroupNorm beta (a freshly initialised model) is not attention: it stays (ONNX Runtime's
    # diffusion optimizer matches GroupNorm -> SiLU by its Add).
    norm = helper.make_graph(
        [helper.make_node("Mul", ["x", "gamma"], ["scaled"]), helper.make_node("Add", ["scaled", "beta"], ["normed"]),
         helper.make_node("Sigmoid", ["normed"], ["sig"]), helper.make_node("Mul", ["normed", "sig"], ["y"])],
        "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])],
        [numpy_helper.from_array(np.ones((4, 1, 1), np.float32), "gamma"),
         numpy_helper.from_array(np.zeros((4, 1, 1), np.float32), "beta")])
    norm_model = helper.make_model(norm)
    assert onnx_graph.fold_zero_attention_bias(norm_model) == 0
    assert [n.op_type for n in norm_model.graph.node] == ["Mul", "Add", "Sigmoid", "Mul"]

    feed = _classic_attention_onnx(tmp_path / "m.onnx", mask=True)
    masked = onnx.load(str(tmp_path / "m.onnx"))
    onnx_graph.constants_to_initializers(masked)
    ref = _session(masked).run(None, feed)[0]
    assert onnx_graph.fold_zero_attention_bias(masked) == 0
    np.testing.assert_array_equal(_session(masked).run(None, feed)[0], ref)


def test_zero_attention_bias_is_folded_with_constant_nodes(tmp_path):
    """An unfolded export (the FP32 export keeps ``Constant`` nodes) has its zero bias folded too:
    ``benchmarks/speed_cpu.py`` folds it in the FP32 baseline."""
    from adm_export.export import onnx_graph

    feed = _classic_attention_onnx(tmp_path / "a.onnx", mask=False)
    model = onnx.load(str(tmp_path / "a.onnx"))
    assert any(n.op_type == "Constant" for n in model.graph.node)
    ref = _session(model).run(None, {"x": feed["x"]})[0]
    assert onnx_graph.fold_zero_attention_bias(model) == 1
    assert not any(n.op_type == "ConstantOfShape" for n in model.graph.node)
    np.testing.assert_array_equal(_session(model).run(None, {"x": feed["x"]})[0], ref)


def test_fp32_reference_is_the_export_without_quantization(tiny_build, tiny_adapter):
    """The engine stage's FP32 reference: same graph, no Q/DQ, weights at their grid values."""
    import torch

    from adm_export.engines.speedup import fp32_reference_graph
    from adm_export.numerics import rel_l2, run_denoiser

    out, _, _ = tiny_build
    export = onnx.load(str(out / "onnx" / "unet.onnx"))
    model = onnx.load(str(out / "onnx" / "unet.onnx"))
    stats = fp32_reference_graph(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0
    compute = ("Conv", "MatMul", "Gemm")
    assert [ops[k] for k in compute] == [sum(n.op_type == k for n in export.graph.node) for k in compute]
    assert stats["weights_dequantized"] > 100 and stats["activation_qdq_dropped"] > 100
    onnx.checker.check_model(model)
    spec = tiny_adapter.denoiser_spec()
    x = spec.dummy_inputs(2, 32, seed=5)
    feed = {k: v.numpy() for k, v in x.items()}
    full = run_denoiser(tiny_adapter, tiny_adapter.denoiser, x)
    fp32 = torch.from_numpy(_session(model).run(None, feed)[0])
    int8 = torch.from_numpy(_session(export).run(None, feed)[0])
    # Weight rounding alone moves the output less than weights + activations (W8A8) do.
    assert 0 < rel_l2(fp32, full) < rel_l2(int8, full)


def test_fp32_reference_undoes_back_to_back_qdq_pairs():
    """A layer's output Q/DQ followed directly by the next layer's input Q/DQ (chained pairs)."""
    from adm_export.engines.speedup import fp32_reference_graph

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (8, 4)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s1"), numpy_helper.from_array(np.array(128, np.uint8), "z1"),
             numpy_helper.from_array(np.array(0.02, np.float32), "s2"), numpy_helper.from_array(np.array(128, np.uint8), "z2"),
             numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_s")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["a"]), helper.make_node("DequantizeLinear", ["a", "s1", "z1"], ["b"]),
             helper.make_node("QuantizeLinear", ["b", "s2", "z2"], ["c"]), helper.make_node("DequantizeLinear", ["c", "s2", "z2"], ["d"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=1), helper.make_node("MatMul", ["d", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert fp32_reference_graph(model) == {"weights_dequantized": 1, "activation_qdq_dropped": 2}
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    x = rng.normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_allclose(_session(model).run(None, {"x": x})[0], x @ (w.astype(np.float32) * 0.01), rtol=1e-5)
