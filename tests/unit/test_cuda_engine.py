"""The fused FP16 CUDA engine's graph work, checked on the CPU (what needs a GPU is in tests/gpu/test_cuda_engine.py).

* dequantization: the canonical FP32 graph holds exactly the values ONNX Runtime's
  DequantizeLinear gives for every low-bit weight (INT8 per channel, INT4 blocked, FP8), and the
  whole graph equals the torch fake-quant model with its activation quantizers off;
* ONNX Runtime's diffusion fusions per family: counts, and numerical parity of the fusions the
  CPU provider can run (attention, layer norm) against torch FP32 (this caught the optimizer
  dropping TANGO's text mask);
* the engine stage with ``--device cuda`` on a machine without a GPU;
* serving refusals: one line, before any model is loaded.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from adm_export.engines.onnxruntime import dequantize, fusions
from adm_export.errors import InvalidInputError
from tests.helpers import one_error_line, run

FAMILIES = ["tiny-audioldm", "tiny-audioldm2", "tiny-tango", "tiny-make-an-audio", "reference-audioldm"]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- dequantization ---------------------------------------------------------------------------
def _qdq_weights_model():
    """Weights of every stored form behind DequantizeLinear, each consumed by a MatMul, plus an
    activation Q/DQ pair: x -> Q/DQ -> MatMul(w_int8) -> MatMul(w_int4) -> MatMul(w_fp8) -> y."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "w8": rng.integers(-128, 128, (16, 16)).astype(np.int8), "w8_s": (rng.random(16) * 0.02 + 1e-3).astype(
            np.float32), "w8_z": rng.integers(-3, 4, 16).astype(np.int8),
        "w4": rng.integers(-8, 8, (16, 16)).astype(ml_dtypes.int4),
        "w4_s": (rng.random((2, 16)) * 0.1 + 1e-3).astype(np.float32),  # blocks of 8 along axis 0
        "wf8": (rng.standard_normal((16, 16)) * 40).astype(ml_dtypes.float8_e4m3fn),
        "wf8_s": np.array(0.013, np.float32),
        "a_s": np.array(0.02, np.float32), "a_z": np.array(0, np.int8),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    inits.append(helper.make_tensor("wf8_z", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    node = helper.make_node
    nodes = [
        node("QuantizeLinear", ["x", "a_s", "a_z"], ["xq"]), node("DequantizeLinear", ["xq", "a_s", "a_z"], ["xd"]),
        node("DequantizeLinear", ["w8", "w8_s", "w8_z"], ["W8"], axis=1),
        node("DequantizeLinear", ["w4", "w4_s"], ["W4"], axis=0, block_size=8),
        node("DequantizeLinear", ["wf8", "wf8_s", "wf8_z"], ["WF8"]),
        node("MatMul", ["xd", "W8"], ["h1"]), node("MatMul", ["h1", "W4"], ["h2"]), node("MatMul", ["h2", "WF8"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "w", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _dq_outputs_by_onnxruntime(model, names, feed):
    """Run the Q/DQ graph on the CPU provider with the named DequantizeLinear outputs exposed."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for n in names:
        exposed.graph.output.append(helper.make_empty_tensor_value_info(n))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the DQ kernels themselves
    sess = ort.InferenceSession(exposed.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def test_dequantized_weights_equal_onnxruntime_dequantize_linear_exactly():
    from onnx import numpy_helper


    model = _qdq_weights_model()
    feed = {"x": np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)}
    expected = _dq_outputs_by_onnxruntime(model, ["W8", "W4", "WF8"], feed)
    stats = dequantize.prepare_fp32(model)
    assert stats["weights_dequantized"]["grid"] == {"fp8": 1, "int4": 1, "int8": 1}
    assert stats["activation_qdq_pairs_dropped"] == 1
    assert not [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name in ("W8", "W4", "WF8"):
        assert inits[name].dtype == np.float32
        np.testing.assert_array_equal(inits[name], expected[name])  # bit for bit, not "close"


def test_prepared_graph_is_the_fake_quant_model_without_activation_quantizers(tiny_build, tiny_adapter, tmp_path):
    """The CUDA engine's FP32 graph = quantized weights, activations unquantized: torch says the same."""
    import onnx
    import onnxruntime as ort
    import torch

    from adm_export.calibration.cache import load_cache
    from adm_export.export.onnx import classic_attention
    from adm_export.numerics import run_denoiser
    from adm_export.quantize.modelopt import load_quantized

    out, result, _ = tiny_build
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out / "onnx" / "unet.onnx"))
    weight_dqs = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] in {i.name for i in model.graph.initializer}]
    point = load_cache(out / "calibration", tiny_adapter.identity()).point(0)
    feed = {k: v.numpy() for k, v in point.items()}
    expected = _dq_outputs_by_onnxruntime(model, weight_dqs, feed)
    dequantize.prepare_fp32(model)
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    assert len(weight_dqs) > 100
    for name in weight_dqs:  # every quantized weight of the U-Net, exactly
        np.testing.assert_array_equal(numpy_helper.to_array(inits[name]), expected[name])
    path = tmp_path / "fp32.onnx"
    onnx.save(model, str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    quantized, _ = load_quantized(out / "quantized", tiny_adapter)
    for name, module in quantized.named_modules():
        if name.endswith("input_quantizer") or name.endswith("output_quantizer"):
            module.disable()
    with classic_attention(quantized):
        ref = run_denoiser(tiny_adapter, quantized, point)
        full = run_denoiser(tiny_adapter, tiny_adapter.denoiser, point)
    assert _rel(got, ref.numpy()) < 1e-5
    # ... and it is not the full-precision model: the weights did move to their grid.
    assert _rel(ref.numpy(), full.numpy()) > 1e-4
    del torch


# -- fusions per family ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_graph(request, tmp_path_factory):
    """``(adapter, canonical FP32 graph, example inputs)`` of a family's FP32 export."""
    import onnx

    from adm_export.engines.onnxruntime.cuda import parity_inputs
    from adm_export.export.onnx import torch_to_onnx
    from adm_export.models import load_model

    adapter = load_model(request.param)
    spec = adapter.denoiser_spec()
    frames = spec.frames_for_seconds(0.64)
    x = parity_inputs(spec, 2, frames, seed=1)
    path = tmp_path_factory.mktemp(request.param) / "unet.onnx"
    torch_to_onnx(adapter, adapter.denoiser, path, 17, x)
    model = onnx.load(str(path))
    dequantize.prepare_fp32(model)
    return adapter, model, x


@pytest.mark.parametrize("family_graph", FAMILIES, indirect=True)
def test_cuda_fusions_cover_every_norm_and_conv_of_each_family(family_graph):
    import onnx


    adapter, model, _ = family_graph
    before = collections.Counter(n.op_type for n in model.graph.node)
    opt, report = fusions.fuse(model, cuda=True)
    fused = report["fusions"]
    # Every GroupNorm (exported as InstanceNormalization) and every convolution is fused.
    assert fused["GroupNorm"] + fused["SkipGroupNorm"] == before["InstanceNormalization"] > 0
    assert fused["NhwcConv"] == before["Conv"] > 0
    assert fused["BiasSplitGelu"] == 0  # tiny GEGLU widths are not among the kernel's sizes
    assert report["decisions"]["bias_split_gelu"]["enabled"] is False
    # Attention: every unmasked attention block becomes MultiHeadAttention; masked ones stay.
    softmax = before["Softmax"]
    masked = report["decisions"]["masked_attention_left_unfused"]
    assert 0 < fused["MultiHeadAttention"] <= softmax - masked
    if adapter.family == "tango":
        assert masked > 0  # the text mask's cross-attention is kept out of the fusion
    # A valid graph the FP16 converter accepts; every compute op then runs in FP16.
    fusions.name_nodes(opt.model)
    fusions.to_fp16(opt, fusions.timestep_path(opt.model))
    onnx.checker.check_model(opt.model)
    counts = fusions.compute_precisions(opt.model)
    assert set(counts["layer_precisions"]) == {"fp16"}
    assert sum(1 for n in opt.model.graph.node if n.op_type in ("Sin", "Cos")) > 0
    types = fusions.tensor_types(opt.model)
    trig = [n for n in opt.model.graph.node if n.op_type in ("Sin", "Cos")]
    assert all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in trig)  # timestep embedding kept FP32


# tiny-audioldm's layout (and the reference model's, the same) is checked by the engine stage's own
# CPU check in test_cuda_engine_layers_json_says_what_computes_in_what; the optimizer is slow here.
@pytest.mark.parametrize("family_graph", ["tiny-audioldm2", "tiny-tango", "tiny-make-an-audio"], indirect=True)
def test_cpu_runnable_fusions_match_torch_fp32(family_graph, tmp_path):
    """Attention and layer-norm fusions, run by the CPU provider, against the torch FP32 U-Net."""
    import onnx
    import onnxruntime as ort
    import torch


    adapter, model, x = family_graph
    opt, report = fusions.fuse(model, cuda=False)
    assert report["fusions"]["Attention"] + report["fusions"]["MultiHeadAttention"] > 0
    path = tmp_path / "fused.onnx"
    onnx.save(opt.model, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.inference_mode():
        ref = adapter.export_module(adapter.denoiser)(*x.values()).numpy()
    assert _rel(got, ref) < 1e-4


def test_unprotected_masked_attention_fusion_is_wrong(tmp_path):
    """Why protect_masked_attention exists: without it the optimizer drops TANGO's text mask."""
    import onnx
    import onnxruntime as ort
    import torch

    from adm_export.engines.onnxruntime.cuda import parity_inputs
    from adm_export.export.onnx import torch_to_onnx
    from adm_export.models import load_model

    adapter = load_model("tiny-tango")
    x = parity_inputs(adapter.denoiser_spec(), 2, 16, seed=1)
    torch_to_onnx(adapter, adapter.denoiser, tmp_path / "u.onnx", 17, x)
    model = onnx.load(str(tmp_path / "u.onnx"))
    dequantize.prepare_fp32(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fusions, "protect_masked_attention", lambda m: 0)
        opt, _ = fusions.fuse(model, cuda=False)
    onnx.save(opt.model, str(tmp_path / "f.onnx"))
    got = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.inference_mode():
        ref = adapter.export_module(adapter.denoiser)(*x.values()).numpy()
    assert _rel(got, ref) > 1e-3


def _geglu_graph(width: int):
    """Add(bias[width]) -> Slice -> Div -> Erf: the exported GEGLU gate's start."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.zeros(width, np.float32), "b"),
             numpy_helper.from_array(np.array([width // 2], np.int64), "st"),
             numpy_helper.from_array(np.array([width], np.int64), "en"),
             numpy_helper.from_array(np.array([-1], np.int64), "ax"),
             numpy_helper.from_array(np.array(1.4142135, np.float32), "r2")]
    node = helper.make_node
    nodes = [node("Add", ["x", "b"], ["a"]), node("Slice", ["a", "st", "en", "ax"], ["g"]),
             node("Div", ["g", "r2"], ["d"]), node("Erf", ["d"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, width // 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("width,enabled", [(2560, True), (10240, True), (2048, False), (1024, False)])
def test_bias_split_gelu_only_for_the_kernel_widths(width, enabled):

    model = _geglu_graph(width)
    assert fusions.geglu_widths(model) == [width]
    opts, decisions = fusions.fusion_options(model)
    assert opts.enable_bias_splitgelu is enabled and decisions["bias_split_gelu"]["enabled"] is enabled
    cpu, _ = fusions.fusion_options(model, cuda=False)
    assert not cpu.enable_bias_splitgelu and not cpu.enable_group_norm and not cpu.enable_nhwc_conv


def test_classic_attention_keeps_the_numbers_and_restores_the_processors(tiny_adapter):
    import torch

    from adm_export.export.onnx import classic_attention
    from adm_export.models import load_model

    for adapter in (tiny_adapter, load_model("tiny-make-an-audio")):
        spec = adapter.denoiser_spec()
        x = spec.dummy_inputs(2, spec.frames_for_seconds(0.64), seed=2)
        module = adapter.export_module(adapter.denoiser)
        before = {k: type(v) for k, v in getattr(adapter.denoiser, "attn_processors", {}).items()}
        with torch.inference_mode():
            sdpa = module(*x.values())
            with classic_attention(adapter.denoiser):
                classic = module(*x.values())
        assert _rel(classic.numpy(), sdpa.numpy()) < 1e-5
        assert {k: type(v) for k, v in getattr(adapter.denoiser, "attn_processors", {}).items()} == before
        assert not any(getattr(m, "classic_attention", False) for m in adapter.denoiser.modules())


# -- the engine stage with --device cuda, on a machine without a GPU ----------------------------
def _no_tensorrt(*a, **k):
    from adm_export.errors import MissingDependencyError

    raise MissingDependencyError("TensorRT is not part of this test")


@pytest.fixture(scope="module")
def cuda_engines(tiny_build, tmp_path_factory):
    """``adm-export engine --device cuda`` of the tiny INT8 build's export (no GPU here, no TensorRT plan)."""
    out, result, _ = tiny_build
    assert result.exit_code == 0, result.output
    engines = tmp_path_factory.mktemp("cuda") / "engines"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("adm_export.engines.tensorrt.import_nvinfer", _no_tensorrt)
        r = run("engine", "--onnx", out / "onnx", "--out", engines, "--device", "cuda")
    return engines, r


def test_cuda_engine_stage_prints_what_it_built(cuda_engines):
    engines, r = cuda_engines
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("onnxruntime"))
    assert "cuda-fused-fp16" in line and "MultiHeadAttention" in line and "INT8 grid" in line
    assert "CPU-runnable fusions only: no GPU here" in line  # says what was not checked


def test_cuda_engine_layers_json_says_what_computes_in_what(cuda_engines, tiny_build):
    import onnx


    engines, r = cuda_engines
    assert r.exit_code == 0, r.output
    out = tiny_build[0]
    manifest = json.loads((engines / "manifest.json").read_text())
    layers = json.loads((engines / "onnxruntime" / "layers.json").read_text())
    assert layers == manifest["report"]["engines"]["onnxruntime"]
    assert layers["graph"] == "cuda-fused-fp16" and layers["device"] == "cuda"
    # Counts by precision (the report's engine.layer_precisions contract): all FP16 compute.
    assert list(layers["layer_precisions"]) == ["fp16"] and layers["layer_precisions"]["fp16"] > 100
    assert manifest["report"]["layer_precisions"] == layers["layer_precisions"]
    f = layers["fusions"]
    assert f["MultiHeadAttention"] == 22 and f["NhwcConv"] == 72 and f["GroupNorm"] + f["SkipGroupNorm"] == 46
    # The quantized weights: their grid, how they are stored; activations: not quantized.
    export_qdq = json.loads((out / "onnx" / "manifest.json").read_text())["qdq"]
    assert layers["weights"]["quantization_grid"] == {"int8": export_qdq["quantized_weight_dtypes"]["int8"]}
    assert layers["weights"]["stored"] == "fp16" and "INT8 grid" in layers["weights"]["note"]
    assert layers["activations"]["quantized"] is False
    # One input pair per quantized op, plus one output pair per INT8 convolution in the ONNX Runtime
    # placement (a CPU build's export).
    quant = json.loads((out / "quantized" / "manifest.json").read_text())
    assert layers["activations"]["qdq_pairs_dropped"] == export_qdq["quantized_ops"] + len(quant["output_quantized"])
    assert layers["qdq_left"] == {"QuantizeLinear": 0, "DequantizeLinear": 0}
    # Without a GPU: the CPU-runnable fusions were checked, and the record says the served graph was not.
    parity = layers["parity"]
    assert parity["passed"] and parity["device"] == "cpu" and parity["served_graph_checked"] is False
    assert parity["max"] < 1e-4 and "no CUDA" in parity["reason"]
    assert layers["latency"]["median_ms"] is None
    # The served file: FP16 weights in unet.onnx.data, FP32 inputs and output, no Q/DQ.
    served = onnx.load(str(engines / "onnxruntime" / "unet.onnx"))
    assert (engines / "onnxruntime" / "unet.onnx.data").stat().st_size > 0
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
               for v in (*served.graph.input, *served.graph.output))
    assert fusions.compute_precisions(served)["layer_precisions"] == layers["layer_precisions"]
    assert "com.microsoft" in {o.domain for o in served.opset_import}


