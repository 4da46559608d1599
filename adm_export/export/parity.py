"""Teacher-forced parity: ONNX Runtime against the torch fake-quant model, one quantizer at a time.

Why: a quantized network is a discontinuous function of its arithmetic. ONNX Runtime's integer
kernels (QLinearConv with an INT32 bias and a float requantization, MatMulIntegerToFloat) and
torch's fake quant round the same value differently about once in 10^4-10^5 codes (a value within
~1e-7 of a rounding boundary). Each such code is one quantization step off, and every later
quantizer turns the small perturbation into more whole-step flips: on the tiny random-weight
U-Nets, a few dozen one-step flips grow into an output gap at the size of the quantization error
itself (measured on tiny-make-an-audio with the onnxruntime placement: 57 of 881,152 codes one
step off, none more, yet 0.060 end to end). The end-to-end gap then says nothing about the
export, and the float64 "rounding floor" beside it is a single draw of the same lottery (2e-7
when float64 happens to flip no code, 0.03 when it flips one).

So the export's arithmetic is checked stage by stage: ONNX Runtime's session (with every
activation QuantizeLinear's codes as an extra graph output) runs once; the torch model then runs
with each activation quantizer's output replaced by ONNX Runtime's dequantized codes, so each
quantized stage of torch starts from exactly the values ONNX Runtime had. A correct export then
shows (a) codes at most one step apart, rarely (near-ties), and (b) a final output within float
rounding of ONNX Runtime's. A wrong scale, a mis-folded weight or bias, a missing or extra Q/DQ
moves the codes of the next quantizer by many steps or in bulk, or the final output, however
chaotic the network is.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

# A correct export: codes more than one step apart never; one step apart at most this often
# (measured 6e-5 to 9e-5 with ONNX Runtime's integer kernels on the tiny U-Nets); the final output
# within float rounding (measured 2e-7) of ONNX Runtime's when torch is fed its codes.
MAX_ONE_STEP_FRACTION = 1e-3
MAX_FORCED_REL_L2 = 1e-4


def activation_quantizers(model) -> dict[str, list[dict]]:
    """The activation QuantizeLinear nodes of an exported graph, by the torch quantizer they come from.

    Returns:
        ``{quantizer module path: [{"tensor", "scale", "zero_point", "axis", "dequantized"}]}`` in
        graph order. ``tensor`` is the graph tensor to read: the codes for INT8/UINT8 (dequantized
        here, so ONNX Runtime keeps fusing the Q into its integer kernels), the consumer
        DequantizeLinear's output otherwise (FP8: ``dequantized`` True).
    """
    from onnx import numpy_helper

    from adm_export.export.onnx_graph import consumers, module_of

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users = consumers(graph)
    out: dict[str, list[dict]] = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue  # a weight's Q (none after encode_weights) is not an activation
        # ".../to_q/input_quantizer/QuantizeLinear" -> "<layer>.input_quantizer"; the node may keep
        # the exporter's name of another op (".../TRT_FP8QuantizeLinear", rewritten to a standard Q).
        scope = SimpleNamespace(name=node.name.rsplit("/", 1)[0] + "/QuantizeLinear", op_type="QuantizeLinear")
        name = module_of(scope) or node.name
        scale = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
        zp = (numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits
              else np.zeros((), np.uint8))
        entry = {"tensor": node.output[0], "scale": scale, "zero_point": zp,
                 "axis": next((a.i for a in node.attribute if a.name == "axis"), 1), "dequantized": False}
        if zp.dtype not in (np.int8, np.uint8):
            dq = [u for u in users.get(node.output[0], []) if u.op_type == "DequantizeLinear"]
            if len(dq) != 1:
                continue
            entry.update(tensor=dq[0].output[0], dequantized=True)
        out.setdefault(name, []).append(entry)
    return out


def _dequantize(values: np.ndarray, entry: dict) -> np.ndarray:
    if entry["dequantized"]:
        return values.astype(np.float32)
    scale, zp = entry["scale"].astype(np.float32), entry["zero_point"].astype(np.float32)
    if scale.ndim:  # per-axis: broadcast along the quantizer's axis
        shape = [1] * values.ndim
        shape[entry["axis"]] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (values.astype(np.float32) - zp) * scale


def _steps(torch_values: np.ndarray, ort_values: np.ndarray, entry: dict) -> np.ndarray:
    """How many quantization steps apart two dequantized tensors are (float; 0, 1, ... when on the grid)."""
    diff = np.abs(torch_values - ort_values)
    scale = entry["scale"]
    if scale is None:
        return diff
    scale = np.abs(scale.astype(np.float32))
    if scale.ndim:
        shape = [1] * diff.ndim
        shape[entry["axis"]] = -1
        scale = scale.reshape(shape)
    if not entry["dequantized"]:
        return diff / np.where(scale == 0, 1, scale)
    # FP8 E4M3: 3 mantissa bits, spacing 2^(e-3) of the code's binade, 2^-9 below 2^-6.
    code = np.maximum(np.abs(torch_values), np.abs(ort_values)) / np.where(scale == 0, 1, scale)
    spacing = np.where(code >= 2.0 ** -6, 2.0 ** (np.floor(np.log2(np.maximum(code, 2.0 ** -6))) - 3), 2.0 ** -9)
    return diff / (spacing * np.where(scale == 0, 1, scale))


def teacher_forced_parity(adapter, model, onnx_path, points: list[dict], session_factory, attention,
                          served: list | None = None) -> dict[str, Any]:
    """Check an exported graph against the torch fake-quant model quantizer by quantizer.

    Args:
        adapter: The model adapter (its export module and denoiser spec).
        model: The torch fake-quant denoiser (ModelOpt quantizers).
        onnx_path: The exported ONNX file.
        points: Parity inputs (named tensors).
        session_factory: ``onnx.ModelProto -> onnxruntime.InferenceSession`` with the parity
            session's options (:func:`adm_export.export.onnx.parity_session`; passed in, as is
            ``attention``, because that module calls this one).
        attention: ``attention(model)`` -> the context the export traced the model's attention in
            (:func:`adm_export.export.onnx.classic_attention`).
        served: The plain session's outputs on ``points`` (tensors), when known: the instrumented
            session is compared with them (the extra outputs must not change what ONNX Runtime
            computes; measured: bit-identical on the tiny U-Nets).

    Returns:
        ``forced_rel_l2`` (per point: ONNX Runtime vs torch fed ONNX Runtime's codes),
        ``codes``, ``codes_one_step``, ``codes_more_steps`` (totals over the points),
        ``one_step_fraction``, ``worst_quantizers`` (most one-step codes), ``missing`` (torch
        quantizers with no Q in the graph), ``unmatched`` (Q nodes with no torch quantizer), and
        ``instrumented_vs_served_max_abs`` (with ``served``) and ``passed``.
    """
    import onnx
    import torch
    from onnx import helper

    from adm_export.engines.onnxruntime import OrtRunner
    from adm_export.numerics import rel_l2, run_denoiser

    graph = onnx.load(str(onnx_path))
    quantizers = activation_quantizers(graph)
    outputs = {o.name for o in graph.graph.output}
    for entries in quantizers.values():
        for e in entries:
            if e["tensor"] not in outputs:
                graph.graph.output.append(helper.ValueInfoProto(name=e["tensor"]))
                outputs.add(e["tensor"])
    session = session_factory(graph)
    del graph
    runner = OrtRunner(session)
    names = [o.name for o in session.get_outputs()]
    modules = {n: m for n, m in model.named_modules() if n in quantizers}
    others = {n: m for n, m in model.named_modules()
              if n.endswith(("input_quantizer", "output_quantizer")) and n not in quantizers
              and getattr(m, "is_enabled", False)}

    forced, missing, drift = [], set(), []
    counts = {"codes": 0, "one": 0, "more": 0}
    per_quantizer: dict[str, int] = {}
    unused: set[str] = set()
    for p in points:
        feed = {k: v for k, v in p.items() if k in runner.input_types}
        arrays = {}
        for name, value in feed.items():
            arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            arrays[name] = np.ascontiguousarray(arr.astype(runner.input_types[name], copy=False))
        ort = dict(zip(names, session.run(names, arrays)))
        queues = {n: list(entries) for n, entries in quantizers.items()}

        def force(module, inputs, output, name):
            entry = queues[name].pop(0) if queues[name] else None
            if entry is None:
                missing.add(name)  # called more often than the graph quantizes it
                return output
            theirs = _dequantize(ort[entry["tensor"]], entry)
            ours = output.detach().float().cpu().numpy()
            if ours.shape != theirs.shape:
                missing.add(name)
                return output
            steps = _steps(ours, theirs, entry)
            one, more = int(((steps > 0.5) & (steps <= 1.5)).sum()), int((steps > 1.5).sum())
            counts["codes"] += ours.size
            counts["one"] += one
            counts["more"] += more
            per_quantizer[name] = per_quantizer.get(name, 0) + one + more
            return torch.from_numpy(theirs).to(device=output.device, dtype=output.dtype)

        def seen(module, inputs, output, name):
            missing.add(name)

        hooks = [m.register_forward_hook(lambda m, i, o, n=n: force(m, i, o, n)) for n, m in modules.items()]
        hooks += [m.register_forward_hook(lambda m, i, o, n=n: seen(m, i, o, n)) for n, m in others.items()]
        try:
            with attention(model):
                torch_out = run_denoiser(adapter, model, p)
        finally:
            for h in hooks:
                h.remove()
        unused |= {n for n, q in queues.items() if q}
        forced.append(rel_l2(torch.from_numpy(ort[names[0]]), torch_out))
        if served is not None:
            drift.append(float(np.abs(ort[names[0]] - served[len(forced) - 1].numpy()).max()))
    unmatched = sorted(unused | (set(quantizers) - set(modules)))
    fraction = counts["one"] / max(counts["codes"], 1)
    worst = sorted(per_quantizer.items(), key=lambda kv: -kv[1])[:5]
    return {
        "forced_rel_l2": forced,
        "forced_max": max(forced),
        "quantizers": len(modules),
        "codes": counts["codes"],
        "codes_one_step": counts["one"],
        "codes_more_steps": counts["more"],
        "one_step_fraction": fraction,
        "worst_quantizers": [{"quantizer": n, "codes_off": k} for n, k in worst if k],
        # Names of the first few (a systematic mismatch would list every quantizer).
        "missing": sorted(missing)[:10],
        "missing_count": len(missing),
        "unmatched": unmatched[:10],
        "unmatched_count": len(unmatched),
        "instrumented_vs_served_max_abs": max(drift) if drift else None,
        "passed": bool(max(forced) <= MAX_FORCED_REL_L2 and counts["more"] == 0
                       and fraction <= MAX_ONE_STEP_FRACTION and not missing and not unmatched),
    }
