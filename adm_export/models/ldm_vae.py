"""Latent-diffusion (LDM) autoencoder and HiFi-GAN checkpoints onto diffusers / transformers modules.

TANGO (AudioLDM's VAE) and Make-An-Audio store their mel VAE with the original latent-diffusion
parameter names (``encoder.down.{i}.block.{j}.norm1``, ``mid.attn_1.q``, ``decoder.up.{i}...``)
and AudioLDM's HiFi-GAN with its own (``ups.{i}``, ``resblocks.{j}.convs1.{k}``). The same
networks exist in diffusers (``AutoencoderKL``) and transformers (``SpeechT5HifiGan``) under other
names. This module derives the name of every diffusers/transformers parameter in the original
checkpoint from rules (written from the public LDM module layout), so a user's checkpoint file
loads with nothing converted offline. Conversion is exact: names change, values do not (1x1
attention convolutions become linear weights by a reshape).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from adm_export.errors import ModelNotFoundError

logger = logging.getLogger(__name__)


def vae_config_from_ldm(ddconfig: dict, embed_dim: int, scale_factor: float) -> dict:
    """diffusers ``AutoencoderKL`` config of an LDM ``AutoencoderKL(ddconfig, embed_dim)``.

    Attention levels follow LDM's rule: encoder level ``i`` works at ``resolution / 2**i`` and
    gets attention after each resnet when that resolution is in ``attn_resolutions``.

    Raises:
        ModelNotFoundError: a config diffusers cannot express (``z_channels != embed_dim``).
    """
    if int(ddconfig["z_channels"]) != int(embed_dim):
        raise ModelNotFoundError(
            f"VAE config has z_channels={ddconfig['z_channels']} but embed_dim={embed_dim}; only equal values "
            f"map onto diffusers' AutoencoderKL"
        )
    widths = [int(ddconfig["ch"]) * int(m) for m in ddconfig["ch_mult"]]
    res = int(ddconfig.get("resolution", 256))
    attn_res = {int(r) for r in ddconfig.get("attn_resolutions", []) or []}
    attn = [res // 2 ** i in attn_res for i in range(len(widths))]
    return dict(
        in_channels=int(ddconfig.get("in_channels", 1)),
        out_channels=int(ddconfig.get("out_ch", 1)),
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn),
        # diffusers' decoder runs from the lowest resolution up: its block b is LDM level n-1-b.
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(widths),
        layers_per_block=int(ddconfig["num_res_blocks"]),
        latent_channels=int(embed_dim),
        norm_num_groups=32,
        sample_size=res,
        scaling_factor=float(scale_factor),
    )


_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}


def _attn(prefix: str, rest: str) -> str:
    for new, old in _ATTN.items():
        if rest.startswith(new + "."):
            return f"{prefix}.{old}{rest[len(new):]}"
    raise KeyError(rest)


def _resnet(prefix: str, rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{prefix}.{_RESNET[layer]}.{param}"


def ldm_vae_name(name: str, num_levels: int) -> str:
    """The LDM checkpoint name of a diffusers ``AutoencoderKL`` parameter.

    Args:
        name: diffusers name, e.g. ``decoder.up_blocks.0.resnets.1.conv1.weight``.
        num_levels: Number of resolution levels (``len(block_out_channels)``).

    Raises:
        KeyError: a name outside the rules (a diffusers layout this mapping does not know).
    """
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name
    side, _, rest = name.partition(".")
    if side not in ("encoder", "decoder"):
        raise KeyError(name)
    for new, old in (("conv_in.", "conv_in."), ("conv_norm_out.", "norm_out."), ("conv_out.", "conv_out.")):
        if rest.startswith(new):
            return f"{side}.{old}{rest[len(new):]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
    if m:
        return _resnet(f"{side}.mid.block_{int(m[1]) + 1}", m[2])
    m = re.match(r"mid_block\.attentions\.0\.(.+)", rest)
    if m:
        return _attn(f"{side}.mid.attn_1", m[1])
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if not m:
        raise KeyError(name)
    kind, block, part, idx, tail = m[1], int(m[2]), m[3], int(m[4]), m[5]
    level = block if kind == "down" else num_levels - 1 - block
    ldm = f"{side}.{kind}.{level}"
    if part == "resnets":
        return _resnet(f"{ldm}.block.{idx}", tail)
    if part == "attentions":
        return _attn(f"{ldm}.attn.{idx}", tail)
    sampler = "downsample" if part == "downsamplers" else "upsample"
    return f"{ldm}.{sampler}.{tail}"


def load_ldm_vae_weights(vae, state: dict[str, Any], prefix: str = "", strict: bool = True) -> list[str]:
    """Copy an LDM-named VAE state dict into a diffusers ``AutoencoderKL``.

    Args:
        vae: The diffusers model (its config from :func:`vae_config_from_ldm`).
        state: The checkpoint's tensors (may hold other modules' keys too).
        prefix: Prefix of the VAE's keys in ``state`` (``first_stage_model.`` in an LDM checkpoint).
        strict: Raise if a VAE parameter is missing or has the wrong shape.

    Returns:
        The VAE keys of ``state`` (with prefix) that were not used (e.g. a training loss's).

    Raises:
        ModelNotFoundError: missing or mis-shaped tensors (the message names the first few).
    """
    import torch

    n = len(vae.config.block_out_channels)
    target = vae.state_dict()
    new, used, missing, bad = {}, set(), [], []
    for name, param in target.items():
        key = prefix + ldm_vae_name(name, n)
        if key not in state:
            missing.append(key)
            continue
        value = torch.as_tensor(state[key])
        if value.shape != param.shape:
            if value.numel() == param.numel() and value.dim() == 4 and param.dim() == 2:
                value = value.reshape(param.shape)  # 1x1 conv attention weight -> linear
            else:
                bad.append(f"{key} {tuple(value.shape)} vs {tuple(param.shape)}")
                continue
        new[name] = value.to(param.dtype)
        used.add(key)
    if strict and (missing or bad):
        raise ModelNotFoundError(
            f"VAE checkpoint does not match its config: {len(missing)} missing "
            f"({', '.join(missing[:3])}), {len(bad)} mis-shaped ({', '.join(bad[:3])})"
        )
    vae.load_state_dict(new, strict=strict)
    unused = [k for k in state if k.startswith(prefix) and k not in used
              and k[len(prefix):].split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv")]
    if unused:
        logger.warning("VAE checkpoint: %d unused tensors (e.g. %s)", len(unused), unused[0])
    return unused


def vae_state_to_ldm(vae, prefix: str = "") -> dict:
    """The state dict of a diffusers ``AutoencoderKL`` under LDM names (attention weights as 1x1 convs).

    The inverse of :func:`load_ldm_vae_weights`: used to write checkpoints in the public layout
    (tests, and users exporting a model trained in diffusers back to the original code).
    """
    n = len(vae.config.block_out_channels)
    out = {}
    for name, value in vae.state_dict().items():
        key = ldm_vae_name(name, n)
        if value.dim() == 2 and key.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out"):
            value = value[:, :, None, None]
        out[prefix + key] = value.clone()
    return out


# -- HiFi-GAN (AudioLDM / TANGO) --------------------------------------------------------------------


def hifigan_name(name: str) -> str | None:
    """AudioLDM HiFi-GAN name of a ``SpeechT5HifiGan`` parameter (None for its mean/scale buffers)."""
    if name in ("mean", "scale"):
        return None
    m = re.match(r"upsampler\.(\d+)\.(.+)", name)
    if m:
        return f"ups.{m[1]}.{m[2]}"
    return name


def load_hifigan_weights(vocoder, state: dict[str, Any], prefix: str = "") -> None:
    """Copy an AudioLDM HiFi-GAN state dict (weight norm removed) into a ``SpeechT5HifiGan``.

    Raises:
        ModelNotFoundError: a missing or mis-shaped tensor; or the checkpoint still holds
            weight-norm pairs (``weight_g``/``weight_v``), which are folded here instead.
    """
    import torch

    new = {}
    target = vocoder.state_dict()
    missing = []
    for name, param in target.items():
        key = hifigan_name(name)
        if key is None:
            # normalize_before=False: the mel is used as is (mean 0, scale 1).
            new[name] = torch.zeros_like(param) if name == "mean" else torch.ones_like(param)
            continue
        full = prefix + key
        if full in state:
            value = torch.as_tensor(state[full])
        elif full.endswith(".weight") and full[:-7] + ".weight_g" in state:
            g, v = state[full[:-7] + ".weight_g"], state[full[:-7] + ".weight_v"]
            # torch's weight_norm (dim=0): w = g * v / ||v|| over every dim but 0.
            dims = tuple(range(1, v.dim()))
            value = g * v / v.norm(dim=dims, keepdim=True)
        else:
            missing.append(full)
            continue
        if value.shape != param.shape:
            raise ModelNotFoundError(f"vocoder checkpoint: {full} has shape {tuple(value.shape)}, "
                                     f"the config expects {tuple(param.shape)}")
        new[name] = value.to(param.dtype)
    if missing:
        raise ModelNotFoundError(f"vocoder checkpoint misses {len(missing)} tensors ({', '.join(missing[:3])})")
    vocoder.load_state_dict(new)


def hifigan_state_to_audioldm(vocoder, prefix: str = "") -> dict:
    """The state dict of a ``SpeechT5HifiGan`` under AudioLDM HiFi-GAN names (inverse of the loader)."""
    out = {}
    for name, value in vocoder.state_dict().items():
        key = hifigan_name(name)
        if key is not None:
            out[prefix + key] = value.clone()
    return out