def test_parity_failure_fails_the_cuda_build(tiny_build, tmp_path, monkeypatch):
    """A tolerance that can fail: a wrong fusion (here: a convolution weight scaled by 1.5) is caught,
    and the engines folder is not written."""
    import onnx
    from onnx import numpy_helper

    from adm_export.config import EngineConfig
    from adm_export.engines.onnxruntime import cuda as ort_cuda
    from adm_export.engines.stage import EngineParityError, build_engines

    real_fuse = fusions.fuse

    def broken_fuse(model, cuda=True):
        opt, report = real_fuse(model, cuda)
        graph = opt.model.graph
        conv = next(n for n in graph.node if n.op_type == "Conv")
        i = next(k for k, t in enumerate(graph.initializer) if t.name == conv.input[1])
        graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(graph.initializer[i]) * 1.5,
                                                              conv.input[1]))
        return opt, report

    def quick_graph(src, dst, use_fusions=True, reference_dst=None):
        # Only the reference graph matters here (the CPU check fuses it); skip the CUDA fusions.
        model = onnx.load(str(src))
        dequantize.prepare_fp32(model)
        ort_cuda._save(model, reference_dst)
        ort_cuda._save(model, dst)
        return {"graph": "cuda-fused-fp16", "summary": "-", "build_seconds": 0.0}

    monkeypatch.setattr(fusions, "fuse", broken_fuse)
    monkeypatch.setattr(ort_cuda, "build_cuda_graph", quick_graph)
    monkeypatch.setattr("adm_export.engines.tensorrt.import_nvinfer", _no_tensorrt)
    with pytest.raises(EngineParityError, match="parity failed.*--no-cuda-fusions"):
        build_engines(EngineConfig(device="cuda"), tiny_build[0] / "onnx", tmp_path / "e", frames=16)
    assert not (tmp_path / "e").exists()  # nothing half-written


