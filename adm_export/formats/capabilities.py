"""What each serving target can run, per layer format and op kind, and the check of a plan against it.

Levels: ``native`` (a quantized kernel runs it), ``emulated`` (the target dequantizes and computes
in float: correct, smaller file, no speed-up), ``None`` (cannot run it: refused, or changed to
``fallback`` when the user passes ``--allow-adjust``; every change is recorded).

Sources: TensorRT's and ModelOpt's support matrices (INT8 W8A8 conv/GEMM since TRT 9.2; FP8 on
compute capability >= 8.9, conv only in strongly typed networks; INT4 weight-only for
MatMul/Gemm, W4A16, not Conv; INT4 weights with 8-bit activations (W4A8) only in TensorRT-LLM),
ONNX Runtime's operator kernels (QLinearConv/MatMulIntegerToFloat on CPU for INT8 Q/DQ;
MatMulNBits for blocked INT4 weights feeding MatMul; standard FP8/INT4 DequantizeLinear
(opset 19/21) on CPU, dequantized to float), DESIGN.md §5-6.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterable

from adm_export.errors import InvalidInputError
from adm_export.formats.policy import CONV, LINEAR, LayerPlan


class Target(str, enum.Enum):
    """Serving targets (``--target``)."""

    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"
    ORT_CPU = "onnxruntime-cpu"
    ORT_CUDA = "onnxruntime-cuda"


NATIVE, EMULATED = "native", "emulated"


@dataclasses.dataclass(frozen=True)
class Capability:
    """How a target runs one (format, op kind)."""

    level: str | None
    note: str = ""
    fallback: str | None = None  # the format used instead, with --allow-adjust


def _trt(label: str, fp8_note: str) -> dict:
    return {
        ("fp16", CONV): Capability(NATIVE), ("fp16", LINEAR): Capability(NATIVE),
        ("int8", CONV): Capability(NATIVE, "INT8 W8A8 convolution"),
        ("int8", LINEAR): Capability(NATIVE, "INT8 W8A8 GEMM"),
        ("fp8", CONV): Capability(NATIVE, f"FP8 convolution in a strongly typed network; {fp8_note}"),
        ("fp8", LINEAR): Capability(NATIVE, f"FP8 GEMM; {fp8_note}"),
        ("w4a16", LINEAR): Capability(NATIVE, "INT4 weight-only GEMM (W4A16)"),
        ("w4a8", LINEAR): Capability(None, f"{label} runs INT4 weights only weight-only (W4A16); INT4 weights "
                                           "with 8-bit activations are a TensorRT-LLM format", "w4a16"),
        ("w4a8", CONV): Capability(None, f"{label} has no INT4 convolution", "int8"),
        ("w4a16", CONV): Capability(None, f"{label} has no INT4 convolution", "fp16"),
    }


TABLE: dict[Target, dict[tuple[str, str], Capability]] = {
    Target.TENSORRT: _trt("TensorRT", "Hopper (SM90) has FP8 tensor cores"),
    Target.TENSORRT_RTX: _trt("TensorRT-RTX", "needs an Ada/Blackwell GPU (compute capability >= 8.9)"),
    Target.ORT_CPU: {
        ("fp16", CONV): Capability(NATIVE, "FP16 weights are cast to FP32 at load"),
        ("fp16", LINEAR): Capability(NATIVE, "FP16 weights are cast to FP32 at load"),
        ("int8", CONV): Capability(NATIVE, "QLinearConv with --placement onnxruntime (DQ -> Conv -> Q); "
                                           "float Conv after dequantization otherwise"),
        ("int8", LINEAR): Capability(NATIVE, "MatMulIntegerToFloat / QLinearMatMul"),
        ("fp8", CONV): Capability(EMULATED, "FP8 DequantizeLinear to float, float Conv"),
        ("fp8", LINEAR): Capability(EMULATED, "FP8 DequantizeLinear to float, float MatMul"),
        ("w4a8", LINEAR): Capability(EMULATED, "blocked INT4 DequantizeLinear (opset 21) feeding MatMul"),
        ("w4a16", LINEAR): Capability(NATIVE, "blocked INT4 DequantizeLinear -> MatMul fuses to MatMulNBits"),
        ("w4a8", CONV): Capability(EMULATED, "INT4 weights dequantized to float, float Conv"),
        ("w4a16", CONV): Capability(EMULATED, "INT4 weights dequantized to float, float Conv"),
    },
    # The CUDA engine (engines.onnxruntime.cuda) dequantizes every low-bit weight at engine build
    # and computes in FP16 (the CUDA provider has no INT8/FP8 kernels for Q/DQ graphs); activations
    # are not quantized there. The format still sets the weights' grid (and the export's size).
    Target.ORT_CUDA: {
        ("fp16", CONV): Capability(NATIVE), ("fp16", LINEAR): Capability(NATIVE),
        ("int8", CONV): Capability(EMULATED, "INT8 weights dequantized at engine build; FP16 convolution"),
        ("int8", LINEAR): Capability(EMULATED, "INT8 weights dequantized at engine build; FP16 GEMM"),
        ("fp8", CONV): Capability(EMULATED, "FP8 weights dequantized at engine build; FP16 convolution"),
        ("fp8", LINEAR): Capability(EMULATED, "FP8 weights dequantized at engine build; FP16 GEMM"),
        ("w4a16", LINEAR): Capability(EMULATED, "INT4 weights dequantized at engine build; FP16 GEMM"),
        ("w4a8", LINEAR): Capability(EMULATED, "INT4 weights dequantized at engine build; FP16 GEMM"),
        ("w4a8", CONV): Capability(EMULATED, "INT4 weights dequantized at engine build; FP16 convolution"),
        ("w4a16", CONV): Capability(EMULATED, "INT4 weights dequantized at engine build; FP16 convolution"),
    },
}


def parse_target(value) -> Target:
    """``--target`` value -> :class:`Target` (one-line error otherwise)."""
    if isinstance(value, Target):
        return value
    try:
        return Target(value)
    except ValueError:
        raise InvalidInputError(
            f"invalid --target {value!r}: choose one of {', '.join(t.value for t in Target)}") from None


def default_target(engine: str, device: str) -> str:
    """The target formats are checked against when ``--target`` is not given: TensorRT(-RTX) when that
    engine is built, else ONNX Runtime on ``--device``."""
    engine = getattr(engine, "value", engine)
    return engine if engine in (Target.TENSORRT.value, Target.TENSORRT_RTX.value) else f"onnxruntime-{device}"


def capability(target: Target | str, fmt: str, kind: str) -> Capability:
    """How ``target`` runs a layer of ``kind`` in ``fmt``."""
    return TABLE[parse_target(target)].get((fmt, kind), Capability(None, "not in the capability table"))


def allowed_formats(target: Target | str, kind: str, candidates: Iterable[str]) -> list[str]:
    """The candidates ``target`` can run for ``kind`` (what the sensitivity search may choose)."""
    return [c for c in candidates if capability(target, c, kind).level is not None]


def table_rows() -> list[dict]:
    """The whole table as rows (for docs and ``inspect``)."""
    return [{"target": t.value, "format": f, "kind": k, "level": c.level, "note": c.note, "fallback": c.fallback}
            for t, rows in TABLE.items() for (f, k), c in rows.items()]


def check_plans(plans: list[LayerPlan], target: Target | str, allow_adjust: bool, modules: dict,
                int4_convs: bool, flag: str = "--precision") -> tuple[list[LayerPlan], dict]:
    """Check per-layer plans against ``target``; refuse, or adjust when allowed.

    Args:
        plans: Resolved layer plans.
        target: Serving target.
        allow_adjust: Change what the target cannot run to the table's fallback instead of refusing.
        modules: ``{layer name: module}`` (to re-realize an adjusted layer).
        int4_convs: The policy's INT4-convolution switch.
        flag: The option that chose the formats, for the message.

    Returns:
        ``(plans, report)``: the (possibly adjusted) plans and ``{"target", "changes", "emulated"}``.

    Raises:
        InvalidInputError: a layer asks for what the target cannot run and ``allow_adjust`` is off.
    """
    from adm_export.formats.policy import with_format

    target = parse_target(target)
    bad: dict[tuple[str, str], list[str]] = {}
    for p in plans:
        if capability(target, p.format, p.kind).level is None:
            bad.setdefault((p.format, p.kind), []).append(p.name)
    if bad and not allow_adjust:
        (fmt, kind), names = next(iter(bad.items()))
        cap = capability(target, fmt, kind)
        more = sum(len(v) for v in bad.values()) - 1
        raise InvalidInputError(
            f"{flag} asks --target {target.value} for {fmt} on {len(names)} {kind} layer(s) (e.g. {names[0]!r}"
            f"{f', {more} more' if more else ''}), which it cannot run: {cap.note}; choose another "
            f"--precision/--policy or pass --allow-adjust to use {cap.fallback or 'fp16'} there")
    out, changes, emulated = [], [], {}
    for p in plans:
        cap = capability(target, p.format, p.kind)
        if cap.level is None:
            new = with_format(p, cap.fallback or "fp16", modules[p.name], int4_convs,
                              f"adjusted for {target.value}: {cap.note}")
            changes.append({"layer": p.name, "kind": p.kind, "from": p.format, "to": new.format, "reason": cap.note})
            p, cap = new, capability(target, new.format, new.kind)
        if cap.level == EMULATED:
            key = f"{p.format}:{p.kind}"
            emulated.setdefault(key, {"layers": 0, "note": cap.note})
            emulated[key]["layers"] += 1
        out.append(p)
    return out, {"target": target.value, "allow_adjust": allow_adjust, "changes": changes, "emulated": emulated}
