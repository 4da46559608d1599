"""Device and dtype placement (adm_export.devices) and its use by every stage that runs the denoiser.

There is no GPU here, so two stand-ins check that stored inputs follow the module instead of
staying on the CPU: the ``meta`` device (torch refuses a CPU tensor in a meta module's matmul
exactly as it refuses one in a CUDA module's: "Tensor on device meta is not on the expected
device cpu") and the floating dtype (an FP64 denoiser refuses FP32 inputs: "mat1 and mat2 must
have the same dtype"), which :func:`to_module` moves together with the device. The real device
runs are in tests/gpu (``test_flow_gpu.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch

from adm_export.devices import check_device, exact_float32, module_placement, to_module


def test_to_module_follows_device_and_dtype():
    point = {"sample": torch.randn(2, 4), "timestep": torch.tensor([3.0, 3.0]), "ids": torch.tensor([1, 2]),
             "note": "kept"}
    meta = torch.nn.Linear(4, 4).to("meta")
    moved = to_module(point, meta)
    assert list(moved) == list(point)  # spec order kept: the export modules take inputs positionally
    assert all(v.device.type == "meta" for v in moved.values() if isinstance(v, torch.Tensor))
    assert moved["ids"].dtype == torch.int64 and moved["note"] == "kept"
    half = to_module(point, torch.nn.Linear(4, 4).half())
    assert half["sample"].dtype == torch.float16
    assert half["timestep"].dtype == torch.float32  # never narrowed below FP32
    double = to_module(point, torch.nn.Linear(4, 4).double())
    assert double["sample"].dtype == double["timestep"].dtype == torch.float64
    same = to_module(point, torch.nn.Linear(4, 4))
    assert same["sample"] is point["sample"]  # already in place: no copy
    # Something without tensors (an ONNX Runtime denoiser, a callable) leaves the inputs alone.
    assert to_module(point, object())["sample"] is point["sample"]
    assert module_placement(object()) == (None, None)


def test_run_denoiser_moves_cached_points_to_the_module(tiny_adapter):
    """The "mat1 is on cpu" crash of ``quantize --device cuda``: CPU points, module elsewhere."""
    from adm_export.numerics import run_denoiser

    point = tiny_adapter.denoiser_spec().dummy_inputs(2, 16)
    meta = copy.deepcopy(tiny_adapter.denoiser).to("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):  # what happened before the fix
        with torch.inference_mode():
            tiny_adapter.export_module(meta)(*point.values())
    out = run_denoiser(tiny_adapter, meta, point)
    assert out.device.type == "meta" and tuple(out.shape) == tuple(point["sample"].shape)


def test_denoising_batches_live_with_the_references(tiny_adapter):
    """auto_quantize's training batches are built where the model's outputs are (not the cache's CPU)."""
    from adm_export.quantize.sensitivity import denoising_batches

    points = [tiny_adapter.denoiser_spec().dummy_inputs(2, 16, seed=s) for s in range(2)]
    refs = [torch.randn_like(p["sample"]).to("meta") for p in points]
    batches, loss = denoising_batches(tiny_adapter, points, refs)
    assert "denoising loss" in loss
    for b, p in zip(batches, points):
        assert b["target"].device.type == "meta"
        assert all(v.device.type == "meta" for v in b["inputs"].values())
        assert list(b["inputs"]) == list(p)
    # On one device the batches are unchanged by the device handling: same seeded noise.
    cpu_refs = [torch.zeros_like(p["sample"]) for p in points]
    a, _ = denoising_batches(tiny_adapter, points, cpu_refs, seed=3)
    b, _ = denoising_batches(tiny_adapter, points, cpu_refs, seed=3)
    assert torch.equal(a[0]["target"], b[0]["target"]) and torch.equal(a[1]["inputs"]["sample"],
                                                                        b[1]["inputs"]["sample"])


@pytest.fixture(scope="module")
def fp64_adapter():
    """tiny-audioldm with its denoiser in FP64: a module whose placement differs from the cache's."""
    from adm_export.models import load_model

    adapter = load_model("tiny-audioldm")
    adapter.pipeline.unet.double()
    return adapter


def test_quantize_stage_feeds_the_module_where_it_lives(fp64_adapter, tiny_build, tmp_path):
    """The quantize stage end to end (references, ModelOpt's calibration loop, per-point errors)
    with cached FP32 CPU points and a module that is not FP32."""
    pytest.importorskip("modelopt.torch.quantization")
    from adm_export.config import QuantizeConfig
    from adm_export.quantize.stage import quantize

    out, _, _ = tiny_build
    manifest = quantize(QuantizeConfig(precision="int8"), out / "calibration", tmp_path / "q", adapter=fp64_adapter)
    err = manifest["quant_error_rel_l2"]
    assert 0 < err["mean"] < 0.2  # a real quantized model, measured on every cached point
    assert len(err["per_point"]) == manifest["calibration_points"] == 8


class _Net(torch.nn.Module):
    """A small conv + linear denoiser stand-in (auto_quantize on the tiny U-Net takes a minute here)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.proj = torch.nn.Linear(32, 64)
        self.out = torch.nn.Linear(64, 8)

    def forward(self, sample, timestep):
        h = torch.nn.functional.silu(self.conv(sample)).flatten(2).transpose(1, 2)
        h = self.out(torch.nn.functional.gelu(self.proj(h))) + timestep.reshape(-1, 1, 1)
        return h.transpose(1, 2).reshape(sample.shape)


class _NetAdapter:
    """The slice of a model adapter that ``auto_quantize_comparison`` uses."""

    pipeline = None

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def export_module(self, m=None):
        return m if m is not None else self.denoiser


def test_auto_quantize_comparison_feeds_the_module_where_it_lives():
    """ModelOpt's auto_quantize beside the mixed search: its batches, forward step and loss follow
    the model (it reports its own failures as ``ran: False``, so a placement bug shows up here)."""
    pytest.importorskip("modelopt.torch.quantization")
    from adm_export.numerics import run_denoiser
    from adm_export.quantize.sensitivity import auto_quantize_comparison

    torch.manual_seed(0)
    adapter = _NetAdapter(_Net().double().eval())
    g = torch.Generator().manual_seed(1)
    points = [{"sample": torch.randn(2, 8, 6, 6, generator=g), "timestep": torch.tensor([5.0, 5.0])}
              for _ in range(2)]
    refs = [run_denoiser(adapter, adapter.denoiser, p) for p in points]
    comparison = auto_quantize_comparison(adapter, points, points, refs, 6.4)
    assert comparison["ran"], comparison
    assert comparison["measured_rel_l2"] > 0


def test_exact_float32_restores_the_settings():
    conv = torch.backends.cudnn.conv
    before = (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    with exact_float32():
        assert conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_before_any_work(tmp_path):
    from adm_export.errors import InvalidInputError
    from tests.helpers import one_error_line, run

    with pytest.raises(InvalidInputError, match="--device cuda"):
        check_device("cuda")
    check_device("cpu")
    for args in (["calibrate", "--model", "tiny-audioldm", "--out", tmp_path / "c"],
                 ["generate", "--model", "tiny-audioldm", "-p", "rain", "--out", tmp_path / "g"],
                 ["export-baseline", "--model", "tiny-audioldm", "--out", tmp_path / "b"]):
        result = run(*args, "--device", "cuda")
        assert result.exit_code == 1, result.output
        assert "sees no CUDA GPU" in one_error_line(result)
        assert not (tmp_path / args[-1].name).exists()


def test_engine_stage_torch_reference_runs_in_exact_fp32(tiny_adapter):
    """The CUDA engine build's torch reference: inputs follow the denoiser, no TF32, flags restored."""
    from adm_export.engines.stage import _torch_reference
    from adm_export.numerics import run_denoiser

    point = tiny_adapter.denoiser_spec().dummy_inputs(2, 16, seed=4)
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    got = _torch_reference(tiny_adapter)(point)
    assert (got == run_denoiser(tiny_adapter, tiny_adapter.denoiser, point).numpy()).all()
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    assert isinstance(torch.backends.cudnn.allow_tf32, bool)  # the legacy flags stay readable
