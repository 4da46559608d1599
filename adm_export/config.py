"""Configuration as frozen dataclasses, one per stage, and the enums that feed ``click.Choice``.

The CLI builds these objects and passes them to one library function; library functions never
take long lists of keyword arguments. Every config is JSON-serialisable through
:func:`to_dict` so that it can be written into an artifact manifest.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from pathlib import Path
from typing import Any

from adm_export.devices import check_device
from adm_export.errors import InvalidInputError
from adm_export.formats.capabilities import Placement, parse_target  # noqa: F401  (Placement: re-exported)
from adm_export.formats.recipes import Precision

DEFAULT_MODEL = "reference-audioldm"
#: Audio length (seconds) of calibration runs, eval clips, generated clips and export examples when
#: not given: the reference model's training clip length (256 mel frames at 100 frames per second).
DEFAULT_AUDIO_SECONDS = 2.56


class EngineBackend(str, enum.Enum):
    """Engine backends (``--engine``)."""

    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"
    NONE = "none"


class SelectMethod(str, enum.Enum):
    """How calibration points (prompt, step) are chosen from the recorded trajectories."""

    UNIFORM = "uniform"
    RANDOM = "random"
    NORMAL = "normal"
    ALL = "all"
    ACTIVATION = "activation"


def _positive(flag: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInputError(f"invalid {flag} {value!r}: must be a positive integer")


def check_finite(cfg: Any, flags: dict[str, str]) -> None:
    """Refuse NaN and infinity in every float field of a config (NaN passes every ``<``/``>`` check).

    Args:
        cfg: A config dataclass.
        flags: Field name -> the CLI flag that sets it (for the message); other fields are named as is.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise InvalidInputError(f"invalid {flags.get(f.name, f.name)} {v!r}: must be a finite number")


