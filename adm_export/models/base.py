"""The model-adapter interface every model family implements.

An adapter owns a loaded pipeline and knows four things about it: which module is the denoiser,
what the denoiser's inputs are (names, shapes, dynamic axes: :class:`DenoiserSpec`), how to turn
the pipeline's own call of the denoiser into those named inputs and back, and how to run the
sampler. Every stage works through this interface only, so a new family is one new adapter.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
from typing import Any, Callable, Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output of the denoiser.

    Attributes:
        name: ONNX / engine binding name.
        shape: Dimensions; an ``int`` is fixed, a ``str`` names a dynamic axis
            (``batch``, ``frames``).
        dtype: numpy dtype name.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class DenoiserSpec:
    """Export spec of a denoiser: ONNX axes and TensorRT profiles both come from here.

    Attributes:
        inputs: Inputs in call order.
        outputs: Outputs.
        latent_frames_per_second: Latent frames per second of audio (AudioLDM: 25).
        frame_multiple: Latent lengths must be a multiple of this (the U-Net downsamples).
        parity_rel_l2: Tolerance of ONNX Runtime vs torch for the *unquantized* graph.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    latent_frames_per_second: float
    frame_multiple: int
    parity_rel_l2: float = 1e-4

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes`` for every named dynamic dimension."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            for t in (*self.inputs, *self.outputs)
            if any(isinstance(d, str) for d in t.shape)
        }

    def concrete_shape(self, name: str, dims: dict[str, int]) -> tuple[int, ...]:
        """Shape of input ``name`` with dynamic axes replaced by ``dims`` (e.g. batch, frames)."""
        spec = next(t for t in (*self.inputs, *self.outputs) if t.name == name)
        return tuple(dims[d] if isinstance(d, str) else d for d in spec.shape)

    def frames_for_seconds(self, seconds: float) -> int:
        """Latent frames for ``seconds`` of audio, rounded up to the frame multiple."""
        frames = int(round(seconds * self.latent_frames_per_second))
        m = self.frame_multiple
        return max(m, -(-frames // m) * m)

    def dummy_inputs(self, batch: int, frames: int, seed: int = 0) -> dict[str, Any]:
        """Random inputs of the given batch and latent length, for export and profiling."""
        import torch

        g = torch.Generator().manual_seed(seed)
        dims = {"batch": batch, "frames": frames}
        out = {}
        for t in self.inputs:
            shape = self.concrete_shape(t.name, dims)
            if t.name == "timestep":
                out[t.name] = torch.randint(1, 1000, shape, generator=g).float()
            else:
                out[t.name] = torch.randn(shape, generator=g)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ModelAdapter(abc.ABC):
    """Base class of the model-family adapters.

    Attributes:
        model_id: What the user passed as ``--model``.
        pipeline: The loaded diffusers pipeline.
        family: Family name (``audioldm``, ...).
    """

    family: str = ""

    def __init__(self, model_id: str, pipeline: Any, revision: str | None = None):
        self.model_id = model_id
        self.pipeline = pipeline
        self.revision = revision
        self._fingerprint: str | None = None

    # -- the denoiser -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def denoiser(self):
        """The denoiser module (a ``torch.nn.Module``) that is quantized and exported."""

    @abc.abstractmethod
    def denoiser_spec(self) -> DenoiserSpec:
        """The denoiser's export spec."""

    @abc.abstractmethod
    def inputs_from_call(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Named denoiser inputs (spec order) from the pipeline's call ``denoiser(*args, **kwargs)``."""

    @abc.abstractmethod
    def export_module(self, denoiser=None):
        """A module whose ``forward`` takes the spec's inputs positionally and returns the output tensor."""

    @abc.abstractmethod
    def wrap_output(self, output):
        """Turn an output tensor into what the pipeline expects from its denoiser."""

    @abc.abstractmethod
    def set_denoiser(self, module) -> None:
        """Replace the pipeline's denoiser by ``module`` (a quantized model or an engine)."""

    # -- sampling -------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def sampling_rate(self) -> int:
        """Sampling rate of the generated audio."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, audio_seconds: float,
                 guidance_scale: float) -> list:
        """Run the sampler: one waveform (numpy float32) per prompt, each from its own seed."""

    def attention_bytes(self, rows: int, seconds: float, value_bytes: int = 4) -> int | None:
        """Bytes of the largest self-attention score matrix one denoiser call holds.

        An exported U-Net computes attention as MatMul -> Softmax -> MatMul (ONNX Runtime, also
        its fused kernels on the CPU), holding ``rows x heads x tokens x tokens`` scores, where
        ``tokens`` is the latent's frames x width at that resolution: quadratic in the audio length,
        and the term that runs a long clip out of memory (600 s of AudioLDM: 115 GB). ``None``
        where the family does not say (then nothing is estimated).

        Args:
            rows: Batch rows of one call (prompts x 2 with classifier-free guidance).
            seconds: Audio length.
            value_bytes: Bytes per score (4: FP32, 2: an FP16 engine).
        """
        return None

    def engine_seconds(self, seconds: float) -> float:
        """The audio length to sample so the latent fits an exported denoiser (>= ``seconds``).

        An exported U-Net (ONNX Runtime, TensorRT) upsamples by fixed factors of 2, so a latent
        length that is not a multiple of the spec's ``frame_multiple`` breaks the skip
        concatenations (torch's U-Net adjusts its upsampling sizes; a traced graph cannot).
        Callers sample this length and cut the waveform back to ``seconds``. Default: unchanged.
        """
        return seconds

    # -- identity -------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of the denoiser's config and weights: artifacts are bound to it."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            config = getattr(self.denoiser, "config", None)
            # Keys starting with "_" (name or path, library version) change on save/load, not the model.
            items = sorted((k, v) for k, v in dict(config or {}).items() if not k.startswith("_"))
            h.update(repr([(k, list(v) if isinstance(v, tuple) else v) for k, v in items]).encode())
            for name, tensor in sorted(self.denoiser.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def identity(self) -> dict:
        """Model identity written into every manifest."""
        return {
            "id": self.model_id,
            "family": self.family,
            "revision": self.revision,
            "fingerprint": self.fingerprint(),
        }

    def denoiser_parameter_count(self) -> int:
        return sum(p.numel() for p in self.denoiser.parameters())

    @contextlib.contextmanager
    def record_denoiser_calls(self, callback: Callable[[dict[str, Any]], None]) -> Iterator[None]:
        """Call ``callback(named_inputs)`` before every denoiser call of the sampler."""

        def hook(module, args, kwargs):
            callback(self.inputs_from_call(args, kwargs))

        handle = self.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def using_denoiser(self, module) -> Iterator[None]:
        """Temporarily swap the denoiser (e.g. to run the quantized model or an engine)."""
        original = self.denoiser
        self.set_denoiser(module)
        try:
            yield
        finally:
            self.set_denoiser(original)


class DiffusersUNetAdapter(ModelAdapter):
    """Shared parts of adapters whose denoiser is ``pipeline.unet`` (a diffusers-style U-Net that
    returns ``UNet2DConditionOutput``) and whose pipeline has a ``vocoder`` with a sampling rate."""

    @property
    def denoiser(self):
        return self.pipeline.unet

    def wrap_output(self, output):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=output)

    def set_denoiser(self, module) -> None:
        # Bypass DiffusionPipeline.__setattr__, which would rewrite the pipeline's saved config
        # to name the engine wrapper's class.
        object.__setattr__(self.pipeline, "unet", module)

    @property
    def sampling_rate(self) -> int:
        return int(self.pipeline.vocoder.config.sampling_rate)

    def vocoder_hop(self) -> int:
        """Audio samples per mel frame: the product of the vocoder's upsampling rates."""
        hop = 1
        for r in self.pipeline.vocoder.config.upsample_rates:
            hop *= r
        return hop

    def engine_seconds(self, seconds: float) -> float:
        frames = self.pipeline_latent_frames(seconds)
        m = self.denoiser_spec().frame_multiple
        if frames % m == 0:
            return seconds
        target = -(-frames // m) * m
        # Half a sample more than the exact length, so the pipeline's int() cannot round down.
        samples = target * self.pipeline.vae_scale_factor * self.vocoder_hop() + 0.5
        return samples / self.sampling_rate

    def attention_bytes(self, rows: int, seconds: float, value_bytes: int = 4) -> int | None:
        # The diffusers U-Nets (UNet2DConditionModel and AudioLDM2's) attend in their CrossAttn
        # blocks; level i runs at 1/2**i of the latent's size. ``attention_head_dim`` is the number
        # of heads there unless ``num_attention_heads`` is set (diffusers' legacy naming).
        cfg = getattr(self.pipeline.unet, "config", None)
        if cfg is None or not hasattr(cfg, "down_block_types"):
            return None
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
        blocks = list(cfg.down_block_types)
        heads = [int(heads)] * len(blocks) if isinstance(heads, int) else [int(h) for h in heads]
        sample = next(t for t in self.denoiser_spec().inputs if t.name == "sample")
        frames = self.denoiser_spec().frames_for_seconds(seconds)
        width = int(sample.shape[-1])
        levels = [i for i, b in enumerate(blocks) if "Attn" in b]
        if "Attn" in str(cfg.get("mid_block_type") or ""):
            levels.append(len(blocks) - 1)
        sizes = [rows * heads[i] * (-(-frames // 2 ** i) * max(1, width // 2 ** i)) ** 2 * value_bytes
                 for i in levels]
        return max(sizes) if sizes else 0

    def pipeline_latent_frames(self, seconds: float) -> int:
        """Latent frames for ``seconds`` exactly as the AudioLDM(2) pipelines compute them: mel frames
        rounded up to a multiple of the VAE factor."""
        import math

        height = int(seconds / (self.vocoder_hop() / self.sampling_rate))
        scale = self.pipeline.vae_scale_factor
        if height % scale:
            height = int(math.ceil(height / scale)) * scale
        return height // scale
