"""Optimization profiles: batch and latent-length ranges of a TensorRT engine, from the denoiser spec."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from adm_export.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class EngineProfile:
    """Batch and latent-length ranges of an engine's optimization profile.

    The spec's named dynamic axes (``batch``, ``frames``) map to these ranges, so ONNX dynamic axes
    and TensorRT profiles both come from one :class:`~adm_export.models.base.DenoiserSpec`.
    """

    min_batch: int
    opt_batch: int
    max_batch: int
    min_frames: int
    opt_frames: int
    max_frames: int

    def __post_init__(self):
        for axis in ("batch", "frames"):
            lo, opt, hi = (getattr(self, f"{k}_{axis}") for k in ("min", "opt", "max"))
            given = f"{axis} range {lo}/{opt}/{hi} (min/opt/max)"
            if not all(isinstance(v, int) and v >= 1 for v in (lo, opt, hi)):
                raise InvalidInputError(f"{given} must be positive integers")
            if not lo <= opt <= hi:
                raise InvalidInputError(f"{given} must satisfy min <= opt <= max")

    @classmethod
    def from_seconds(cls, spec, batch: Sequence[int], seconds: Sequence[float]) -> "EngineProfile":
        """Profile for audio lengths in seconds (rounded up to the spec's frame multiple).

        Args:
            spec: The denoiser spec.
            batch: ``(min, opt, max)`` batch sizes (classifier-free guidance doubles the batch).
            seconds: ``(min, opt, max)`` audio lengths.
        """
        frames = [spec.frames_for_seconds(s) for s in seconds]
        return cls(*batch, *frames)

    def axis_ranges(self) -> dict[str, tuple[int, int, int]]:
        return {
            "batch": (self.min_batch, self.opt_batch, self.max_batch),
            "frames": (self.min_frames, self.opt_frames, self.max_frames),
        }

    def shapes(self, spec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """``{input name: (min_shape, opt_shape, max_shape)}`` for every input of ``spec``.

        Raises:
            InvalidInputError: a frame count is not a multiple of ``spec.frame_multiple``.
        """
        multiple = getattr(spec, "frame_multiple", 1) or 1
        bad = [f for f in self.axis_ranges()["frames"] if f % multiple]
        if bad:
            fixed = [-(-f // multiple) * multiple for f in bad]
            raise InvalidInputError(
                f"latent frame counts {bad} are not multiples of {multiple} (the U-Net downsamples by "
                f"{multiple}); use {fixed}"
            )
        ranges = self.axis_ranges()
        out = {}
        for tensor in spec.inputs:
            unknown = [d for d in tensor.shape if isinstance(d, str) and d not in ranges]
            if unknown:
                raise ValueError(
                    f"input {tensor.name!r} has dynamic axes {unknown}; known: {list(ranges)}"
                )
            out[tensor.name] = tuple(
                tuple(ranges[d][k] if isinstance(d, str) else int(d) for d in tensor.shape)
                for k in range(3)
            )
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

