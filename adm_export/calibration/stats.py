"""Cheap per-layer activation statistics recorded while the sampler runs.

For every layer that will be quantized (the inputs of ``nn.Conv2d`` / ``nn.Linear`` modules
outside :data:`adm_export.formats.recipes.HIGH_PRECISION_LAYERS`) a forward pre-hook reduces the
layer's input of one denoiser call to a fixed-size record:

* ``absmax``: the largest ``|x|`` (what ModelOpt's ``max`` calibrator takes the max of);
* ``sumsq``: the sum of ``x**2`` (signal energy, for relative errors);
* ``hist``: a histogram of ``log2 |x|`` on a fixed grid (default 4 bins per octave from 2**-16 to
  2**16: 128 bins; zeros and smaller values fall into the first bin, larger ones into the last).
  Quantiles of ``|x|`` (:meth:`ActivationStats.quantiles`) are read from it to a quarter octave.

One denoiser call is one (prompt, step) pair; with classifier-free guidance it holds both batch
rows (unconditional and conditional), as ModelOpt sees them when it replays the cache.

Memory bound. Full activations are never kept: a record is ``bins + 2`` float32 numbers per
(prompt, step, layer), independent of the latent length, the batch and the layer's width::

    bytes = prompts * steps * layers * (bins + 2) * 4

AudioLDM-S (242 quantized layers) with 64 prompts, 50 steps and 128 bins: 64 * 50 * 242 * 130 * 4
= 403 MB on the host; the device holds one prompt's records at a time (50 * 242 * 130 * 4 = 6.3 MB).
:func:`memory_bytes` computes the bound; the recorder allocates exactly that.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Extra numbers per record in front of the histogram: absmax, sumsq.
_HEAD = 2


@dataclasses.dataclass(frozen=True)
class HistogramGrid:
    """Fixed log2 grid of ``|x|`` shared by every layer (no range has to be known in advance).

    Attributes:
        bins_per_octave: Resolution; bin edges grow by ``2 ** (1 / bins_per_octave)``.
        min_exp: Lower edge of the first bin is ``2 ** min_exp`` (smaller values and zeros go there).
        max_exp: Upper edge of the last bin is ``2 ** max_exp`` (larger values go there too).
    """

    bins_per_octave: int = 4
    min_exp: int = -16
    max_exp: int = 16

    @property
    def bins(self) -> int:
        return (self.max_exp - self.min_exp) * self.bins_per_octave

    def edges(self) -> np.ndarray:
        """``bins + 1`` bin edges (float64)."""
        return np.exp2(self.min_exp + np.arange(self.bins + 1) / self.bins_per_octave)

    def centers(self) -> np.ndarray:
        """Representative value of each bin: the geometric middle of its edges (float64)."""
        return np.exp2(self.min_exp + (np.arange(self.bins) + 0.5) / self.bins_per_octave)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "bins": self.bins}


def memory_bytes(prompts: int, steps: int, layers: int, grid: HistogramGrid = HistogramGrid()) -> int:
    """Host memory of the statistics of a run: ``prompts * steps * layers * (bins + 2) * 4`` bytes."""
    return prompts * steps * layers * (grid.bins + _HEAD) * 4


def quantized_layers(denoiser) -> list[str]:
    """Names of the conv / linear modules whose inputs the quantize stage quantizes.

    A module is excluded when its input quantizer name (``<module>.input_quantizer``) matches a
    pattern of :data:`adm_export.formats.recipes.HIGH_PRECISION_LAYERS`, as ModelOpt matches it.
    """
    import torch

    from adm_export.formats.recipes import HIGH_PRECISION_LAYERS

    names = []
    for name, module in denoiser.named_modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        qname = f"{name}.input_quantizer"
        if any(fnmatch.fnmatchcase(qname, pattern) for pattern, _ in HIGH_PRECISION_LAYERS):
            continue
        names.append(name)
    return names


@dataclasses.dataclass
class ActivationStats:
    """Recorded statistics of a sampler run.

    Attributes:
        layers: Quantized layer names (module paths in the denoiser).
        grid: The histogram grid.
        absmax: ``(prompts, steps, layers)`` float32, largest ``|x|`` of each layer input.
        sumsq: ``(prompts, steps, layers)`` float32, sum of ``x**2``.
        hist: ``(prompts, steps, layers, bins)`` float32 counts of ``|x|`` per log2 bin.
        recorded: ``(prompts, steps)`` bool, which denoiser calls were seen.
    """

    layers: list[str]
    grid: HistogramGrid
    absmax: np.ndarray
    sumsq: np.ndarray
    hist: np.ndarray
    recorded: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(prompts, steps, layers)``."""
        return tuple(self.absmax.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return int(self.absmax.nbytes + self.sumsq.nbytes + self.hist.nbytes + self.recorded.nbytes)

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``absmax``, ``sumsq`` and ``hist`` with (prompt, step) flattened into one point axis."""
        p, s, n = self.shape
        return (self.absmax.reshape(p * s, n), self.sumsq.reshape(p * s, n),
                self.hist.reshape(p * s, n, self.grid.bins))

    def quantiles(self, qs: Sequence[float], points: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
        """Quantiles of ``|x|`` per layer, pooled over ``points`` (all when ``None``).

        Read from the histogram: the upper edge of the bin where the cumulative count reaches
        ``q`` (so accurate to one bin, a quarter octave by default), capped by the exact absmax.

        Returns:
            ``(layers, len(qs))`` float64.
        """
        if points is None:
            h = self.hist.sum(axis=(0, 1), dtype=np.float64)
            amax = self.absmax.max(axis=(0, 1))
        else:
            idx = tuple(np.array(points).T)
            h = self.hist[idx].sum(axis=0, dtype=np.float64)
            amax = self.absmax[idx].max(axis=0)
        cdf = np.cumsum(h, axis=1)
        cdf /= np.maximum(cdf[:, -1:], 1.0)
        upper = self.grid.edges()[1:]
        out = np.empty((len(self.layers), len(qs)))
        for j, q in enumerate(qs):
            b = np.minimum((cdf < q).sum(axis=1), self.grid.bins - 1)
            out[:, j] = np.minimum(upper[b], amax)
        return out


class StatsRecorder:
    """Forward pre-hooks that reduce each quantized layer's input to a fixed-size record.

    Use as a context manager around the sampler runs and call :meth:`at` before every denoiser
    call (``adapter.record_denoiser_calls`` does it in ``calibration.latents``)::

        rec = StatsRecorder(adapter.denoiser, num_prompts, steps)
        with rec:
            ...  # rec.at(prompt, step) before each denoiser call
        stats = rec.result()

    The records of the current prompt live on the layers' device and are copied to the host
    (once) when the prompt changes, so a GPU run synchronises once per prompt, not per layer.
    A layer called twice in one denoiser call (not the case in diffusers' U-Nets) is merged:
    max of absmax, sums of the rest.
    """

    def __init__(self, denoiser, num_prompts: int, steps: int, grid: HistogramGrid = HistogramGrid(),
                 layers: Sequence[str] | None = None):
        self.denoiser = denoiser
        self.grid = grid
        self.layers = list(layers) if layers is not None else quantized_layers(denoiser)
        self.num_prompts = num_prompts
        self.steps = steps
        n = len(self.layers)
        logger.info("activation statistics: %d layers x %d prompts x %d steps, %.1f MB host memory",
                    n, num_prompts, steps, memory_bytes(num_prompts, steps, n, grid) / 1e6)
        self._absmax = np.zeros((num_prompts, steps, n), dtype=np.float32)
        self._sumsq = np.zeros((num_prompts, steps, n), dtype=np.float32)
        self._hist = np.zeros((num_prompts, steps, n, grid.bins), dtype=np.float32)
        self._recorded = np.zeros((num_prompts, steps), dtype=bool)
        self._buf = None  # (steps, layers, bins + 2) on the device of the first hooked input
        self._prompt: int | None = None
        self._step = 0
        self._handles: list[Any] = []

    # -- hooks -----------------------------------------------------------------------------------
    def __enter__(self) -> "StatsRecorder":
        modules = dict(self.denoiser.named_modules())
        for i, name in enumerate(self.layers):
            self._handles.append(modules[name].register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._flush()

    def at(self, prompt: int, step: int) -> None:
        """Direct the following layer records to (``prompt``, ``step``)."""
        if not (0 <= prompt < self.num_prompts and 0 <= step < self.steps):
            raise IndexError(f"denoiser call ({prompt}, {step}) outside {self.num_prompts} prompts x "
                             f"{self.steps} steps")
        if prompt != self._prompt:
            self._flush()
            self._prompt = prompt
        self._step = step
        self._recorded[prompt, step] = True

    def _hook(self, index: int):
        grid = self.grid
        lo = float(grid.min_exp * grid.bins_per_octave)
        top = float(grid.bins - 1)

        def hook(module, args):
            import torch

            if self._prompt is None:
                return  # a call outside the sampler (none in calibrate); nothing to attribute it to
            x = args[0].detach()
            if self._buf is None:
                self._buf = torch.zeros((self.steps, len(self.layers), grid.bins + _HEAD),
                                        dtype=torch.float32, device=x.device)
            a = x.abs().float().reshape(-1)
            # log2 bins: floor(log2|x| * bins_per_octave) shifted to start at 0; log2(0) = -inf
            # lands in bin 0 after the clamp.
            b = torch.floor(torch.log2(a) * grid.bins_per_octave).sub_(lo).clamp_(0.0, top).long()
            hist = torch.bincount(b, minlength=grid.bins).float()
            row = self._buf[self._step, index]
            row[0] = torch.maximum(row[0], a.max())
            row[1] += torch.dot(a, a)
            row[_HEAD:] += hist

        return hook

    def flush(self) -> None:
        """Copy the current prompt's records to the host arrays now (else done on the next prompt)."""
        self._flush()

    def _flush(self) -> None:
        if self._prompt is not None and self._buf is not None:
            host = self._buf.cpu().numpy()
            self._absmax[self._prompt] = host[..., 0]
            self._sumsq[self._prompt] = host[..., 1]
            self._hist[self._prompt] = host[..., _HEAD:]
            # A fresh buffer per prompt: the first one was made inside the sampler's
            # inference_mode, and an inference tensor cannot be zeroed outside it.
            self._buf = None

    # -- result ----------------------------------------------------------------------------------
    def result(self) -> ActivationStats:
        """The recorded statistics (the recorder's arrays, no copy)."""
        return ActivationStats(
            layers=list(self.layers),
            grid=self.grid,
            absmax=self._absmax,
            sumsq=self._sumsq,
            hist=self._hist,
            recorded=self._recorded,
        )
