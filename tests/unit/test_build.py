"""End-to-end: `adm-export build` through the CLI on the embedded model, and its report."""

from __future__ import annotations

import json

import onnx

from tests.helpers import REPORT_KEYS
from tests.helpers import get_key as _get


def test_build_exits_zero_and_writes_every_stage(tiny_build):
    out, result, report = tiny_build
    assert result.exit_code == 0, result.output + str(result.exception)
    for sub in ("calibration", "quantized", "onnx", "engines", "report.json", "report.md"):
        assert (out / sub).exists(), sub
    for stage in ("calibration", "quantized", "onnx", "engines"):
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["model"]["id"] == "tiny-audioldm"
    # No temporary (partial) folders are left behind.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert "quality gate: PASSED" in result.output


def test_report_has_contract_keys(tiny_build):
    _, _, report = tiny_build
    for key in REPORT_KEYS:
        _get(report, key)
    assert report["precision"] == "int8"
    assert report["engine"]["backend"] == "onnxruntime"
    assert report["eval"]["num_clips"] == 4
    assert report["eval"]["embedder"] == "logmel"
    for stage in ("calibrate", "quantize", "export", "engine", "eval"):
        assert report["stages"][stage]["seconds"] > 0


def test_export_is_well_under_a_third_of_fp32(tiny_build):
    out, _, report = tiny_build
    size = report["size"]
    assert size["unet_fp32_bytes"] == 2 * size["unet_fp16_bytes"]
    on_disk = (out / "onnx" / "unet.onnx").stat().st_size
    assert size["unet_export_bytes"] == on_disk
    assert size["reduction_vs_fp32"] < 1 / 3
    assert abs(size["reduction_vs_fp32"] - on_disk / size["unet_fp32_bytes"]) < 1e-3


def test_parity_far_below_quantization_error_on_clean_steps(tiny_build):
    """ONNX Runtime tracks the torch fake-quant model within the measured rounding floor."""
    out, _, report = tiny_build
    parity = json.loads((out / "onnx" / "manifest.json").read_text())["parity"]
    assert parity["passed"] is True
    assert parity["onnx_vs_torch_mean"] <= 2 * parity["rounding_floor_mean"] + 1e-4
    assert report["parity"]["onnx_vs_torch_rel_l2"] == parity["onnx_vs_torch_max"]


def test_every_quantized_op_has_qdq_and_int8_weights(tiny_build):
    out, _, _ = tiny_build
    model = onnx.load(str(out / "onnx" / "unet.onnx"))
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    placement = json.loads((out / "onnx" / "manifest.json").read_text())["placement"]

    def dq_inputs(node):
        srcs = [producers.get(i) for i in node.input[:2]]
        return srcs, [s is not None and s.op_type == "DequantizeLinear" for s in srcs]

    def reads_quantized_conv_output(node):
        """ONNX Runtime placement (a CPU build): a float layer's input may be the Q/DQ on an INT8 conv's output."""
        q = producers.get(producers[node.input[0]].input[0])
        conv = producers.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        return placement == "onnxruntime" and conv is not None and conv.op_type == "Conv" and all(dq_inputs(conv)[1])

    quantized = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        srcs, is_dq = dq_inputs(node)
        assert all(is_dq) or not any(is_dq) or (is_dq == [True, False] and reads_quantized_conv_output(node)), \
            f"{node.name}: Q/DQ on only one input"
        if all(is_dq):
            quantized += 1
            weight_dq = srcs[1]
            w = inits.get(weight_dq.input[0])
            assert w is not None, f"{node.name}: weight is not an initializer behind its DequantizeLinear"
            assert w.data_type == onnx.TensorProto.INT8, f"{node.name}: weight stored as {w.data_type}"
            act = producers.get(srcs[0].input[0])
            assert act is not None and act.op_type == "QuantizeLinear", f"{node.name}: activation not quantized"
    assert quantized >= 100
    # No FP32 copy of a quantized weight anywhere: no float initializer is named after one.
    quantized_names = {i.name[: -len("_quantized")] for i in graph.initializer if i.name.endswith("_quantized")}
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert not quantized_names & floats


def test_engine_reports_what_onnxruntime_runs(tiny_build):
    out, _, report = tiny_build
    precisions = report["engine"]["layer_precisions"]
    assert precisions["int8"] > 0 and precisions["fp32"] > 0
    layers = json.loads((out / "engines" / "onnxruntime" / "layers.json").read_text())
    assert layers["source"] == "onnxruntime_optimized_graph"
    assert report["engine"]["latency_ms"] > 0


def test_report_md_is_readable(tiny_build):
    out, _, report = tiny_build
    md = (out / "report.md").read_text()
    assert "# adm-export report: tiny-audioldm (int8)" in md
    assert "PASSED" in md
    assert f"{100 * report['size']['reduction_vs_fp32']:.1f}%" in md


def test_inspect_shows_report_and_manifests(tiny_build):
    from click.testing import CliRunner

    from adm_export.cli import cli

    out, _, _ = tiny_build
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "adm-export report" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(out / "onnx")])
    assert r.exit_code == 0 and "stage: onnx" in r.output and "sizes" in r.output
