"""Stage functions through the library: selection, cache, export graph passes, parity, engines."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from adm_export.calibration.cache import load_cache
from adm_export.calibration.latents import select_indices
from adm_export.config import SelectMethod


@pytest.mark.parametrize("method", [SelectMethod.UNIFORM, SelectMethod.RANDOM, SelectMethod.NORMAL])
def test_index_selection_budget_and_range(method):
    pairs = select_indices(method, num_prompts=6, steps=10, points=12, seed=3)
    assert len(pairs) == 12 and len(set(pairs)) == 12
    assert all(0 <= p < 6 and 0 <= s < 10 for p, s in pairs)
    assert pairs == select_indices(method, 6, 10, 12, seed=3)  # deterministic for a seed


def test_uniform_selection_spreads_steps_and_all_takes_everything():
    steps = {s for _, s in select_indices(SelectMethod.UNIFORM, 4, 10, 10, seed=0)}
    assert steps == set(range(10))
    assert len(select_indices(SelectMethod.ALL, 3, 5, 2, seed=0)) == 15
    assert len(select_indices(SelectMethod.RANDOM, 2, 3, 100, seed=0)) == 6  # budget capped by what exists


def test_cache_holds_the_selected_denoiser_calls(tiny_build):
    out, _, _ = tiny_build
    cache = load_cache(out / "calibration")
    manifest = cache.manifest
    assert len(cache) == manifest["selection"]["points"] == 8
    assert cache.rows_per_point == 2  # classifier-free guidance: unconditional + conditional rows
    point = cache.point(0)
    assert list(point) == ["sample", "timestep", "class_labels"]
    assert point["sample"].shape == (2, 8, 32, 16)  # 1.28 s -> 32 latent frames
    assert torch.equal(point["sample"][0], point["sample"][1])  # same x_t for both CFG rows
    assert not torch.equal(point["class_labels"][0], point["class_labels"][1])
    # Every point comes from a recorded trajectory: its timestep is the scheduler's for its step.
    from adm_export.models import load_model

    scheduler = load_model("tiny-audioldm").pipeline.scheduler
    scheduler.set_timesteps(4)
    for i in range(len(cache)):
        step = int(cache.step_index[i])
        assert float(cache.point(i)["timestep"][0]) == float(scheduler.timesteps[step])
    assert manifest["prompts"]["coverage"]["summary"]


def test_fp32_export_matches_torch_to_float_rounding(tiny_adapter, tiny_build, tmp_path):
    """Without quantization there is no rounding floor: ONNX Runtime equals torch to ~1e-6."""
    from adm_export.engines.onnxruntime import OrtRunner, make_session
    from adm_export.export.onnx import torch_to_onnx
    from adm_export.numerics import rel_l2, run_denoiser

    out, _, _ = tiny_build
    cache = load_cache(out / "calibration")
    path = tmp_path / "fp32.onnx"
    torch_to_onnx(tiny_adapter, tiny_adapter.denoiser, path, 17, cache.point(0))
    runner = OrtRunner(make_session(path))
    spec = tiny_adapter.denoiser_spec()
    for p in list(cache.points())[:3]:
        err = rel_l2(torch.from_numpy(runner(p)), run_denoiser(tiny_adapter, tiny_adapter.denoiser, p))
        assert err < spec.parity_rel_l2
    # Dynamic batch and latent length: another shape runs too.
    other = spec.dummy_inputs(batch=3, frames=16)
    assert runner(other).shape == (3, 8, 16, 16)


def test_parity_check_catches_a_wrong_scale(tiny_adapter, tiny_build, tmp_path):
    """Parity is not a rubber stamp: a mis-scaled weight puts ONNX Runtime far above the floor."""
    from adm_export.calibration.cache import load_cache, parity_points
    from adm_export.engines.onnxruntime import make_session
    from adm_export.export.onnx import check_parity
    from adm_export.export.onnx_graph import module_of
    from adm_export.quantize.modelopt import load_quantized

    out, _, _ = tiny_build
    model = onnx.load(str(out / "onnx" / "unet.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    hit = 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith("_quantized"):
            scale = inits[node.input[1]]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))
            hit += 1
    assert hit > 50
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    quantized, _ = load_quantized(out / "quantized", tiny_adapter)
    points = parity_points(load_cache(out / "calibration"), 3)
    good = check_parity(tiny_adapter, quantized, make_session(out / "onnx" / "unet.onnx"), points)
    broken = check_parity(tiny_adapter, quantized, make_session(bad), points)
    assert good["passed"] is True
    assert broken["passed"] is False
    assert broken["onnx_vs_torch_mean"] > 5 * good["onnx_vs_torch_mean"]

    # The teacher-forced verdict (the export stage's): torch fed ONNX Runtime's codes at every
    # activation quantizer matches it to float rounding, codes at most one step apart and rarely;
    # the wrong scale moves the next quantizers' codes by many steps.
    good = check_parity(tiny_adapter, quantized, make_session(out / "onnx" / "unet.onnx"), points,
                        out / "onnx" / "unet.onnx")
    broken = check_parity(tiny_adapter, quantized, make_session(bad), points, bad)
    forced = good["teacher_forced"]
    assert good["passed"] is True and forced["passed"] is True
    assert forced["forced_max"] < 1e-5 and forced["codes_more_steps"] == 0
    assert forced["codes_one_step"] < 1e-3 * forced["codes"] and forced["quantizers"] > 50
    assert forced["missing"] == [] and forced["unmatched"] == []
    assert forced["instrumented_vs_served_max_abs"] < 1e-5  # the extra outputs change nothing (measured: 0.0)
    assert broken["passed"] is False and broken["teacher_forced"]["codes_more_steps"] > 1000

    # An activation Q/DQ pair left out of the graph (the layer reads float): that quantizer is missing.
    model = onnx.load(str(out / "onnx" / "unet.onnx"))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and "input_quantizer" in n.name)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    for n in model.graph.node:
        n.input[:] = [q.input[0] if i == dq.output[0] else i for i in n.input]
    model.graph.node.remove(q)
    model.graph.node.remove(dq)
    skipped = tmp_path / "skipped.onnx"
    onnx.save(model, str(skipped))
    result = check_parity(tiny_adapter, quantized, make_session(skipped), points, skipped)
    assert result["passed"] is False
    assert result["teacher_forced"]["missing"] == [module_of(q)]
    assert module_of(q).endswith(".input_quantizer")


def test_weight_folding_matches_onnx_quantize_semantics():
    """Folded INT8 weights equal what QuantizeLinear computes (round half to even, saturate)."""
    from onnx import helper
    import onnxruntime as ort

    from adm_export.export.onnx_graph import fold_weight_quantization, qdq_report

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    w[0, 0] = 2.5 * 0.01  # a tie: rounds to 2 (even), not 3
    scale = np.array([0.01, 0.02, 0.03, 0.04], np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=0),
         helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], axis=0),
         helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"),
         numpy_helper.from_array(np.zeros(4, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(2, 3)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    stats = fold_weight_quantization(model)
    assert stats == {"folded": 1, "transposes": 1, "fp32_bytes_removed": w.nbytes}
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)
    report = qdq_report(model)
    assert report["float_weights_behind_qdq"] == [] and report["quantized_weight_dtypes"] == {"int8": 1}
    assert {i.name for i in model.graph.initializer} == {"w_quantized", "s", "z"}
    assert numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_quantized"))[0, 0] == 2


def test_local_folder_loads_with_the_same_identity(tiny_adapter, tmp_path):
    """Real checkpoints load through from_pretrained: a saved folder is the same model."""
    from adm_export.models import load_model

    folder = tmp_path / "saved"
    tiny_adapter.pipeline.save_pretrained(str(folder))
    loaded = load_model(str(folder))
    assert loaded.family == "audioldm"
    assert loaded.fingerprint() == tiny_adapter.fingerprint()
    a = tiny_adapter.generate(["a dog barks"], [5], 3, 1.28, 2.5)[0]
    b = loaded.generate(["a dog barks"], [5], 3, 1.28, 2.5)[0]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (int(1.28 * 16000),)


def test_ort_denoiser_plugs_into_the_pipeline(tiny_adapter, tiny_build):
    """The engine runs inside diffusers' own sampler and stays close to the torch model."""
    from adm_export.engines.stage import load_ort_denoiser

    out, _, _ = tiny_build
    denoiser, _ = load_ort_denoiser(out / "engines", tiny_adapter)
    base = tiny_adapter.generate(["rain on a roof"], [1], 4, 1.28, 2.5)[0]
    with tiny_adapter.using_denoiser(denoiser):
        engine = tiny_adapter.generate(["rain on a roof"], [1], 4, 1.28, 2.5)[0]
    assert denoiser.calls == 4
    assert tiny_adapter.denoiser is not denoiser  # restored after the block
    assert engine.shape == base.shape
    rel = np.linalg.norm(engine - base) / np.linalg.norm(base)
    assert 0 < rel < 0.5


