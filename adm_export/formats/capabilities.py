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


class Placement(str, enum.Enum):
    """Where Q/DQ pairs go in the exported graph (``--placement``); each target has its own (see
    :data:`TARGET_PLACEMENT`), and :data:`PLACEMENTS` says what each one adds."""

    TENSORRT = "tensorrt"
    ONNXRUNTIME = "onnxruntime"


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


@dataclasses.dataclass(frozen=True)
class PlacementSpec:
    """What a Q/DQ placement puts in the graph beyond Q/DQ on each quantized layer's input and weight.

    Attributes:
        conv_outputs: Quantize INT8 convolutions' outputs too (DQ -> Conv -> Q).
        unsigned_activations: Store activation Q/DQ as UINT8 (zero point 128): the same values
            as signed symmetric INT8, in the type the target's integer kernels take.
        fold_attention_bias: Drop the exporter's all-zero attention bias (``baddbmm`` with
            ``beta = 0`` traces to ``Add(scores, Mul(zeros, 0))``: two full passes over the
            attention scores that change nothing).
        note: Why, for the report.
    """

    conv_outputs: bool
    unsigned_activations: bool
    fold_attention_bias: bool
    note: str


PLACEMENTS: dict[Placement, PlacementSpec] = {
    Placement.TENSORRT: PlacementSpec(
        conv_outputs=False, unsigned_activations=False, fold_attention_bias=False,
        note="Q/DQ on each quantized layer's input and weight, signed INT8: the pattern TensorRT fuses into INT8 "
             "kernels (and the FP16 CUDA engine dequantizes)"),
    # The attention products (Q·K^T, softmax·V) stay float: with Q/DQ on both inputs ONNX Runtime
    # runs them as MatMulIntegerToFloat, measured no faster than the float MatMul at head dim 32
    # (the score matrix's memory traffic dominates, not the arithmetic), while their Q/DQ and
    # the scaling of the scores added ~25 % to the step (benchmarks/RESULTS.md, CPU section).
    Placement.ONNXRUNTIME: PlacementSpec(
        conv_outputs=True, unsigned_activations=True, fold_attention_bias=True,
        note="ONNX Runtime's CPU provider runs an integer convolution only for DQ -> Conv -> Q with UINT8 "
             "activations (QLinearConv); linear layers run as MatMulIntegerToFloat"),
}

#: The placement each target's kernels need, and why (``--placement`` overrides it).
TARGET_PLACEMENT: dict[Target, tuple[Placement, str]] = {
    Target.TENSORRT: (Placement.TENSORRT, "TensorRT fuses Q/DQ on inputs and weights into its INT8 kernels"),
    Target.TENSORRT_RTX: (Placement.TENSORRT, "TensorRT-RTX fuses Q/DQ on inputs and weights into its INT8 kernels"),
    Target.ORT_CPU: (Placement.ONNXRUNTIME,
                     "ONNX Runtime's CPU provider leaves a convolution in float unless its output is quantized too "
                     "(measured at AudioLDM-S size: TensorRT placement 0.91-1.10x FP32, this one 1.7-2.3x)"),
    Target.ORT_CUDA: (Placement.TENSORRT,
                      "the CUDA engine dequantizes the weights and computes in FP16, so no activation pattern is "
                      "needed; the TensorRT placement keeps the export usable by TensorRT too"),
}


#: Families that need another placement than their target's: (family, target) -> (placement, why).
#: Empty today. Make-An-Audio was here for the CPU target (its onnxruntime-placement export "missed
#: parity": 0.060 end to end against a float64 floor of 2e-7 on tiny-make-an-audio); the cause was the
#: parity check, not the export: ONNX Runtime's integer kernels put 57 of 881,152 codes one step off
#: (near-ties), the chaotic tiny U-Net grew them to 0.060, and the floor was a lucky float64 run that
#: flipped none. Fed ONNX Runtime's codes, torch matches it to 2e-7 (export.parity).
FAMILY_PLACEMENT: dict[tuple[str, Target], tuple[Placement, str]] = {}


#: The serving target of an engine (``--engine``) on a device (``--device``), when ``--target`` is not given.
ENGINE_TARGET: dict[tuple[str, str], Target] = {
    ("onnxruntime", "cpu"): Target.ORT_CPU,
    ("onnxruntime", "cuda"): Target.ORT_CUDA,
    ("none", "cpu"): Target.ORT_CPU,
    ("none", "cuda"): Target.ORT_CUDA,
    ("tensorrt", "cpu"): Target.TENSORRT,
    ("tensorrt", "cuda"): Target.TENSORRT,
    ("tensorrt-rtx", "cpu"): Target.TENSORRT_RTX,
    ("tensorrt-rtx", "cuda"): Target.TENSORRT_RTX,
}


def target_for(engine: str = "onnxruntime", device: str = "cpu") -> Target:
    """The serving target ``--engine`` on ``--device`` means (:data:`ENGINE_TARGET`)."""
    try:
        return ENGINE_TARGET[(str(getattr(engine, "value", engine)), device)]
    except KeyError:
        raise InvalidInputError(f"no serving target for --engine {engine!r} on --device {device!r}; "
                                f"give --target") from None


def parse_target(value) -> Target:
    """``--target`` value -> :class:`Target` (one-line error otherwise)."""
    if isinstance(value, Target):
        return value
    try:
        return Target(value)
    except ValueError:
        raise InvalidInputError(
            f"invalid --target {value!r}: choose one of {', '.join(t.value for t in Target)}") from None


def placement_for(target: Target | str, requested: Placement | str | None = None, family: str | None = None) -> dict:
    """The placement an export for ``target`` gets, and why.

    Args:
        target: Serving target (``--target``).
        requested: ``--placement`` when given: it wins over the target's.
        family: The model's family: :data:`FAMILY_PLACEMENT` can override the target's placement.

    Returns:
        ``{"value", "reason", "source"}`` (``source``: ``--placement`` or ``--target``).

    Raises:
        InvalidInputError: An unknown target or placement.
    """
    target = parse_target(target)
    if requested is not None:
        try:
            placement = Placement(requested)
        except ValueError:
            raise InvalidInputError(f"invalid --placement {requested!r}: choose one of "
                                    f"{', '.join(p.value for p in Placement)}") from None
        default, _ = TARGET_PLACEMENT[target]
        why = "given with --placement" + ("" if placement == default else
                                          f" (--target {target.value} would use {default.value})")
        return {"value": placement.value, "reason": why, "source": "--placement"}
    if (family, target) in FAMILY_PLACEMENT:
        placement, why = FAMILY_PLACEMENT[(family, target)]
        return {"value": placement.value, "reason": f"--target {target.value}, {family} family: {why}",
                "source": "--target"}
    placement, why = TARGET_PLACEMENT[target]
    return {"value": placement.value, "reason": f"--target {target.value}: {why}", "source": "--target"}


def default_target(engine: str, device: str) -> str:
    """The target formats are checked against (and the placement chosen for) when ``--target`` is
    not given: :data:`ENGINE_TARGET` for ``--engine`` on ``--device``."""
    return target_for(engine, device).value


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