# -- serving: what can be served with what, refused before any work -----------------------------
def test_serving_defaults_are_the_fast_path():
    from adm_export.engines.onnxruntime import OrtOptions

    cuda = OrtOptions.serving("cuda")
    assert cuda.provider == "cuda" and cuda.io_binding and cuda.cuda_graph and cuda.conv_algo_search == "exhaustive"
    assert not OrtOptions.serving("cuda", io_binding=False).cuda_graph
    assert not OrtOptions.serving("cuda", cuda_graph=False).cuda_graph
    assert not OrtOptions.serving("cuda", provider="cpu").cuda_graph  # engine on the CPU, pipeline on the GPU
    cpu = OrtOptions.serving("cpu")
    assert cpu.provider == "cpu" and not cpu.cuda_graph
    for kwargs, needle in (({"io_binding": False, "cuda_graph": True}, "--no-io-binding"),
                           ({"provider": "cpu", "cuda_graph": True}, "--cuda-graph"),
                           ({"provider": "cpu", "prefer_nhwc": True}, "--prefer-nhwc")):
        with pytest.raises(InvalidInputError, match=needle):
            OrtOptions.serving("cuda", **kwargs)
    with pytest.raises(InvalidInputError, match="--device cuda"):
        OrtOptions.serving("cpu", provider="tensorrt")