def test_tensorrt_rtx_plan_when_installed(tiny_build):
    pytest.importorskip("tensorrt_rtx_bindings")
    out, _, report = tiny_build
    trt = report["engine"]["engines"].get("tensorrt-rtx")
    assert trt and trt["built"] is True
    assert (out / "engines" / "tensorrt-rtx" / "unet.plan").stat().st_size > 0
    assert trt["layer_precisions"].get("int8", 0) > 0
    layers = json.loads((out / "engines" / "tensorrt-rtx" / "layers.json").read_text())
    assert layers


def test_teacher_forced_parity_finds_each_activation_quantizer():
    """Q nodes map to their torch quantizers: INT8/UINT8 read as codes (the Q stays fusable), FP8 through
    its DequantizeLinear, also under the exporter's name of the op it replaced (``TRT_FP8QuantizeLinear``)."""
    from onnx import TensorProto

    from adm_export.export.parity import activation_quantizers

    f8 = helper.make_tensor("zf", TensorProto.FLOAT8E4M3FN, [], [0.0])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zu"], ["xq"], name="/unet/conv_in/input_quantizer/QuantizeLinear"),
         helper.make_node("DequantizeLinear", ["xq", "s", "zu"], ["xd"], name="/unet/conv_in/input_quantizer/DequantizeLinear"),
         helper.make_node("QuantizeLinear", ["xd", "s", "zf"], ["yq"],
                          name="/unet/down_blocks.0/resnets.0/conv1/input_quantizer/TRT_FP8QuantizeLinear"),
         helper.make_node("DequantizeLinear", ["yq", "s", "zf"], ["y"], name="dq")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "zu"),
         f8])
    found = activation_quantizers(helper.make_model(graph))
    assert set(found) == {"conv_in.input_quantizer", "down_blocks.0.resnets.0.conv1.input_quantizer"}
    int8, fp8 = found["conv_in.input_quantizer"][0], found["down_blocks.0.resnets.0.conv1.input_quantizer"][0]
    assert int8["tensor"] == "xq" and not int8["dequantized"] and int8["zero_point"] == 128
    assert fp8["tensor"] == "y" and fp8["dequantized"]