def parse_enum(enum_cls: type[enum.Enum], value: Any, flag: str) -> enum.Enum:
    """Convert ``value`` to ``enum_cls`` or raise a one-line user error naming the flag."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum_cls)
        raise InvalidInputError(f"invalid {flag} {value!r}: choose one of {choices}") from None


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Settings of the ``calibrate`` stage.

    Attributes:
        model: Hub id, local diffusers folder, or embedded name.
        captions_file: One caption per line; ``None``: the model's own (the reference model's
            in-domain captions) or else the built-in captions (``models.model_defaults``).
        num_prompts: Number of prompts the sampler is run on.
        steps: Sampler steps per prompt (DDIM).
        points: Number of calibration points (prompt, step) kept in the cache.
        select: How the points are selected.
        audio_seconds: Length of the generated audio; sets the latent length.
        guidance_scale: Classifier-free guidance scale, as the pipeline uses it.
        seed: Seed of prompts, initial noise and selection.
        device: ``cpu`` or ``cuda``.
        augment: Expand the captions by coverage-driven augmentation (``False``: captions as given).
        stats_quantiles: Quantiles of ``|x|`` reported per layer in the cache manifest's
            activation-statistics summary (read from the recorded histograms).
    """

    model: str = DEFAULT_MODEL
    captions_file: str | None = None
    num_prompts: int = 8
    steps: int = 10
    points: int = 16
    select: SelectMethod = SelectMethod.ACTIVATION
    audio_seconds: float = DEFAULT_AUDIO_SECONDS
    guidance_scale: float = 2.5
    seed: int = 0
    device: str = "cpu"
    augment: bool = True
    stats_quantiles: tuple[float, ...] = (0.5, 0.99, 0.999, 0.9999)

    def __post_init__(self):
        object.__setattr__(self, "select", parse_enum(SelectMethod, self.select, "--select"))
        object.__setattr__(self, "stats_quantiles", tuple(float(q) for q in self.stats_quantiles))
        check_finite(self, {"audio_seconds": "--seconds", "guidance_scale": "--guidance-scale"})
        if not all(0.0 < q < 1.0 for q in self.stats_quantiles):
            raise InvalidInputError(f"invalid stats_quantiles {self.stats_quantiles!r}: each must be in (0, 1)")
        _positive("--num-prompts", self.num_prompts)
        _positive("--steps", self.steps)
        _positive("--points", self.points)
        if self.audio_seconds <= 0:
            raise InvalidInputError(f"invalid --seconds {self.audio_seconds!r}: must be > 0")
        if self.guidance_scale < 0:
            raise InvalidInputError(f"invalid --guidance-scale {self.guidance_scale!r}: must be >= 0")
        check_device(self.device, available=False)


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Settings of the ``quantize`` stage.

    Attributes:
        precision: Quantization preset.
        size_budget: For ``mixed``: exported U-Net weight bytes at most this fraction of FP32.
        device: ``cpu`` or ``cuda``.
        policy: A user policy JSON file (``--policy``; see ``formats.policy``); replaces the preset's.
        target: Serving target whose capabilities the formats are checked against (``--target``).
        allow_adjust: Change formats the target cannot run instead of refusing (``--allow-adjust``).
        placement: Q/DQ placement (``--placement``); ``None``: the one ``target`` needs
            (``formats.capabilities.placement_for``).
        sensitivity_points: Calibration points the ``mixed`` sensitivity search measures on.
        sensitivity_granularity: ``layer`` (every conv/linear layer its own format) or ``block``
            (one format per U-Net block; ~6x fewer sensitivity trials).
        trajectory_check: Items per format whose sensitivity is also measured on a short sampler
            run (final-latent error); 0 turns the check off.
        sensitivity_frames: Latent frames the sensitivity trials run on (the first frames of
            each point; quantizer ranges still come from the full points); 0: full length.
    """

    precision: Precision = Precision.INT8
    size_budget: float | None = None
    device: str = "cpu"
    policy: str | None = None
    target: str = "onnxruntime-cpu"
    allow_adjust: bool = False
    placement: Placement | None = None
    sensitivity_points: int = 4
    sensitivity_granularity: str = "layer"
    trajectory_check: int = 2
    sensitivity_frames: int = 64

    def __post_init__(self):
        object.__setattr__(self, "precision", parse_enum(Precision, self.precision, "--precision"))
        if self.placement is not None:
            object.__setattr__(self, "placement", parse_enum(Placement, self.placement, "--placement"))
        check_finite(self, {"size_budget": "--size-budget"})
        if self.size_budget is not None and not 0 < self.size_budget <= 1:
            raise InvalidInputError(
                f"invalid --size-budget {self.size_budget!r}: give a fraction of the FP32 size in (0, 1]"
            )
        if self.precision == Precision.MIXED and self.size_budget is None:
            raise InvalidInputError("--precision mixed needs --size-budget F (fraction of the FP32 size, e.g. 0.2)")
        parse_target(self.target)
        _positive("--sensitivity-points", self.sensitivity_points)
        if self.sensitivity_granularity not in ("layer", "block"):
            raise InvalidInputError(
                f"invalid --sensitivity-granularity {self.sensitivity_granularity!r}: use 'layer' or 'block'")
        if self.sensitivity_frames < 0:
            raise InvalidInputError(f"invalid --sensitivity-frames {self.sensitivity_frames!r}: must be >= 0 (0: full)")
        if self.trajectory_check < 0:
            raise InvalidInputError(f"invalid --trajectory-check {self.trajectory_check!r}: must be >= 0 (0: off)")
        check_device(self.device, available=False)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Settings of the ``export`` stage.

    Attributes:
        opset: ONNX opset (INT8 Q/DQ needs >= 13; per-channel weights with axis >= 13).
        placement: Q/DQ placement; ``None``: the quantized model's (chosen at quantize time).
        parity_points: Number of cached inputs on which ONNX Runtime is compared with torch.
        device: Where torch traces the quantized model and runs its side of the parity check
            (``cpu`` or ``cuda``; ONNX Runtime's side runs on the CPU either way).
    """

    opset: int = 17
    placement: Placement | None = None
    parity_points: int = 4
    device: str = "cpu"

    def __post_init__(self):
        if self.placement is not None:
            object.__setattr__(self, "placement", parse_enum(Placement, self.placement, "--placement"))
        if self.opset < 13:
            raise InvalidInputError(f"invalid --opset {self.opset}: Q/DQ export needs opset >= 13")
        _positive("--parity-points", self.parity_points)
        check_device(self.device, available=False)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Settings of the ``engine`` stage.

    Attributes:
        backend: Which engine to build.
        device: Where the ONNX Runtime engine runs: ``cpu`` serves the export as it is; ``cuda``
            builds the fused FP16 CUDA engine (``engines.onnxruntime.cuda``).
        threads: ONNX Runtime intra-op threads; 0 lets it choose.
        cuda_fusions: ``cuda``: run ONNX Runtime's diffusion optimizer (``False``: the same FP16
            graph unfused, a fallback when the fused engine fails its parity check).
        parity_tolerance: ``cuda``: largest relative L2 of the served graph to its FP32 reference.
    """

    backend: EngineBackend = EngineBackend.ONNXRUNTIME
    device: str = "cpu"
    threads: int = 0
    cuda_fusions: bool = True
    parity_tolerance: float = 1e-2

    def __post_init__(self):
        object.__setattr__(self, "backend", parse_enum(EngineBackend, self.backend, "--engine"))
        check_device(self.device, available=False)
        if not isinstance(self.threads, int) or self.threads < 0:
            raise InvalidInputError(f"invalid --threads {self.threads!r}: must be >= 0 (0: all cores)")
        if not 0 < self.parity_tolerance < 1:
            raise InvalidInputError(f"invalid --parity-tolerance {self.parity_tolerance!r}: must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of the ``eval`` stage.

    Attributes:
        num_clips: Clips generated by the baseline and by the engine (same prompts and seeds).
        steps: Sampler steps per clip.
        audio_seconds: Clip length.
        guidance_scale: Classifier-free guidance scale.
        max_fd_increase: Gate threshold in percent on ``100 * (FD(engine, ref) - FD(baseline, ref))
            / FD(baseline, ref)`` (see ``eval.scoring``); ``None`` disables this check.
        max_drift: Gate threshold in percent on the paired drift: mean squared embedding distance
            of each engine clip to its own baseline clip over twice the baseline set's total
            variance (see ``eval.fd.paired_drift_pct``); ``None`` disables this check.
        embedder: Embedder name (``logmel`` is weight-free and always available); ``None``: the
            model's (``reference-clap`` for the reference model, else ``logmel``).
        embedder_checkpoint: Weights file or folder of a pretrained embedder.
        captions_file: Captions the eval prompts cycle through; ``None``: the model's own or else
            the built-in captions.
        reference_dir: Optional folder of reference WAV files for ``fd_baseline_vs_ref``.
        seed: Seed of prompts and initial noise.
        device: ``cpu`` or ``cuda``.
        fd_inf: Also extrapolate every FD to infinitely many clips (FD-inf, 1/N fit).
        n_boot: Bootstrap replicates behind every interval.
        clap_checkpoint: Local ``ClapModel`` folder (with tokenizer) for the CLAP score.
    """

    num_clips: int = 8
    steps: int = 10
    audio_seconds: float = DEFAULT_AUDIO_SECONDS
    guidance_scale: float = 2.5
    max_fd_increase: float | None = 50.0
    embedder: str | None = None
    embedder_checkpoint: str | None = None
    reference_dir: str | None = None
    seed: int = 1234
    device: str = "cpu"
    fd_inf: bool = False
    n_boot: int = 200
    clap_checkpoint: str | None = None
    max_drift: float | None = 25.0
    captions_file: str | None = None

    def __post_init__(self):
        check_finite(self, {"audio_seconds": "--eval-seconds", "guidance_scale": "--guidance-scale",
                            "max_fd_increase": "--max-fd-increase", "max_drift": "--max-drift"})
        _positive("--bootstrap", self.n_boot)
        if self.num_clips < 2:
            raise InvalidInputError(f"invalid --num-clips {self.num_clips}: FD needs at least 2 clips")
        _positive("--eval-steps", self.steps)
        if self.audio_seconds <= 0:
            raise InvalidInputError(f"invalid --eval-seconds {self.audio_seconds!r}: must be > 0")
        if self.guidance_scale < 0:
            raise InvalidInputError(f"invalid --guidance-scale {self.guidance_scale!r}: must be >= 0")
        if self.max_fd_increase is not None and self.max_fd_increase < 0:
            raise InvalidInputError(f"invalid --max-fd-increase {self.max_fd_increase}: must be >= 0")
        if self.max_drift is not None and self.max_drift < 0:
            raise InvalidInputError(f"invalid --max-drift {self.max_drift}: must be >= 0")
        check_device(self.device, available=False)


