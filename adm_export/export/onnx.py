"""The ``export`` stage: quantized denoiser -> ONNX with Q/DQ and integer weights, checked for parity.

Steps: restore the quantized model; export with the TorchScript exporter (``dynamo=False``: the
dynamo exporter fails on ModelOpt's fake quant, DESIGN.md §5), which turns INT8 fake quant into
standard QuantizeLinear/DequantizeLinear; fold the weights into INT8 initializers
(``onnx_graph.fold_weight_quantization``); check that every quantized op has Q/DQ on activation and
weight; compare ONNX Runtime (CPU) with the torch fake-quant model on cached inputs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

from adm_export.artifacts import atomic_dir, manifest_digest, read_manifest, write_manifest
from adm_export.calibration.cache import load_cache, parity_points
from adm_export.config import ExportConfig, Placement, to_dict
from adm_export.devices import exact_float32, to_module
from adm_export.errors import InvalidInputError
from adm_export.export import onnx_graph
from adm_export.formats.capabilities import PLACEMENTS
from adm_export.formats.policy import LayerPlan
from adm_export.numerics import rel_l2, run_denoiser
from adm_export.quantize.modelopt import load_quantized

logger = logging.getLogger(__name__)

STAGE = "onnx"
ONNX_FILE = "unet.onnx"
# Protobuf cannot hold a single message over 2 GB: larger models keep weights in a side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@contextlib.contextmanager
def classic_attention(module):
    """Compute attention with explicit matmuls (``softmax(q k^T * scale) v``) while inside.

    ONNX Runtime's diffusion optimizer fuses attention into ``MultiHeadAttention`` (flash
    attention on CUDA) only from the graph of diffusers' classic ``AttnProcessor``; the default
    ``AttnProcessor2_0`` traces ``scaled_dot_product_attention`` into a pattern that crashes it
    (DESIGN.md §6). Same arithmetic (measured: 6e-7 relative on the FP32 U-Net; a quantized model
    moves by its rounding floor, as any change of summation order does). Modules outside
    diffusers opt in with a ``classic_attention`` attribute (Make-An-Audio's LDM attention). The
    processors are restored on exit, so the caller's model is left as it was.
    """
    import torch
    import torch.nn.functional as F

    # ModelOpt's quantized attention swaps torch.bmm / torch.baddbmm / SDPA for its own functions
    # during a forward and restores them without a try/finally: an exception inside would leave
    # them swapped for the whole process (seen: endless recursion in every later export).
    functions = [(torch, "bmm"), (torch, "baddbmm"), (F, "scaled_dot_product_attention")]
    originals = [(pkg, name, getattr(pkg, name)) for pkg, name in functions]
    saved = None
    flagged = [m for m in module.modules() if hasattr(m, "classic_attention")]
    if hasattr(module, "set_attn_processor") and hasattr(module, "attn_processors"):
        from diffusers.models.attention_processor import AttnProcessor

        saved = dict(module.attn_processors)
        module.set_attn_processor(AttnProcessor())
    previous = [m.classic_attention for m in flagged]
    for m in flagged:
        m.classic_attention = True
    try:
        yield module
    finally:
        for m, value in zip(flagged, previous):
            m.classic_attention = value
        if saved is not None:
            module.set_attn_processor(saved)
        for pkg, name, func in originals:
            setattr(pkg, name, func)
            if hasattr(pkg, "_" + name) and name != "scaled_dot_product_attention":
                delattr(pkg, "_" + name)  # ModelOpt's cache of the original, left behind


def torch_to_onnx(adapter, module, path: Path, opset: int, example: dict) -> None:
    """Export ``module`` (the adapter's denoiser or a quantized copy) with the spec's names and axes.

    Attention is traced in its classic form (:func:`classic_attention`), so every export can be
    served by the fused CUDA engine.
    """
    import copy

    import torch

    spec = adapter.denoiser_spec()
    # Traced on a copy: tracing the classic attention path left the caller's module computing
    # differently afterwards (float rounding, measured: 3e-8 on a generated clip).
    module = copy.deepcopy(module)
    wrapped = adapter.export_module(module).eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), \
            classic_attention(module):
        warnings.simplefilter("ignore")  # TracerWarnings from diffusers' shape checks
        torch.onnx.export(
            wrapped,
            tuple(example[t.name] for t in spec.inputs),
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def save_onnx(model, path: Path) -> int:
    """Save an ONNX model (external data above 2 GB); returns the bytes on disk."""
    import onnx

    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return onnx_file_bytes(path)


def onnx_file_bytes(path: Path) -> int:
    """Bytes of an ONNX file plus its external-data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def parity_session(path):
    """A CPU session for parity that computes what the file says (``path``: a file or an ``onnx.ModelProto``).

    ONNX Runtime fuses blocked-INT4 DequantizeLinear -> MatMul into MatMulNBits and by default
    (accuracy level 4) quantizes that MatMul's activations to INT8 per block at run time: an
    engine choice that adds its own error (measured: 7e-3 relative on a test net), not part of
    the exported model. Level 0 computes in FP32, so parity isolates the export itself.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if not isinstance(path, (str, Path)):  # a ModelProto (export.parity's instrumented graph)
        if path.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            return ort.InferenceSession(path.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory() as tmp:  # over protobuf's 2 GB: through a file with external data
            save_onnx(path, Path(tmp) / "instrumented.onnx")
            return ort.InferenceSession(str(Path(tmp) / "instrumented.onnx"), sess_options=so,
                                        providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def check_parity(adapter, model, session, points: list[dict], path=None) -> dict:
    """Compare ONNX Runtime with the torch fake-quant model, and put the gap in context.

    Why the end-to-end gap is not at float rounding level: a quantized network is a discontinuous
    function of its arithmetic. Two correct implementations (torch and ONNX Runtime accumulate
    convolutions in different orders; ONNX Runtime's integer kernels add an INT32 bias and
    requantize in float) differ by ~1e-7 before a QuantizeLinear; the rare value that sits on a
    rounding boundary then moves by one whole step (1/127 of its range), and every later quantizer
    turns that perturbation into more whole-step flips: on a tiny random-weight U-Net the end-to-end
    gap grows to the size of the quantization error itself. The *rounding floor* shows this on
    torch alone (the same fake-quant model in float64: same grid, different rounding), but it is
    one draw of the same lottery (2e-7 when float64 flips no code, 3e-2 when it flips one), so
    the end-to-end gap and the floor are reported, not judged.

    The verdict is the teacher-forced check (:func:`adm_export.export.parity.teacher_forced_parity`,
    needs ``path``): torch is fed ONNX Runtime's codes at every activation quantizer, so each stage
    is compared from the same inputs; a correct export has codes at most one step apart, rarely,
    and a final output within float rounding, while a wrong scale, a missing Q/DQ or a mis-folded
    weight moves codes by many steps. Without ``path`` (no file to instrument) the old criterion
    decides: the end-to-end gap within twice the floor (plus 1e-4) on average. The unquantized
    export has no quantizer and matches torch to ~1e-6 (tested).

    Returns:
        Per-point lists and summaries: ``onnx_vs_torch``, ``rounding_floor``, ``quant_error``
        (fake-quant vs full precision), the timesteps, ``teacher_forced`` and ``passed``.
    """
    import copy

    import torch

    from adm_export.engines.onnxruntime import OrtRunner

    runner = OrtRunner(session)
    model64 = copy.deepcopy(model).double()
    gap, floor, qerr, served = [], [], [], []
    for p in points:
        # The export's attention arithmetic (a quantized model's output moves by its rounding floor
        # with the summation order); the float64 copy keeps its own (its mask and its q/k would
        # meet in baddbmm in different dtypes, and float64 rounding is negligible either way).
        with classic_attention(model):
            fake = run_denoiser(adapter, model, p)
        fake64 = run_denoiser(adapter, model64, {k: v.double() for k, v in p.items()})
        full = run_denoiser(adapter, adapter.denoiser, p)
        served.append(torch.from_numpy(runner(p)))
        gap.append(rel_l2(served[-1], fake))
        floor.append(rel_l2(fake64, fake))
        qerr.append(rel_l2(fake, full))
    del model64
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    forced = None
    if path is not None:
        from adm_export.export.parity import teacher_forced_parity

        forced = teacher_forced_parity(adapter, model, path, points, parity_session, classic_attention,
                                       served)
    end_to_end = mean(gap) <= 2 * mean(floor) + 1e-4
    return {
        "onnx_vs_torch_rel_l2": gap,
        "rounding_floor_rel_l2": floor,
        "quant_error_rel_l2": qerr,
        "timesteps": [float(p["timestep"][0]) for p in points],
        "onnx_vs_torch_max": max(gap),
        "onnx_vs_torch_mean": mean(gap),
        "rounding_floor_max": max(floor),
        "rounding_floor_mean": mean(floor),
        "quant_error_max": max(qerr),
        "quant_error_mean": mean(qerr),
        "end_to_end_within_floor": end_to_end,
        "teacher_forced": forced,
        "passed": forced["passed"] if forced is not None else end_to_end,
    }


STANDARD_LOWBIT_OPSET = 21  # INT4 (blocked) and FP8 DequantizeLinear are standard from opset 21 / 19
_TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter stops at 20; 20 -> 21 only widens Q/DQ/Cast types


def weight_codecs(model, plans) -> dict[str, dict]:
    """Low-bit codes and scales of every quantized weight, from the torch fake-quant model.

    The scale follows ModelOpt's quantizer (``amax / bound``: 127 for INT8, 7 for INT4, 448 for
    FP8 E4M3); the codes are the fake-quant weight divided by it, rounded (exact up to float
    rounding, which :func:`onnx_graph.encode_weights` checks).

    Returns:
        ``{layer: {"format", "codes", "scale", "axis", "block", "fake_quant"}}`` in torch layout.
    """
    import ml_dtypes
    import numpy as np
    import torch

    layers = dict(model.named_modules())
    out = {}
    for p in plans:
        if p.weight == "fp16":
            continue
        m = layers[p.name]
        wq = m.weight_quantizer
        with torch.no_grad():
            fq = wq(m.weight.detach()).float()
        amax = wq.amax.detach().float().cpu().numpy()
        w = fq.cpu().numpy()
        if p.weight == "int8":
            scale, axis, block = amax.reshape(-1) / 127.0, 0, None
            shape = [1] * w.ndim
            shape[0] = -1
            s_full = scale.reshape(shape)
            lo, hi, dtype = -128, 127, np.int8
        elif p.weight == "fp8":
            scale, axis, block = np.asarray(amax.reshape(-1)[0] / 448.0, np.float32), None, None
            s_full = scale
        else:  # int4, blocks along the input axis (1 in torch layout for both kinds)
            block, axis = p.block, 1
            nb = w.shape[1] // block
            scale = amax.reshape((w.shape[0], nb, *w.shape[2:])) / 7.0
            s_full = np.repeat(scale, block, axis=1)
            lo, hi, dtype = -8, 7, ml_dtypes.int4
        scale = scale.astype(np.float32)
        safe = np.where(s_full == 0, 1.0, s_full).astype(np.float32)
        if p.weight == "fp8":
            codes = (w / safe).astype(ml_dtypes.float8_e4m3fn)
        else:
            codes = np.clip(np.rint(w / safe), lo, hi).astype(dtype)
        out[p.name] = {"format": p.weight, "codes": codes, "scale": scale, "axis": axis, "block": block,
                       "fake_quant": fq}
    return out


def export_model_copy(model, codecs: dict):
    """A copy of the fake-quant model for export: quantized weights set to their fake-quant values,
    weight quantizers off (the weights are encoded into low-bit initializers after export)."""
    import copy

    import torch

    exp = copy.deepcopy(model)
    layers = dict(exp.named_modules())
    with torch.no_grad():
        for name, c in codecs.items():
            layers[name].weight.copy_(c["fake_quant"])
            layers[name].weight_quantizer.disable()
    return exp


def build_onnx(adapter, model, plans, codecs: dict, opset: int, example: dict, workdir: Path,
               placement: Placement | str = Placement.TENSORRT):
    """Export the fake-quant denoiser and turn it into the compact standard-op ONNX model.

    Returns:
        ``(model_proto, fold_stats, raw_bytes)``; ``raw_bytes`` is the exporter's file before
        encoding (float weights).
    """
    import onnx

    raw = Path(workdir) / "raw.onnx"
    torch_to_onnx(adapter, export_model_copy(model, codecs), raw, min(opset, _TORCHSCRIPT_MAX_OPSET), example)
    graph = onnx.load(str(raw))
    raw_bytes = onnx_file_bytes(raw)
    raw.unlink()
    data = raw.with_name(raw.name + ".data")
    if data.exists():
        data.unlink()
    onnx_graph.constants_to_initializers(graph)
    fp8_rewritten = onnx_graph.rewrite_trt_fp8(graph)
    fold = onnx_graph.encode_weights(graph, codecs)
    fold["trt_fp8_rewritten"] = fp8_rewritten
    fold["fp16_storage"] = onnx_graph.store_float_weights_fp16(graph)
    spec = PLACEMENTS[Placement(placement)]
    if spec.unsigned_activations:
        fold["activations_to_uint8"] = onnx_graph.activations_to_uint8(graph)
    if spec.fold_attention_bias:
        fold["zero_attention_bias_folded"] = onnx_graph.fold_zero_attention_bias(graph)
    fold["tensor_name_bytes_saved"] = onnx_graph.shorten_tensor_names(graph)
    fold["node_name_bytes_saved"] = onnx_graph.shorten_plumbing_node_names(graph)
    fold["scalar_initializers_shared"] = onnx_graph.dedupe_scalar_initializers(graph)
    if opset > _TORCHSCRIPT_MAX_OPSET:
        # 20 -> 21 only widens the types of Q/DQ, Cast, Reshape, ...: no op changes meaning.
        for o in graph.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = opset
    graph.producer_name = "adm-export"
    if graph.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(graph)
    fold["float_copies_of_quantized_weights"] = onnx_graph.float_copies_of_quantized_weights(graph)
    if fold["float_copies_of_quantized_weights"]:
        raise RuntimeError(f"float copies of quantized weights left: {fold['float_copies_of_quantized_weights'][:5]}")
    return graph, fold, raw_bytes


def export_opset(cfg_opset: int, plans, codecs: dict) -> int:
    """The opset a plan needs: the configured one, or 21 when FP8 or INT4 Q/DQ are present."""
    lowbit = any(c["format"] in ("fp8", "int4") for c in codecs.values()) or any(
        p.activation == "fp8" for p in plans)
    return max(cfg_opset, STANDARD_LOWBIT_OPSET) if lowbit else cfg_opset


@exact_float32()  # parity compares against FP32 ONNX Runtime: no TF32 in the torch side
def export_onnx(cfg: ExportConfig, quantized: str | Path, out: str | Path, calibration: str | Path,
                force: bool = False, adapter=None) -> dict:
    """Run the ``export`` stage.

    Args:
        cfg: Export settings.
        quantized: Folder written by the ``quantize`` stage.
        out: Output folder for ``unet.onnx`` and its manifest.
        calibration: Calibration cache (its points are the parity inputs).
        force: Overwrite ``out``.
        adapter: An already loaded model adapter; loaded from the manifest's model id otherwise.

    Returns:
        The ONNX artifact's manifest (sizes, Q/DQ report, parity).
    """
    from adm_export.engines.onnxruntime import OrtRunner, make_session
    from adm_export.models import load_model

    # 1. The quantized model and the inputs to check it on.
    q_manifest = read_manifest(quantized, "quantized", "--quantized")
    if adapter is None:
        adapter = load_model(q_manifest["model"]["id"], cfg.device)
    model, _ = load_quantized(quantized, adapter)
    # The placement is fixed at quantize time (its extra quantizers are calibrated there).
    q_placement = q_manifest.get("placement", Placement.TENSORRT.value)
    if cfg.placement is not None and q_placement != cfg.placement.value:
        raise InvalidInputError(
            f"--placement {cfg.placement.value!r} does not match the quantized model's placement {q_placement!r} "
            f"(its extra quantizers are calibrated at quantize time); re-run quantize with "
            f"--placement {cfg.placement.value}, or export without --placement")
    placement = Placement(q_placement)
    plans = [LayerPlan(**{**d, "candidates": tuple(d.get("candidates", ()))}) for d in q_manifest.get("layers", [])]
    if not plans:  # an artifact from before per-layer plans: every enabled weight quantizer is INT8
        plans = _int8_plans_from_model(model)
    cache = load_cache(calibration, adapter.identity())
    points = parity_points(cache, cfg.parity_points)
    codecs = weight_codecs(model, plans)
    opset = export_opset(cfg.opset, plans, codecs)

    with atomic_dir(out, force=force) as tmp:
        # 2. Export (weights = their fake-quant values, activation Q/DQ from ModelOpt), then store
        #    each quantized weight as low-bit codes feeding DequantizeLinear.
        graph, fold, raw_bytes = build_onnx(adapter, model, plans, codecs, opset, to_module(points[0], model), tmp,
                                             placement)
        path = tmp / ONNX_FILE
        export_bytes = save_onnx(graph, path)
        report = onnx_graph.qdq_report(graph)
        report["opset"] = opset
        del graph, codecs
        import torch

        # 3. Parity: ONNX Runtime vs the torch fake-quant model, beside the quantization error and
        #    the rounding floor (see check_parity).
        parity = check_parity(adapter, model, parity_session(path), points, path)
        if any(c == "int4" for c in report["quantized_weight_dtypes"]):
            # What the engine's default session does differently: MatMulNBits quantizes INT4
            # MatMuls' activations to INT8 per block at run time (accuracy level 4).
            runner = OrtRunner(make_session(path))
            with classic_attention(model):
                gaps = [rel_l2(torch.from_numpy(runner(p)), run_denoiser(adapter, model, p)) for p in points]
            parity["onnxruntime_default_session_gap_mean"] = sum(gaps) / len(gaps)
        params = adapter.denoiser_parameter_count()
        sizes = {
            "unet_fp32_bytes": params * 4,
            "unet_fp16_bytes": params * 2,
            "unet_export_bytes": export_bytes,
            "unet_export_unfolded_bytes": raw_bytes,
            "reduction_vs_fp32": round(export_bytes / (params * 4), 4),
            "reduction_vs_fp16": round(export_bytes / (params * 2), 4),
        }
        budget = (q_manifest.get("config") or {}).get("size_budget")
        if budget is not None:
            sizes["size_budget"] = budget
            sizes["within_budget"] = export_bytes <= budget * params * 4
            if not sizes["within_budget"]:
                logger.warning("exported U-Net is %.2f%% of FP32, over --size-budget %.2f%%", 100 * export_bytes /
                               (params * 4), 100 * budget)
        logger.info("exported %s: %.2f MB (%.1f%% of FP32), %d quantized ops; parity max %.2e, "
                    "rounding floor max %.2e, quantization error max %.2e; stage by stage %.2e (%s)", ONNX_FILE,
                    export_bytes / 1e6, 100 * sizes["reduction_vs_fp32"], report["quantized_ops"],
                    parity["onnx_vs_torch_max"], parity["rounding_floor_max"], parity["quant_error_max"],
                    parity["teacher_forced"]["forced_max"], "passed" if parity["passed"] else "FAILED")
        manifest = write_manifest(
            tmp, STAGE, adapter.identity(), to_dict(cfg),
            inputs={"quantized": manifest_digest(q_manifest)},
            extra={
                "spec": q_manifest["spec"],
                "precision": q_manifest["config"]["precision"],
                "placement": placement.value,
                "placement_choice": q_manifest.get("placement_choice"),
                "opset": opset,
                "sizes": sizes,
                "fold": fold,
                "qdq": report,
                "parity": parity,
            },
        )
    return manifest


def _int8_plans_from_model(model) -> list:
    """Plans for a quantized artifact written before per-layer plans existed (INT8 only)."""
    from adm_export.formats import policy as pol

    plans = []
    for name, kind, module in pol.compute_layers(model):
        wq = getattr(module, "weight_quantizer", None)
        fmt = pol.Format.INT8 if wq is not None and getattr(wq, "is_enabled", False) else pol.Format.FP16
        plans.append(pol.realize(name, kind, module, fmt, False))
    return plans