def test_prefer_nhwc_never_reaches_a_qdq_graph(tiny_build, tiny_adapter):
    """The crash of issue 14 ("Input channels C is not equal to kernel channels * group"): refused first."""
    from adm_export.engines.onnxruntime import OrtEngine, OrtOptions

    path = tiny_build[0] / "engines" / "onnxruntime" / "unet.onnx"
    with pytest.raises(InvalidInputError, match="--prefer-nhwc"):
        OrtEngine(path, tiny_adapter.denoiser_spec(), OrtOptions(provider="cuda", prefer_nhwc=True))


@pytest.mark.parametrize("args,needle", [
    (["--device", "cuda"], "adm-export engine --onnx ONNX_DIR --out DIR --device cuda"),
    (["--device", "cuda", "--ort-provider", "tensorrt"], "--ort-provider tensorrt"),
    (["--device", "cuda", "--cuda-graph", "--no-io-binding"], "--no-io-binding"),
    (["--prefer-nhwc"], "--prefer-nhwc"),
    (["--device", "cuda", "--cudnn-search", "fastest"], "--cudnn-search"),
])
def test_cpu_engine_refusals_are_one_line_before_any_work(tiny_build, tmp_path, monkeypatch, args, needle):
    import adm_export.models

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(adm_export.models, "load_model", no_model)
    r = run("generate", "--engine", tiny_build[0] / "engines", "-p", "x", *args, "-o", tmp_path / "o")
    assert r.exit_code in (1, 2), r.output
    assert needle in (one_error_line(r) if r.exit_code == 1 else r.output)
    assert not (tmp_path / "o").exists()


