"""AudioLDM2 adapter (diffusers ``AudioLDM2Pipeline``).

The U-Net (``AudioLDM2UNet2DConditionModel``) attends to two token streams in every transformer
block: ``encoder_hidden_states``, the 8 "AudioMAE" tokens GPT-2 generates from the projected CLAP
and T5 states, and ``encoder_hidden_states_1``, the FLAN-T5 states with their padding mask
``encoder_attention_mask_1``. The pipeline passes no mask for the GPT-2 stream (its tokens are
all valid). Classifier-free guidance doubles the batch.

What the engine sees, and why it differs slightly from a plain pipeline call:

* The T5 stream is padded to a fixed length (``text_len``, the T5 tokenizer's maximum: 128 for
  the published checkpoints) with a zero mask, so the engine has static shapes. That is exact
  (see :mod:`adm_export.models.conditioning`).
* Each prompt is encoded on its own (T5 tokens at the prompt's own length, as the pipeline does
  for a single prompt). The pipeline pads a batch to its longest prompt, and GPT-2 then sees
  the padding, so a clip would depend on the other prompts of its batch; here it depends only
  on its own prompt and seed.
* With transformers >= 5, ``GPT2Model`` (what the published checkpoints hold) no longer has the
  generation helpers ``AudioLDM2Pipeline.generate_language_model`` calls; the adapter then
  installs an equivalent greedy hidden-state loop on the pipeline (tested against the original
  on ``GPT2LMHeadModel``).
"""

from __future__ import annotations

import logging
import types
from typing import Any, Sequence

from adm_export.errors import InvalidInputError, ModelNotFoundError
from adm_export.models.base import DiffusersUNetAdapter, TensorSpec
from adm_export.models.conditioning import (DEFAULT_TEXT_LEN, TextCondSpec, call_arg, pad_tokens, timestep_rows,
                                            usable_length)

logger = logging.getLogger(__name__)

DEFAULT_GENERATED_TOKENS = 8


def generate_hidden_states(pipeline, inputs_embeds, max_new_tokens: int | None = None, attention_mask=None,
                           **_unused):
    """Greedy hidden-state generation with the pipeline's language model (no KV cache).

    Same result as ``AudioLDM2Pipeline.generate_language_model``: each step runs the model on the
    whole sequence, appends the last position's final hidden state and extends the mask by one.
    Position ids are ``arange`` in both (the cached version continues from the cache length).

    Returns:
        The ``max_new_tokens`` generated states, shape ``(batch, max_new_tokens, hidden)``.
    """
    import torch

    lm = pipeline.language_model
    n = max_new_tokens if max_new_tokens is not None else getattr(lm.config, "max_new_tokens", None)
    n = int(n or DEFAULT_GENERATED_TOKENS)
    mask = attention_mask
    for _ in range(n):
        out = lm(inputs_embeds=inputs_embeds, attention_mask=mask, output_hidden_states=True, return_dict=True)
        inputs_embeds = torch.cat([inputs_embeds, out.hidden_states[-1][:, -1:, :]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
    return inputs_embeds[:, -n:, :]


def ensure_language_model_generation(pipeline) -> bool:
    """Install :func:`generate_hidden_states` where the pipeline's own loop cannot run.

    Returns:
        True if the pipeline's ``generate_language_model`` was replaced.
    """
    if hasattr(pipeline.language_model, "_update_model_kwargs_for_generation"):
        return False
    # An instance attribute shadows the method; object.__setattr__ keeps it out of the
    # pipeline's saved config (DiffusionPipeline.__setattr__ would register it).
    object.__setattr__(pipeline, "generate_language_model", types.MethodType(generate_hidden_states, pipeline))
    logger.debug("AudioLDM2: %s has no generation helpers; using the adapter's hidden-state loop",
                 type(pipeline.language_model).__name__)
    return True


class AudioLDM2Adapter(DiffusersUNetAdapter):
    """Adapter of diffusers' ``AudioLDM2Pipeline`` (AudioLDM2, -large, -music; not the VITS TTS variant)."""

    family = "audioldm2"

    def __init__(self, model_id: str, pipeline: Any, revision: str | None = None):
        super().__init__(model_id, pipeline, revision)
        if type(pipeline.text_encoder_2).__name__ == "VitsModel":
            raise ModelNotFoundError(
                f"--model {model_id!r} is the AudioLDM2 text-to-speech variant (VITS text encoder), which "
                f"adm-export does not support; use a text-to-audio checkpoint such as cvssp/audioldm2"
            )
        ensure_language_model_generation(pipeline)

    # -- the denoiser ---------------------------------------------------------------------------

    @property
    def text_len(self) -> int:
        """Fixed length of the T5 stream in the engine (the T5 tokenizer's maximum)."""
        return usable_length(self.pipeline.tokenizer_2, DEFAULT_TEXT_LEN)

    @property
    def generated_len(self) -> int:
        """Tokens GPT-2 generates: the length of the first stream."""
        cfg = self.pipeline.language_model.config
        return int(getattr(cfg, "max_new_tokens", None) or DEFAULT_GENERATED_TOKENS)

    def stream_dims(self) -> tuple[int, int | None]:
        """Widths of the two cross-attention streams; the second is None if no block attends to it.

        ``cross_attention_dim`` holds one list per block: ``[None, d0, d1]`` means a self-attention
        layer, then cross-attention to stream 0 (width ``d0``), then to stream 1 (``d1``).
        """
        dims = self.pipeline.unet.config.cross_attention_dim
        d0 = d1 = None
        for block in dims if isinstance(dims, (list, tuple)) else [dims]:
            block = list(block) if isinstance(block, (list, tuple)) else [block]
            for i, d in enumerate(block):
                if d is None:
                    continue
                if i <= 1:
                    d0 = d0 or int(d)
                else:
                    d1 = d1 or int(d)
        if d0 is None:
            d0 = int(self.pipeline.language_model.config.hidden_size)
        return d0, d1

    def denoiser_spec(self) -> TextCondSpec:
        cfg = self.pipeline.unet.config
        vocoder = self.pipeline.vocoder.config
        scale = self.pipeline.vae_scale_factor
        hop = self.vocoder_hop()
        mel_bins = vocoder.model_in_dim
        d0, d1 = self.stream_dims()
        inputs = [
            TensorSpec("sample", ("batch", cfg.in_channels, "frames", mel_bins // scale)),
            TensorSpec("timestep", ("batch",)),
            TensorSpec("encoder_hidden_states", ("batch", self.generated_len, d0)),
        ]
        if d1 is not None:
            inputs += [
                TensorSpec("encoder_hidden_states_1", ("batch", self.text_len, d1)),
                TensorSpec("encoder_attention_mask_1", ("batch", self.text_len)),
            ]
        return TextCondSpec(
            inputs=tuple(inputs),
            outputs=(TensorSpec("noise_pred", ("batch", cfg.out_channels, "frames", mel_bins // scale)),),
            latent_frames_per_second=vocoder.sampling_rate / hop / scale,
            frame_multiple=2 ** (len(cfg.block_out_channels) - 1),
        )

    def inputs_from_call(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        sample = call_arg(args, kwargs, "sample", 0)
        out = {
            "sample": sample,
            "timestep": timestep_rows(call_arg(args, kwargs, "timestep", 1), sample),
            "encoder_hidden_states": call_arg(args, kwargs, "encoder_hidden_states", 2),
        }
        mask0 = kwargs.get("encoder_attention_mask")
        if mask0 is not None and not bool((mask0 != 0).all()):
            raise InvalidInputError(
                "AudioLDM2: a padding mask on the GPT-2 stream (encoder_attention_mask) is not supported by "
                "the exported denoiser; the pipeline never passes one"
            )
        if self.stream_dims()[1] is not None:
            states = kwargs.get("encoder_hidden_states_1")
            mask = kwargs.get("encoder_attention_mask_1")
            if mask is None:
                mask = states.new_ones(states.shape[:2])
            out["encoder_hidden_states_1"] = pad_tokens(states, self.text_len)
            out["encoder_attention_mask_1"] = pad_tokens(mask.to(states.dtype), self.text_len)
        return out

    def export_module(self, denoiser=None):
        names = tuple(t.name for t in self.denoiser_spec().inputs)
        from adm_export.models.denoisers import AudioLDM2Denoiser

        return AudioLDM2Denoiser(denoiser if denoiser is not None else self.denoiser, names)


    # -- sampling ---------------------------------------------------------------------------------

    def encode(self, prompt: str, guidance: bool):
        """Encode one prompt exactly as the pipeline does for a batch of one, T5 stream padded.

        Returns:
            ``(t5_states, t5_mask, generated_states)``; with guidance the first row of each is the
            unconditional (empty prompt) one.
        """
        import torch

        pipe = self.pipeline
        with torch.inference_mode():
            states, mask, generated = pipe.encode_prompt(prompt, pipe.device, 1, guidance)
        if states.shape[1] > self.text_len:
            raise InvalidInputError(f"AudioLDM2: prompt {prompt[:60]!r} encodes to {states.shape[1]} T5 tokens, "
                                    f"more than the fixed {self.text_len}")
        return pad_tokens(states, self.text_len), pad_tokens(mask, self.text_len), generated

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, audio_seconds: float,
                 guidance_scale: float) -> list:
        import torch

        pipe = self.pipeline
        guidance = guidance_scale > 1.0
        encoded = [self.encode(p, guidance) for p in prompts]
        cond = slice(1, 2) if guidance else slice(0, 1)
        kwargs = {
            "prompt_embeds": torch.cat([e[0][cond] for e in encoded]),
            "attention_mask": torch.cat([e[1][cond] for e in encoded]),
            "generated_prompt_embeds": torch.cat([e[2][cond] for e in encoded]),
        }
        if guidance:
            kwargs.update(
                negative_prompt_embeds=torch.cat([e[0][:1] for e in encoded]),
                negative_attention_mask=torch.cat([e[1][:1] for e in encoded]),
                negative_generated_prompt_embeds=torch.cat([e[2][:1] for e in encoded]),
            )
        # Initial noise from per-prompt CPU generators: a clip depends only on its prompt and seed.
        shape = self._latent_shape(audio_seconds)
        latents = torch.stack([
            torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(int(s))) for s in seeds
        ]).to(pipe.device)
        with torch.inference_mode():
            out = pipe(
                num_inference_steps=steps,
                audio_length_in_s=audio_seconds,
                guidance_scale=guidance_scale,
                latents=latents,
                output_type="np",
                **kwargs,
            )
        return [a.astype("float32") for a in out.audios]

    def _latent_shape(self, seconds: float) -> tuple[int, ...]:
        """Latent shape (without batch) exactly as ``AudioLDM2Pipeline.__call__`` computes it."""
        mel_bins = self.pipeline.vocoder.config.model_in_dim
        return (self.pipeline.unet.config.in_channels, self.pipeline_latent_frames(seconds),
                mel_bins // self.pipeline.vae_scale_factor)
