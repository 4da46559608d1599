"""Make-An-Audio's denoiser: the LDM ``openaimodel.UNetModel`` with spatial transformers.

Written from the public code's layout with the same parameter names, so the
``model.diffusion_model.*`` tensors of a published checkpoint load as they are; no code copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adm_export.devices import PlacedModule


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
    """Gated GELU: one projection to twice the width, the second half gating the first."""

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
    """Strided 3x3 convolution (``op``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution (``conv``)."""

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


class UNetModel(PlacedModule, nn.Module):
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