def test_cuda_engine_refused_on_the_cpu_and_eval_refuses_like_generate(cuda_engines, tiny_build, tmp_path,
                                                                        monkeypatch):
    import adm_export.models

    engines, r = cuda_engines
    assert r.exit_code == 0, r.output

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(adm_export.models, "load_model", no_model)
    for cmd in (["generate", "--engine", engines, "-p", "x"], ["generate", "--engine", engines, "-p", "x",
                                                                "--device", "cuda", "--ort-provider", "cpu"],
                ["eval", "--engine", engines]):
        res = run(*cmd, "-o", tmp_path / "o")
        assert res.exit_code == 1, res.output
        line = one_error_line(res)
        assert "CUDA engine" in line and "--device cuda" in line
    # eval --device cuda on the CPU engine: the same refusal as generate's, before loading anything
    # (the library call: the CLI refuses --device cuda earlier here, for want of a GPU).
    from adm_export.config import EvalConfig
    from adm_export.eval.harness import evaluate

    with pytest.raises(InvalidInputError, match="adm-export engine --onnx ONNX_DIR --out DIR --device cuda"):
        evaluate(EvalConfig(device="cuda"), tiny_build[0] / "engines")


def test_engine_flags_without_an_engine_are_refused(tmp_path):
    for flags in (["--no-cuda-graph"], ["--device", "cuda", "--prefer-nhwc"], ["--no-io-binding"]):
        r = run("generate", "-p", "x", *flags, "-o", tmp_path / "o")
        assert r.exit_code == 1, r.output
        assert "--engine" in one_error_line(r)
