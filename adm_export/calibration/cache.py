"""The versioned calibration cache: selected denoiser inputs in safetensors plus a manifest.

Layout of a cache folder::

    points.safetensors   one tensor per denoiser input (rows of all points, in point order),
                         plus prompt_index and step_index (one entry per point)
    manifest.json        model identity, config, prompt set and coverage, selection summary

A *point* is one denoiser call of the sampler for one prompt at one step: with classifier-free
guidance it has two rows (unconditional, conditional), exactly as the pipeline calls the U-Net, so
quantization replays the real input distribution, CFG included.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

from adm_export.artifacts import check_same_model, read_manifest

POINTS_FILE = "points.safetensors"
STAGE = "calibration"


@dataclasses.dataclass
class CalibrationCache:
    """A loaded calibration cache.

    Attributes:
        inputs: Denoiser input name -> tensor of all rows (points x rows_per_point).
        prompt_index: Prompt of each point.
        step_index: Sampler step of each point.
        rows_per_point: Rows of one denoiser call (2 with classifier-free guidance).
        manifest: The cache's manifest.
        path: The cache folder.
    """

    inputs: dict[str, Any]
    prompt_index: Any
    step_index: Any
    rows_per_point: int
    manifest: dict
    path: Path

    def __len__(self) -> int:
        return int(self.prompt_index.shape[0])

    def point(self, i: int) -> dict[str, Any]:
        """The named denoiser inputs of point ``i`` (one sampler call)."""
        r = self.rows_per_point
        return {k: self.inputs[k][i * r:(i + 1) * r] for k in self.input_names}

    def points(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Iterate over points (each one denoiser call), the first ``limit`` if given."""
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(n):
            yield self.point(i)

    @property
    def input_names(self) -> list[str]:
        """Denoiser input names in call order (safetensors stores them sorted by name)."""
        return [t["name"] for t in self.manifest["spec"]["inputs"]]

    @property
    def prompts(self) -> list[str]:
        return list(self.manifest["prompts"]["prompts"])


def save_points(folder: Path, inputs: dict[str, Any], prompt_index: Any, step_index: Any) -> Path:
    """Write the selected points into ``folder/points.safetensors``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in inputs.items()}
    tensors["prompt_index"] = prompt_index.to("cpu").long().contiguous()
    tensors["step_index"] = step_index.to("cpu").long().contiguous()
    path = folder / POINTS_FILE
    save_file(tensors, str(path))
    return path


def load_cache(folder: str | Path, model: dict | None = None, flag: str = "--calibration") -> CalibrationCache:
    """Load and check a calibration cache.

    Args:
        folder: The cache folder.
        model: Identity of the model it will be used with; a cache made from another model is
            refused.
        flag: CLI flag naming the folder, for error messages.

    Raises:
        ArtifactNotFoundError, ManifestMismatchError: see :func:`adm_export.artifacts.read_manifest`.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = read_manifest(folder, STAGE, flag)
    if model is not None:
        check_same_model(manifest, model, flag)
    tensors = load_file(str(folder / POINTS_FILE))
    prompt_index = tensors.pop("prompt_index")
    step_index = tensors.pop("step_index")
    return CalibrationCache(
        inputs=tensors,
        prompt_index=prompt_index,
        step_index=step_index,
        rows_per_point=int(manifest["selection"]["rows_per_point"]),
        manifest=manifest,
        path=folder,
    )


def parity_indices(size: int, n: int) -> list[int]:
    """Indices of ``n`` points spread evenly over a cache of ``size`` (early and late steps both)."""
    import numpy as np

    return sorted(set(np.linspace(0, size - 1, min(n, size)).round().astype(int).tolist()))


def parity_points(cache, n: int) -> list[dict]:
    """``n`` cached points spread evenly over the cache (:func:`parity_indices`)."""
    return [cache.point(i) for i in parity_indices(len(cache), n)]
