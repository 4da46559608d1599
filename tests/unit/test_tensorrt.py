"""TensorRT / TensorRT-RTX engine builds on CPU (TensorRT-RTX builds without a GPU)."""

from __future__ import annotations

import json
import logging
import sys
import threading

import numpy as np
import pytest

from adm_export.engines.tensorrt import inspection
from adm_export.engines.tensorrt import timing_cache as tcache
from adm_export.engines.tensorrt import EngineBuildError, EngineProfile, build_engine, import_nvinfer
from adm_export.errors import InvalidInputError, MissingDependencyError
from adm_export.models.base import DenoiserSpec, TensorSpec

C, MELS = 8, 16
PROFILE = EngineProfile(
    min_batch=1, opt_batch=2, max_batch=4, min_frames=16, opt_frames=32, max_frames=64
)


def _spec() -> DenoiserSpec:
    return DenoiserSpec(
        inputs=(TensorSpec("sample", ("batch", C, "frames", MELS)), TensorSpec("timestep", ("batch",))),
        outputs=(TensorSpec("noise_pred", ("batch", C, "frames", MELS)),),
        latent_frames_per_second=25.0,
        frame_multiple=4,
    )


def _tiny_quantized_unet(path) -> None:
    """sample -> Q/DQ -> Conv(INT8 weights) + timestep -> Q/DQ -> Conv(INT8 weights) -> Conv(float)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "s_in": np.array(0.05, np.float32), "z_in": np.array(0, np.int8),
        "s_mid": np.array(0.1, np.float32), "z_mid": np.array(0, np.int8),
        "t_shape": np.array([-1, 1, 1, 1], np.int64),
        "w3": (rng.standard_normal((C, C, 3, 3)) * 0.1).astype(np.float32),
    }
    for k in ("w1", "w2"):
        arrays[f"{k}_q"] = rng.integers(-127, 128, (C, C, 3, 3)).astype(np.int8)
        arrays[f"{k}_s"] = (rng.random(C) * 0.01 + 0.001).astype(np.float32)  # per output channel
        arrays[f"{k}_z"] = np.zeros(C, np.int8)
    node = helper.make_node
    nodes = [
        node("QuantizeLinear", ["sample", "s_in", "z_in"], ["x_q"], name="q_in"),
        node("DequantizeLinear", ["x_q", "s_in", "z_in"], ["x_dq"], name="dq_in"),
        node("DequantizeLinear", ["w1_q", "w1_s", "w1_z"], ["w1"], name="dq_w1", axis=0),
        node("Conv", ["x_dq", "w1"], ["c1"], name="conv_q1", pads=[1, 1, 1, 1]),
        node("Reshape", ["timestep", "t_shape"], ["t4"], name="t_reshape"),
        node("Add", ["c1", "t4"], ["a1"], name="add_t"),
        node("QuantizeLinear", ["a1", "s_mid", "z_mid"], ["a_q"], name="q_mid"),
        node("DequantizeLinear", ["a_q", "s_mid", "z_mid"], ["a_dq"], name="dq_mid"),
        node("DequantizeLinear", ["w2_q", "w2_s", "w2_z"], ["w2"], name="dq_w2", axis=0),
        node("Conv", ["a_dq", "w2"], ["c2"], name="conv_q2", pads=[1, 1, 1, 1]),
        node("Conv", ["c2", "w3"], ["noise_pred"], name="conv_float", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_unet",
        [
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", C, "frames", MELS]),
            helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
        ],
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", C, "frames", MELS])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def rtx():
    # The standalone wheel's module is tensorrt_rtx_bindings, the meta package's tensorrt_rtx:
    # import_nvinfer tries both, so skip on it rather than on one module name.
    try:
        return import_nvinfer("tensorrt-rtx")[0]
    except MissingDependencyError:
        pytest.skip("TensorRT-RTX is not installed (pip install 'adm-export[tensorrt-rtx]')")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "unet.onnx"
    _tiny_quantized_unet(path)
    return path


@pytest.fixture(scope="module")
def built(rtx, tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    report = build_engine(
        tiny_onnx, out, _spec(), PROFILE, flavor="tensorrt-rtx", timing_cache=out / "timing.cache"
    )
    return report, out


# -- profiles and backend selection (no TensorRT needed) ----------------------------------------
def test_profile_shapes_come_from_the_spec():
    shapes = PROFILE.shapes(_spec())
    assert shapes == {
        "sample": ((1, C, 16, MELS), (2, C, 32, MELS), (4, C, 64, MELS)),
        "timestep": ((1,), (2,), (4,)),
    }
    profile = EngineProfile.from_seconds(_spec(), (1, 2, 4), (0.6, 1.1, 2.5))
    assert profile.axis_ranges()["frames"] == (16, 28, 64)


def test_profile_rejects_bad_ranges():
    with pytest.raises(InvalidInputError, match="min <= opt <= max"):
        EngineProfile(1, 8, 4, 16, 32, 64)
    with pytest.raises(InvalidInputError, match=r"not multiples of 4.*\[20\]"):
        EngineProfile(1, 2, 4, 16, 18, 64).shapes(_spec())


def test_missing_tensorrt_names_the_extra(monkeypatch):
    for name in ("tensorrt", "tensorrt_bindings"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    with pytest.raises(MissingDependencyError) as info:
        import_nvinfer("tensorrt")
    message = str(info.value)
    assert "pip install 'adm-export[tensorrt-rtx]'" in message
    assert "docker/Dockerfile.gpu" in message
    assert "\n" not in message
    with pytest.raises(InvalidInputError, match="tensorrt-rtx"):
        import_nvinfer("cuda")


def test_timing_cache_is_created_merged_and_reused(tmp_path):
    """The read-merge-write path used with full TensorRT, on stand-ins for the nvinfer objects."""

    class Cache:
        def __init__(self, entries):
            self.entries = dict(entries)

        def combine(self, other, ignore_mismatch):
            self.entries.update(other.entries)
            return True

        def serialize(self):
            return json.dumps(self.entries, sort_keys=True).encode()

    class Config:
        def __init__(self, entries=()):
            self.cache = Cache(entries)

        def create_timing_cache(self, data):
            return Cache(json.loads(data) if data else {})

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = Cache({**cache.entries, **self.cache.entries})
            return True

        def get_timing_cache(self):
            return self.cache

    path = tmp_path / "timing.cache"
    assert tcache.load(Config(), path) == 0
    tcache.save(Config({"conv_a": 1}), path)
    assert path.is_file()

    second = Config({"conv_b": 2})
    assert tcache.load(second, path) > 0  # reused
    assert second.cache.entries == {"conv_a": 1, "conv_b": 2}

    # Concurrent builds merge under the lock instead of overwriting each other.
    threads = [
        threading.Thread(target=tcache.save, args=(Config({f"k{i}": i}), path))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saved = json.loads(path.read_bytes())
    assert {f"k{i}" for i in range(8)} | {"conv_a"} <= set(saved)
    assert not list(tmp_path.glob(".timing.cache.*.tmp"))


def test_inspector_json_is_read_into_precisions():
    """Engine-inspector JSON (what full TensorRT on a GPU gives) maps back onto the network's layers."""
    info = {"Layers": [
        {"Name": "q_in", "LayerType": "Quantize", "Metadata": "[ONNX Layer: q_in]",
         "Inputs": [{"Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Format/Datatype": "Int8"}]},
        {"Name": "conv_q1 + add_t", "LayerType": "CaskConvolution",
         "TacticName": "sm80_xmma_fprop_implicit_gemm_i8i8",
         "Metadata": "[ONNX Layer: conv_q1]\x1f[ONNX Layer: dq_in]\x1f[ONNX Layer: add_t]",
         "Inputs": [{"Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "Outputs": [{"Format/Datatype": "Int8"}]},
        {"Name": "conv_float", "LayerType": "CaskConvolution", "Metadata": "[ONNX Layer: conv_float]",
         "Inputs": [{"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "Outputs": []},
    ]}
    net = {
        "layers": [],
        "qdq": {"q_in", "dq_in", "dq_w1"},
        "compute": [
            {"name": "conv_q1", "type": "CONVOLUTION",
             "activation_dtype": "int8", "weight_dtype": "int8"},
            {"name": "conv_float", "type": "CONVOLUTION",
             "activation_dtype": "fp32", "weight_dtype": "fp32"},
        ],
    }
    layers = inspection.layers_from_inspector(info)
    source, engine_layers, rows = inspection.choose_source(net, [("engine_inspector", layers)])
    assert source == "engine_inspector" and len(engine_layers) == 3
    assert [(r["name"], r["precision"], r["engine_layer"]) for r in rows] == [
        ("conv_q1", "int8", "conv_q1 + add_t"),
        ("conv_float", "fp32w/fp16a", "conv_float"),  # the engine runs it in FP16 on FP32-typed weights
    ]


# -- real builds with TensorRT-RTX ----------------------------------------------------------------
def test_quantized_engine_reports_int8_and_float_layers(built):
    report, out = built
    plan, layers_json = out / "unet.plan", out / "layers.json"
    assert plan.is_file() and plan.stat().st_size == report["plan_bytes"] > 0
    assert report["backend"] == "tensorrt-rtx" and report["version"]
    assert report["strongly_typed"] is True
    assert report["source"] in ("engine_plan", "engine_inspector")
    assert report["layer_precisions"] == {"int8": 2, "fp32": 1}
    doc = json.loads(layers_json.read_text())
    by_name = {row["name"]: row["precision"] for row in doc["compute_layers"]}
    assert by_name == {"conv_q1": "int8", "conv_q2": "int8", "conv_float": "fp32"}
    assert doc["source"] == report["source"]
    assert isinstance(report["unfused_qdq"], list)  # known when the engine itself was read
    assert report["num_layers"] > 0
    # Dynamic batch and frames, straight from the spec and the profile.
    assert report["profile"] == {
        "sample": {"min": [1, C, 16, MELS], "opt": [2, C, 32, MELS], "max": [4, C, 64, MELS]},
        "timestep": {"min": [1], "opt": [2], "max": [4]},
    }
    # TensorRT-RTX ignores timing caches: the report says so instead of writing an empty file.
    assert report["timing_cache"]["used"] is False and "TensorRT-RTX" in report["timing_cache"]["reason"]


def test_network_definition_fallback(rtx, tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(inspection, "layers_from_plan", lambda plan: [])
    monkeypatch.setattr(inspection, "engine_information", lambda *a: None)
    report = build_engine(tiny_onnx, tmp_path, _spec(), PROFILE, flavor="tensorrt-rtx")
    assert report["source"] == "network_definition"
    assert report["layer_precisions"] == {"int8": 2, "fp32": 1}
    assert report["unfused_qdq"] is None  # unknown without the engine


def test_level_targets_and_refit(rtx, tiny_onnx, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="adm_export.engines.tensorrt")
    report = build_engine(tiny_onnx, tmp_path, _spec(), PROFILE, flavor="auto", opt_level=0,
                          compute_capabilities=["SM89"])
    assert report["opt_level"] == 0 and report["compute_capabilities"] == ["SM89"]
    assert report["layer_precisions"] == {"int8": 2, "fp32": 1}
    assert "Built TensorRT" in caplog.text
    # TensorRT-RTX 1.7 compiles refittable engines with CUDA: without a GPU it fails, and says so.
    try:
        report = build_engine(
            tiny_onnx, tmp_path, _spec(), PROFILE, flavor="tensorrt-rtx", refittable=True
        )
        assert report["refittable"]
    except EngineBuildError as exc:
        assert "GPU" in str(exc) and "\n" not in str(exc)
    with pytest.raises(InvalidInputError, match="SM99"):
        build_engine(
            tiny_onnx, tmp_path, _spec(), PROFILE, flavor="tensorrt-rtx", compute_capabilities=["SM99"]
        )
    with pytest.raises(InvalidInputError, match="0 to 5"):
        build_engine(tiny_onnx, tmp_path, _spec(), PROFILE, opt_level=9)


def test_broken_onnx_gives_one_line_error(rtx, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # 3 input channels where the sample has 8.
    weight = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["sample", "w"], ["noise_pred"], name="bad_conv")],
        "broken",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", C, "frames", MELS])],
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, None)],
        [weight],
    )
    path = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(EngineBuildError) as info:
        build_engine(path, tmp_path / "out", _spec(), PROFILE, flavor="tensorrt-rtx")
    message = str(info.value)
    assert "bad_conv" in message and "(Conv)" in message and "\n" not in message
    assert not (tmp_path / "out" / "unet.plan").exists()

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    with pytest.raises(EngineBuildError, match="could not parse"):
        build_engine(garbage, tmp_path / "out", _spec(), PROFILE, flavor="tensorrt-rtx")


def test_onnx_inputs_must_match_the_spec(rtx, tiny_onnx, tmp_path):
    other = DenoiserSpec(
        inputs=(TensorSpec("latents", ("batch", C, "frames", MELS)),),
        outputs=(),
        latent_frames_per_second=25.0,
        frame_multiple=4,
    )
    with pytest.raises(EngineBuildError, match=r"not in the denoiser spec"):
        build_engine(tiny_onnx, tmp_path, other, PROFILE, flavor="tensorrt-rtx")


# -- FP16-typed Q/DQ graphs (engines.fp16_qdq): no FP32 layers in a quantized strongly typed build --
def _fp16_typed(src, dst):
    import onnx

    from adm_export.engines.fp16_qdq import to_fp16_typed_qdq

    model = onnx.load(str(src))
    report = to_fp16_typed_qdq(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return model, report


def _float_compute(rows) -> list[str]:
    """Convolutions / matmuls of a TensorRT layer report that compute in FP32."""
    return [r["name"] for r in rows if r["precision"] in ("fp32", "fp32w/fp16a") or r.get("activation_dtype") == "fp32"]


def test_fp16_typed_qdq_graph_types_and_numbers(tiny_onnx, tmp_path):
    """FP16 activations, weights and Q/DQ scales (opset 19); the timestep reshape kept FP32; same numbers."""
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator

    from adm_export.engines.onnxruntime import fusions

    model, report = _fp16_typed(tiny_onnx, tmp_path / "fp16.onnx")
    assert report["opset"] == 19 == next(o.version for o in model.opset_import if o.domain == "")
    inits = {i.name: i for i in model.graph.initializer}
    scales = [inits[n.input[1]].data_type for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert scales and set(scales) == {TensorProto.FLOAT16}
    assert inits["w3"].data_type == TensorProto.FLOAT16  # the unquantized layer's weight
    types = fusions.tensor_types(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert [types[c.input[0]] for c in convs] == [TensorProto.FLOAT16] * 3
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    assert types[reshape.output[0]] == TensorProto.FLOAT  # timestep path: FP32
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [TensorProto.FLOAT] * 3
    rng = np.random.default_rng(3)
    feed = {"sample": rng.standard_normal((2, C, 16, MELS)).astype(np.float32),
            "timestep": np.array([3.0, 700.0], np.float32)}
    import onnxruntime as ort

    ref = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ReferenceEvaluator(model).run(None, feed)[0]  # ONNX's reference ops: FP16 Q/DQ and Conv
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2


def test_fp16_typed_quantized_engine_has_no_fp32_convolutions_or_matmuls(rtx, tiny_onnx, tmp_path):
    """The strongly typed TensorRT-RTX build of the FP16-typed graph: INT8 + FP16, nothing in FP32."""
    _fp16_typed(tiny_onnx, tmp_path / "fp16.onnx")
    report = build_engine(tmp_path / "fp16.onnx", tmp_path / "e", _spec(), PROFILE, flavor="tensorrt-rtx")
    assert report["layer_precisions"] == {"fp16": 1, "int8": 2}
    rows = json.loads((tmp_path / "e" / "layers.json").read_text())["compute_layers"]
    assert not _float_compute(rows)


def test_default_quantized_build_tensorrt_rtx_plan_is_int8_and_fp16(rtx, tiny_build):
    """The default build's opportunistic TensorRT-RTX plan (from the same export): fails on any FP32
    convolution or matmul (it was {"fp32": 48, "int8": 98} before the FP16-typed graph)."""
    out, result, report = tiny_build
    assert result.exit_code == 0, result.output
    trt = report["engine"]["engines"]["tensorrt-rtx"]
    assert trt["built"] is True, trt
    assert trt["graph"]["kind"] == "fp16-typed q/dq" and trt["graph"]["opset"] >= 19
    assert set(trt["layer_precisions"]) == {"int8", "fp16"}, trt["layer_precisions"]
    assert trt["layer_precisions"]["int8"] >= report["quantization"]["qdq"].get("Conv:quantized", 0) > 0
    rows = json.loads((out / "engines" / "tensorrt-rtx" / "layers.json").read_text())["compute_layers"]
    assert rows and not _float_compute(rows)
