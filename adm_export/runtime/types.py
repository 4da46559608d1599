"""Requests and options of the bundle runtime (plain data, no heavy imports)."""

from __future__ import annotations

import dataclasses

from adm_export.devices import check_device
from adm_export.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One clip to generate.

    Attributes:
        prompt: Text prompt.
        seconds: Clip length; the waveform has ``round(seconds * sampling_rate)`` samples.
        steps: Sampler steps.
        guidance_scale: Classifier-free guidance weight; ``<= 1`` turns guidance off (as the
            pipelines do).
        seed: Seed of the clip's noise: its initial latents (and DDPM's step noise) come from
            ``numpy.random.Generator(PCG64(seed))`` alone, so a clip does not depend on its batch.
    """

    prompt: str
    seconds: float = 2.56
    steps: int = 10
    guidance_scale: float = 2.5
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How a :class:`~adm_export.runtime.BundleRuntime` runs.

    Attributes:
        device: ``cpu`` or ``cuda`` (ONNX Runtime's CUDA provider for every component).
        device_id: GPU index.
        threads: ONNX Runtime intra-op threads per session on the CPU; 0 lets it choose.
        cuda_graph: CUDA: replay each U-Net step as a captured CUDA graph (one session per
            (batch, frames) shape, built on first use).
        prefer_nhwc: CUDA: let ONNX Runtime use NHWC convolution kernels in the U-Net.
        max_batch: Requests sampled together at most (the U-Net batch is twice this with guidance).
        max_seconds: Longest clip; ``None``: what the bundle allows (``limits``).
        max_steps: Most sampler steps; ``None``: the scheduler's training steps (1000).
        max_prompt_chars: Longest prompt in characters.
        verify_hashes: Check every file's SHA-256 against the bundle manifest at load.
        text_cache_size: Prompts whose conditioning is kept (LRU); 0 turns the cache off.
    """

    device: str = "cpu"
    device_id: int = 0
    threads: int = 0
    cuda_graph: bool = False
    prefer_nhwc: bool = False
    max_batch: int = 8
    max_seconds: float | None = None
    max_steps: int | None = None
    max_prompt_chars: int = 1000
    verify_hashes: bool = True
    text_cache_size: int = 256

    def __post_init__(self):
        check_device(self.device, flag="device", available=False)
        for name in ("cuda_graph", "prefer_nhwc"):
            if getattr(self, name) and self.device != "cuda":
                raise InvalidInputError(f"{name} needs device='cuda'; drop it to run on the CPU")
        for name in ("threads", "device_id", "text_cache_size"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"invalid {name} {getattr(self, name)!r}: must be >= 0")
        for name in ("max_batch", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"invalid {name} {getattr(self, name)!r}: must be >= 1")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise InvalidInputError(f"invalid max_seconds {self.max_seconds!r}: must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidInputError(f"invalid max_steps {self.max_steps!r}: must be >= 1")

    def ort_options(self, component: str = "unet"):
        """ONNX Runtime session settings for one component (CUDA graphs and NHWC: the U-Net only)."""
        from adm_export.engines.onnxruntime import OrtOptions

        unet = component == "unet"
        return OrtOptions(provider="cuda" if self.device == "cuda" else "cpu", device_id=self.device_id,
                          threads=self.threads, cuda_graph=self.cuda_graph and unet,
                          prefer_nhwc=self.prefer_nhwc and unet)