@dataclasses.dataclass(frozen=True)
class FullPrecisionExportConfig:
    """Settings of the full-precision export (``export-baseline``).

    Attributes:
        model: Model id (used when no adapter is passed).
        fp16: Export the denoiser in FP16 (weights, activations, ``sample``/``class_labels`` and
            the output); ``False`` exports FP32.
        opset: ONNX opset.
        device: Where torch traces and the parity check runs (``cuda`` for FP16 on a GPU).
        audio_seconds: Length of the example input (the export keeps batch and frames dynamic).
        parity: Compare ONNX Runtime with torch on one random input.
    """

    model: str = DEFAULT_MODEL
    fp16: bool = True
    opset: int = 17
    device: str = "cpu"
    audio_seconds: float = DEFAULT_AUDIO_SECONDS
    parity: bool = True

    def __post_init__(self):
        check_finite(self, {"audio_seconds": "--seconds"})
        if self.opset < 13:
            raise InvalidInputError(f"invalid --opset {self.opset}: the export needs opset >= 13")
        check_device(self.device, available=False)
        if self.audio_seconds <= 0:
            raise InvalidInputError(f"invalid --seconds {self.audio_seconds!r}: must be > 0")

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"


@dataclasses.dataclass(frozen=True)
class BundleConfig:
    """Settings of ``adm-export bundle``.

    Attributes:
        build_dir: A build folder (its ``engines/``) or an engines folder itself.
        out: The bundle folder to write.
        force: Replace a non-empty ``out``.
        model: Model id to load; ``None``: the engine's own (must match its weight fingerprint).
        max_seconds: Longest clip the runtime accepts by default (memory grows with length; the
            families were trained on ~10 s clips).
        opset: ONNX opset of the exported components.
    """

    build_dir: str
    out: str
    force: bool = False
    model: str | None = None
    max_seconds: float = 30.0
    opset: int = 17

    def __post_init__(self):
        check_finite(self, {"max_seconds": "--max-seconds"})
        if not self.max_seconds > 0:
            raise InvalidInputError(f"invalid --max-seconds {self.max_seconds!r}: must be > 0")
        if self.opset < 14:
            raise InvalidInputError(f"invalid --opset {self.opset}: the components need opset >= 14")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Settings of ``adm-export build``: every stage's config plus the output folder."""

    out: Path
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    quantize: QuantizeConfig = dataclasses.field(default_factory=QuantizeConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    eval: EvalConfig | None = dataclasses.field(default_factory=EvalConfig)
    force: bool = False

    @property
    def model(self) -> str:
        return self.calibration.model


def to_dict(cfg: Any) -> Any:
    """Turn a config (dataclasses, enums, paths, nested) into plain JSON-serialisable data."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg
