"""Make-An-Audio: its latent-diffusion U-Net, CLAP text encoder, sampler, adapter and checkpoint loader.

Make-An-Audio (Text-to-Audio/Make-An-Audio) is a latent-diffusion model in the original LDM code
base, not in diffusers. This module implements its denoiser, ``UNetModel`` with ``input_blocks`` /
``middle_block`` / ``output_blocks`` of ``TimestepEmbedSequential`` (ResBlocks and
SpatialTransformers with cross-attention to CLAP text states), with the same parameter names, so
the ``model.diffusion_model.*`` tensors of a published checkpoint (``maa1_full.ckpt``) load as they
are. Written from the public code's layout; no code copied.

Published configuration (``configs/text_to_audio/txt2audio_args.yaml``): U-Net 4 -> 4 channels,
320 model channels, ``channel_mult`` (1, 2), attention at both levels, 2 ResBlocks per level, 8
heads, one transformer layer, context 1024 (CLAP). Latent (B, 4, 10, T): 80 mel bins / 8 by
``T`` = 7.8 frames per second (16 kHz, hop 256, VAE factor 8), rounded up to a multiple of 4.
Text: MS-CLAP 2022's text tower (BERT-base + projection to 1024), 77 tokens padded, no mask.
Sampler: DDIM on the LDM schedule (1000 steps, scaled-linear betas 0.00085-0.012), classifier-free
guidance against the empty prompt (scale 3 by default).

What running the full published pipeline needs, and what is here:

* U-Net: implemented here, names match; loaded by :func:`load_make_an_audio_checkpoint`.
* VAE (``first_stage_model.*``, LDM ``AutoencoderKL`` with attention at two levels): mapped onto
  diffusers' ``AutoencoderKL`` by :mod:`adm_export.models.ldm_vae`; ``scale_factor`` from the
  checkpoint.
* Text encoder (``cond_stage_model.caption_encoder.*``): :class:`ClapTextEncoder` (transformers'
  ``BertModel`` + the CLAP projection, same names); its tokenizer (``bert-base-uncased``) must be
  available locally (``tokenizer/`` beside the checkpoint or the Hugging Face cache).
* Vocoder: Make-An-Audio decodes mels with its own BigVGAN (SnakeBeta activations, anti-aliased
  resampling; ``useful_ckpts/bigvgan``). **Not implemented here.** The loader takes any module that
  maps mel ``(B, T, 80)`` to a waveform ``(B, samples)`` at 16 kHz (``vocoder=``); without one it
  refuses with a message saying so. Quantization, export and engines concern only the U-Net.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

from adm_export.errors import ModelNotFoundError
from adm_export.models.base import ModelAdapter, TensorSpec
from adm_export.models.conditioning import TextCondSpec, call_arg, timestep_rows

logger = logging.getLogger(__name__)

# configs/text_to_audio/txt2audio_args.yaml, model.params.unet_config.params (training-only keys dropped).
MAKE_AN_AUDIO_UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [1, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2],
    "num_heads": 8,
    "transformer_depth": 1,
    "context_dim": 1024,
}
# first_stage_config.params (LDM AutoencoderKL): mel 80 x 624 frames -> 4 x 10 x 78.
MAKE_AN_AUDIO_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 624, "in_channels": 1, "out_ch": 1, "ch": 128,
    "ch_mult": [1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [78, 156], "dropout": 0.0,
}
MAKE_AN_AUDIO_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}
# MS-CLAP 2022 text tower: bert-base-uncased (768) projected to 1024.
CLAP_TEXT_MODEL = "bert-base-uncased"
TEXT_LEN = 77
SAMPLING_RATE = 16000
HOP_LENGTH = 256
MEL_BINS = 80
# gen_wav.py: latent width = int(seconds * 7.8), rounded up to a multiple of 4 (16000 / 256 / 8 =
# 7.8125 frames per second gives the same widths at whole seconds).
FRAME_MULTIPLE = 4


def _modules():
    """The torch module classes (defined on first use: this module imports without torch)."""
    global _MODULES
    if _MODULES is None:
        _MODULES = _define_modules()
    return _MODULES


_MODULES = None


def _define_modules():  # noqa: C901  (one namespace of small module classes)
    import torch
    import torch.nn.functional as F
    from torch import nn

    class GroupNorm32(nn.GroupNorm):
        """LDM's ``normalization()``: 32 groups, computed in the parameters' precision (LDM keeps
        them in float32 when the rest runs in float16)."""

        def __init__(self, channels: int, eps: float = 1e-5):
            super().__init__(32, channels, eps=eps)

        def forward(self, x):
            if x.dtype != self.weight.dtype:
                return super().forward(x.to(self.weight.dtype)).type(x.dtype)
            return super().forward(x)

    def timestep_embedding(t, dim: int, max_period: float = 10000.0):
        """LDM's sinusoidal embedding: ``[cos(t f), sin(t f)]`` with ``f = max_period^(-i/half)``."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    class TimestepBlock(nn.Module):
        """A block that takes the timestep embedding as a second input."""

    class ResBlock(TimestepBlock):
        """``in_layers`` (norm, SiLU, conv) + timestep ``emb_layers`` + ``out_layers``; 1x1 ``skip_connection``."""

        def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
            super().__init__()
            out = out_channels or channels
            self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out))
            self.out_layers = nn.Sequential(GroupNorm32(out), nn.SiLU(), nn.Dropout(0.0),
                                            nn.Conv2d(out, out, 3, padding=1))
            self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

        def forward(self, x, emb):
            h = self.in_layers(x)
            h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
            return self.skip_connection(x) + self.out_layers(h)

    class CrossAttention(nn.Module):
        """Multi-head attention: ``to_q``/``to_k``/``to_v`` without bias, ``to_out.0`` with."""

        def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
            super().__init__()
            inner = heads * dim_head
            self.heads = heads
            self.dim_head = dim_head
            self.to_q = nn.Linear(query_dim, inner, bias=False)
            self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
            self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
            self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
            # Explicit matmuls instead of SDPA (set by export.onnx.classic_attention while tracing):
            # the graph ONNX Runtime's attention fusion recognises. Same values.
            self.classic_attention = False

        def forward(self, x, context=None):
            context = x if context is None else context
            b, h, d = x.shape[0], self.heads, self.dim_head
            if self.classic_attention:
                # LDM's einsum arithmetic, with heads folded into the batch as diffusers' classic
                # AttnProcessor does: softmax(q k^T * d^-0.5) v.
                def fold(t):  # shapes read from t itself: the optimizer turns them into a constant reshape
                    n, s = t.shape[0], t.shape[1]
                    return t.reshape(n, s, h, d).permute(0, 2, 1, 3).reshape(n * h, s, d)

                q, k, v = fold(self.to_q(x)), fold(self.to_k(context)), fold(self.to_v(context))
                attn = (torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5).softmax(dim=-1)
                out = torch.matmul(attn, v).reshape(b, h, x.shape[1], d).permute(0, 2, 1, 3)
                return self.to_out(out.reshape(b, x.shape[1], h * d))
            q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2)
                       for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
            out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, as the einsum form
            return self.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))

    class GEGLU(nn.Module):
        def __init__(self, dim_in: int, dim_out: int):
            super().__init__()
            self.proj = nn.Linear(dim_in, dim_out * 2)

        def forward(self, x):
            x, gate = self.proj(x).chunk(2, dim=-1)
            return x * F.gelu(gate)

    class FeedForward(nn.Module):
        """``net`` = GEGLU (``net.0.proj``), dropout, linear (``net.2``)."""

        def __init__(self, dim: int, mult: int = 4):
            super().__init__()
            self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

        def forward(self, x):
            return self.net(x)

    class BasicTransformerBlock(nn.Module):
        """Self-attention (``attn1``), cross-attention to the text (``attn2``), gated feed-forward."""

        def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
            super().__init__()
            self.attn1 = CrossAttention(dim, None, heads, dim_head)
            self.ff = FeedForward(dim)
            self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
            self.norm1 = nn.LayerNorm(dim)
            self.norm2 = nn.LayerNorm(dim)
            self.norm3 = nn.LayerNorm(dim)

        def forward(self, x, context):
            x = self.attn1(self.norm1(x)) + x
            x = self.attn2(self.norm2(x), context) + x
            return self.ff(self.norm3(x)) + x

    class SpatialTransformer(nn.Module):
        """GroupNorm (eps 1e-6), 1x1 ``proj_in``, transformer blocks over (h w) tokens, 1x1 ``proj_out``."""

        def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int):
            super().__init__()
            inner = heads * dim_head
            self.norm = nn.GroupNorm(32, channels, eps=1e-6)
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.transformer_blocks = nn.ModuleList(
                [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
            self.proj_out = nn.Conv2d(inner, channels, 1)

        def forward(self, x, context):
            b, c, h, w = x.shape
            # LDM's rearrange 'b c h w -> b (h w) c' (a permute, then a reshape).
            y = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, -1)
            for block in self.transformer_blocks:
                y = block(y, context)
            return self.proj_out(y.transpose(1, 2).reshape(b, -1, h, w)) + x

    class Downsample(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

        def forward(self, x):
            return self.op(x)

    class Upsample(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    class TimestepEmbedSequential(nn.Sequential):
        """Runs its layers in order, giving ResBlocks the timestep embedding and transformers the text."""

        def forward(self, x, emb, context):
            for layer in self:
                if isinstance(layer, TimestepBlock):
                    x = layer(x, emb)
                elif isinstance(layer, SpatialTransformer):
                    x = layer(x, context)
                else:
                    x = layer(x)
            return x

    class UNetModel(nn.Module):
        """Make-An-Audio's denoiser (LDM ``openaimodel.UNetModel`` with spatial transformers, legacy=False).

        Args:
            in_channels, out_channels: Latent channels.
            model_channels: Width of the first level; the timestep MLP is 4x this.
            attention_resolutions: Downsampling factors (1, 2, 4, ...) whose levels get transformers.
            num_res_blocks: ResBlocks per level (the decoder has one more).
            channel_mult: Width multiplier per level.
            num_heads: Attention heads (head width = channels / heads).
            transformer_depth: Transformer blocks per SpatialTransformer.
            context_dim: Width of the text states.
        """

        def __init__(self, in_channels: int, out_channels: int, model_channels: int,
                     attention_resolutions: Sequence[int], num_res_blocks: int, channel_mult: Sequence[int],
                     num_heads: int, transformer_depth: int, context_dim: int):
            super().__init__()
            from diffusers.configuration_utils import FrozenDict

            self.config = FrozenDict(
                in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                attention_resolutions=list(attention_resolutions), num_res_blocks=num_res_blocks,
                channel_mult=list(channel_mult), num_heads=num_heads, transformer_depth=transformer_depth,
                context_dim=context_dim,
            )
            emb = model_channels * 4
            self.model_channels = model_channels
            self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))

            def transformer(ch):
                return SpatialTransformer(ch, num_heads, ch // num_heads, transformer_depth, context_dim)

            self.input_blocks = nn.ModuleList(
                [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
            skips = [model_channels]
            ch, ds = model_channels, 1
            for level, mult in enumerate(channel_mult):
                for _ in range(num_res_blocks):
                    layers = [ResBlock(ch, emb, mult * model_channels)]
                    ch = mult * model_channels
                    if ds in attention_resolutions:
                        layers.append(transformer(ch))
                    self.input_blocks.append(TimestepEmbedSequential(*layers))
                    skips.append(ch)
                if level != len(channel_mult) - 1:
                    self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                    skips.append(ch)
                    ds *= 2
            self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb), transformer(ch), ResBlock(ch, emb))
            self.output_blocks = nn.ModuleList()
            for level, mult in reversed(list(enumerate(channel_mult))):
                for i in range(num_res_blocks + 1):
                    layers = [ResBlock(ch + skips.pop(), emb, model_channels * mult)]
                    ch = model_channels * mult
                    if ds in attention_resolutions:
                        layers.append(transformer(ch))
                    if level and i == num_res_blocks:
                        layers.append(Upsample(ch))
                        ds //= 2
                    self.output_blocks.append(TimestepEmbedSequential(*layers))
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

        @property
        def dtype(self):
            return next(self.parameters()).dtype

        @property
        def device(self):
            return next(self.parameters()).device

        def forward(self, x, timesteps, context):
            """Noise prediction for latents ``x`` (B, C, H, W) at ``timesteps`` (B,) given ``context`` (B, L, D)."""
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
            hs, h = [], x
            for block in self.input_blocks:
                h = block(h, emb, context)
                hs.append(h)
            h = self.middle_block(h, emb, context)
            for block in self.output_blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
            return self.out(h)

    class Projection(nn.Module):
        """MS-CLAP's projection head: ``layer_norm(l1(x) + l2(gelu(l1(x))))`` (``linear1``, ``linear2`` unbiased)."""

        def __init__(self, d_in: int, d_out: int):
            super().__init__()
            self.linear1 = nn.Linear(d_in, d_out, bias=False)
            self.linear2 = nn.Linear(d_out, d_out, bias=False)
            self.layer_norm = nn.LayerNorm(d_out)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            e1 = self.linear1(x)
            return self.layer_norm(e1 + self.drop(self.linear2(F.gelu(e1))))

    class ClapTextEncoder(nn.Module):
        """Make-An-Audio's ``FrozenCLAPEmbedder.caption_encoder``: BERT ``base`` and ``projection``.

        Its ``encode`` runs BERT on the padded tokens *without* an attention mask (as the original
        does) and projects every token state: context ``(B, 77, 1024)``.
        """

        def __init__(self, bert_config, d_proj: int):
            super().__init__()
            from transformers import BertModel

            self.base = BertModel(bert_config)
            self.projection = Projection(bert_config.hidden_size, d_proj)

        @property
        def dtype(self):
            return next(self.parameters()).dtype

        @property
        def device(self):
            return next(self.parameters()).device

        def forward(self, input_ids):
            return self.projection(self.base(input_ids=input_ids).last_hidden_state)

    import types

    return types.SimpleNamespace(UNetModel=UNetModel, ClapTextEncoder=ClapTextEncoder, GroupNorm32=GroupNorm32,
                                 timestep_embedding=timestep_embedding)


def __getattr__(name: str):
    # Module classes subclass torch.nn.Module: defined on first access (no torch import at import time).
    if name in ("UNetModel", "ClapTextEncoder"):
        return getattr(_modules(), name)
    if name == "MakeAnAudioPipeline":
        return _pipeline_class()
    raise AttributeError(name)


def _pipeline_class():
    global _PIPELINE
    if _PIPELINE is None:
        _PIPELINE = _define_pipeline()
    return _PIPELINE


_PIPELINE = None


def _define_pipeline():
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.pipeline_utils import AudioPipelineOutput
    from diffusers.utils.torch_utils import randn_tensor

    class MakeAnAudioPipeline(DiffusionPipeline):
        """Make-An-Audio's sampler: CLAP text states, CFG against the empty prompt, DDIM, VAE, vocoder.

        Args:
            unet: :class:`UNetModel`.
            vae: diffusers ``AutoencoderKL`` (``scaling_factor`` = the checkpoint's ``scale_factor``).
            text_encoder: :class:`ClapTextEncoder`.
            tokenizer: BERT tokenizer (padded to 77 tokens).
            scheduler: DDIM on the LDM schedule.
            vocoder: Module mapping mel ``(B, T, mel_bins)`` to waveform ``(B, samples)``.
            sampling_rate, hop_length, mel_bins: The vocoder's audio format.
        """

        def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, vocoder, sampling_rate: int = SAMPLING_RATE,
                     hop_length: int = HOP_LENGTH, mel_bins: int = MEL_BINS):
            super().__init__()
            self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  scheduler=scheduler, vocoder=vocoder)
            self.register_to_config(sampling_rate=int(sampling_rate), hop_length=int(hop_length),
                                    mel_bins=int(mel_bins))
            self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

        @property
        def sampling_rate(self) -> int:
            return int(self.config.sampling_rate)

        @property
        def latent_frames_per_second(self) -> float:
            return self.config.sampling_rate / self.config.hop_length / self.vae_scale_factor

        def latent_frames(self, seconds: float) -> int:
            """``gen_wav.py``'s rule: ``int(seconds * fps)`` rounded up to a multiple of 4."""
            frames = int(seconds * self.latent_frames_per_second)
            return max(FRAME_MULTIPLE, -(-frames // FRAME_MULTIPLE) * FRAME_MULTIPLE)

        def encode_prompt(self, prompts: list[str], guidance: bool):
            texts = ([""] * len(prompts) if guidance else []) + list(prompts)
            ids = self.tokenizer(texts, truncation=True, max_length=TEXT_LEN, padding="max_length",
                                 return_tensors="pt").input_ids.to(self.device)
            return self.text_encoder(ids)

        @torch.no_grad()
        def __call__(self, prompt: str | list[str], num_inference_steps: int = 100, guidance_scale: float = 3.0,
                     audio_length_in_s: float = 10.0, latents=None, generator=None, output_type: str = "np"):
            """Generate audio (``output_type``: ``np``, ``pt``, ``mel`` or ``latent``)."""
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            guidance = guidance_scale > 1.0
            context = self.encode_prompt(prompts, guidance)
            shape = (len(prompts), self.unet.config.in_channels, self.config.mel_bins // self.vae_scale_factor,
                     self.latent_frames(audio_length_in_s))
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=self.device, dtype=context.dtype)
            latents = latents.to(self.device) * self.scheduler.init_noise_sigma
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
            for t in self.progress_bar(self.scheduler.timesteps):
                x = torch.cat([latents] * 2) if guidance else latents
                x = self.scheduler.scale_model_input(x, t)
                tt = t.reshape(1).expand(x.shape[0]).to(self.device)
                noise = self.unet(x, tt, context=context)
                if guidance:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise, t, latents, generator=generator).prev_sample
            if output_type == "latent":
                return AudioPipelineOutput(audios=latents)
            mel = self.vae.decode(latents / self.vae.config.scaling_factor).sample  # (B, 1, mel, T)
            if output_type == "mel":
                return AudioPipelineOutput(audios=mel)
            audio = self.vocoder(mel.squeeze(1).transpose(1, 2)).float().cpu()
            audio = audio[:, : int(audio_length_in_s * self.sampling_rate)]
            return AudioPipelineOutput(audios=audio.numpy() if output_type == "np" else audio)

    return MakeAnAudioPipeline


def _export_module(unet):
    """``(sample, timestep, context) -> noise``; the U-Net held as ``unet`` like every adapter's
    export module (the export names ONNX nodes by module path under that attribute)."""
    import torch

    class MakeAnAudioDenoiser(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, context):
            return self.unet(sample, timestep, context)

    return MakeAnAudioDenoiser(unet)


class MakeAnAudioAdapter(ModelAdapter):
    """Adapter of :class:`MakeAnAudioPipeline`.

    Denoiser inputs: ``sample`` (B, 4, 10, frames): the time axis is the *last* one here (the
    LDM audio models lay out the latent as mel x time), ``timestep``, ``context`` (B, 77, 1024).
    """

    family = "make_an_audio"

    @property
    def denoiser(self):
        return self.pipeline.unet

    def denoiser_spec(self) -> TextCondSpec:
        cfg = self.pipeline.unet.config
        height = self.pipeline.config.mel_bins // self.pipeline.vae_scale_factor
        return TextCondSpec(
            inputs=(
                TensorSpec("sample", ("batch", cfg["in_channels"], height, "frames")),
                TensorSpec("timestep", ("batch",)),
                TensorSpec("context", ("batch", TEXT_LEN, cfg["context_dim"])),
            ),
            outputs=(TensorSpec("noise_pred", ("batch", cfg["out_channels"], height, "frames")),),
            latent_frames_per_second=self.pipeline.latent_frames_per_second,
            frame_multiple=max(FRAME_MULTIPLE, 2 ** (len(cfg["channel_mult"]) - 1)),
        )

    def inputs_from_call(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        sample = call_arg(args, kwargs, "x", 0)
        return {
            "sample": sample,
            "timestep": timestep_rows(call_arg(args, kwargs, "timesteps", 1), sample),
            "context": call_arg(args, kwargs, "context", 2),
        }

    def export_module(self, denoiser=None):
        return _export_module(denoiser if denoiser is not None else self.denoiser)

    def wrap_output(self, output):
        return output

    def set_denoiser(self, module) -> None:
        object.__setattr__(self.pipeline, "unet", module)

    @property
    def sampling_rate(self) -> int:
        return self.pipeline.sampling_rate

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, audio_seconds: float,
                 guidance_scale: float) -> list:
        import torch

        pipe = self.pipeline
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        shape = (pipe.unet.config["in_channels"], pipe.config.mel_bins // pipe.vae_scale_factor,
                 pipe.latent_frames(audio_seconds))
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(pipe.device)
        with torch.inference_mode():
            out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                       audio_length_in_s=audio_seconds, latents=latents, generator=generators, output_type="np")
        return [a.astype("float32") for a in out.audios]


# -- loading a published checkpoint ---------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.caption_encoder."


def load_make_an_audio_checkpoint(ckpt: str | Path, vocoder=None, tokenizer=None,
                                  clap_weights: str | Path | None = None, unet_config: dict | None = None,
                                  bert_config=None, vae_ddconfig: dict | None = None):
    """Build a :class:`MakeAnAudioPipeline` from a published LDM checkpoint (``maa1_full.ckpt``).

    Args:
        ckpt: The Lightning checkpoint (``{"state_dict": ...}``) with ``model.diffusion_model.*``,
            ``first_stage_model.*``, ``scale_factor`` and (usually) ``cond_stage_model.*``.
        vocoder: Module mapping mel ``(B, T, 80)`` to waveform (BigVGAN is not implemented here).
        tokenizer: BERT tokenizer; default: ``tokenizer/`` beside the checkpoint, else the
            ``bert-base-uncased`` tokenizer from the Hugging Face cache.
        clap_weights: ``CLAP_weights_2022.pth`` when the checkpoint holds no text-encoder weights.
        unet_config: U-Net config (default: the published one).
        bert_config: ``BertConfig`` of the text tower (default: bert-base-uncased's).
        vae_ddconfig: The VAE's LDM ``ddconfig`` (default: the published one).

    Returns:
        The pipeline in float32 on the CPU.

    Raises:
        ModelNotFoundError: a missing part (vocoder, tokenizer, text weights) or mismatched weights.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import BertConfig

    from adm_export.models.ldm_vae import load_ldm_vae_weights, vae_config_from_ldm

    ckpt = Path(ckpt)
    if vocoder is None:
        raise ModelNotFoundError(
            "Make-An-Audio decodes mels with its own BigVGAN vocoder, which adm-export does not implement; "
            "pass vocoder=<module mapping mel (B, T, 80) to a 16 kHz waveform>"
        )
    raw = torch.load(str(ckpt), map_location="cpu", weights_only=False)
    state = raw.get("state_dict", raw)
    mods = _modules()

    # 1. U-Net: names as in the checkpoint, prefix removed.
    unet_config = unet_config or MAKE_AN_AUDIO_UNET_CONFIG
    unet = mods.UNetModel(**unet_config)
    _load_strict(unet, {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}, "U-Net")

    # 2. VAE: LDM names onto diffusers' AutoencoderKL; latent scale from the diffusion model.
    scale = float(torch.as_tensor(state.get("scale_factor", 1.0)))
    ddconfig = vae_ddconfig or MAKE_AN_AUDIO_VAE_DDCONFIG
    vae = AutoencoderKL(**vae_config_from_ldm(ddconfig, ddconfig["z_channels"], scale))
    load_ldm_vae_weights(vae, state, prefix=VAE_PREFIX)

    # 3. Text encoder: from the checkpoint, else from MS-CLAP's own weights file.
    text_state = {k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    if not text_state and clap_weights is not None:
        clap = torch.load(str(clap_weights), map_location="cpu", weights_only=False)
        clap = clap.get("model", clap)
        text_state = {k[len("caption_encoder."):]: v for k, v in clap.items() if k.startswith("caption_encoder.")}
    if not text_state:
        raise ModelNotFoundError(
            f"{str(ckpt)!r} holds no text-encoder weights ({TEXT_PREFIX}*); pass clap_weights=CLAP_weights_2022.pth"
        )
    # The CLAP projection's width is the U-Net's context width (1024 published).
    text_encoder = mods.ClapTextEncoder(bert_config or BertConfig(), int(unet_config["context_dim"]))
    # Older transformers saved BERT's position_ids buffer; it is not a weight.
    text_state = {k: v for k, v in text_state.items() if not k.endswith("position_ids")}
    _load_strict(text_encoder, text_state, "CLAP text encoder", optional=("base.pooler.",))

    # 4. Tokenizer and sampler.
    if tokenizer is None:
        tokenizer = _bert_tokenizer(ckpt.parent)
    pipe = _pipeline_class()(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                             scheduler=DDIMScheduler(**MAKE_AN_AUDIO_SCHEDULER_CONFIG), vocoder=vocoder)
    return pipe


def _load_strict(module, state: dict, what: str, optional: tuple[str, ...] = ()) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise ModelNotFoundError(f"Make-An-Audio {what}: checkpoint does not match the config: "
                                 f"{str(exc).splitlines()[1].strip()[:300]}") from exc
    missing = [k for k in missing if not k.startswith(optional)]
    if missing or unexpected:
        raise ModelNotFoundError(
            f"Make-An-Audio {what}: checkpoint does not match the config: {len(missing)} missing "
            f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})"
        )


def _bert_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    for source, kwargs in ((folder / "tokenizer", {}), (CLAP_TEXT_MODEL, {"local_files_only": True})):
        if isinstance(source, Path) and not source.is_dir():
            continue
        try:
            return AutoTokenizer.from_pretrained(str(source), **kwargs)
        except Exception as exc:  # missing files: OSError / ValueError
            logger.debug("tokenizer from %s: %s", source, exc)
    raise ModelNotFoundError(
        f"no {CLAP_TEXT_MODEL} tokenizer: save it to {str(folder / 'tokenizer')!r} or put it in the Hugging Face cache"
    )


def make_an_audio_state_dict(pipe) -> dict:
    """The pipeline's U-Net, VAE and text weights under the published checkpoint's names.

    The inverse of :func:`load_make_an_audio_checkpoint` (tests; handing weights back to the
    original code).
    """
    import torch

    from adm_export.models.ldm_vae import vae_state_to_ldm

    out = {UNET_PREFIX + k: v.clone() for k, v in pipe.unet.state_dict().items()}
    out.update(vae_state_to_ldm(pipe.vae, prefix=VAE_PREFIX))
    out.update({TEXT_PREFIX + k: v.clone() for k, v in pipe.text_encoder.state_dict().items()})
    out["scale_factor"] = torch.tensor(float(pipe.vae.config.scaling_factor))
    return out
