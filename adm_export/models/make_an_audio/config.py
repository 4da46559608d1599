"""Make-An-Audio's published configuration, and the model config file (``txt2audio_args.yaml``) as data.

Published configuration (``configs/text_to_audio/txt2audio_args.yaml``): U-Net 4 -> 4 channels,
320 model channels, ``channel_mult`` (1, 2), attention at both levels, 2 ResBlocks per level, 8
heads, one transformer layer, context 1024 (CLAP). Latent (B, 4, 10, T): 80 mel bins / 8 by
``T`` = 7.8 frames per second (16 kHz, hop 256, VAE factor 8), rounded up to a multiple of 4.
Text: MS-CLAP 2022's text tower (BERT-base + projection to 1024), 77 tokens padded, no mask.
Sampler: DDIM on the LDM schedule (1000 steps, scaled-linear betas 0.00085-0.012), classifier-free
guidance against the empty prompt (scale 3 by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adm_export.errors import ModelNotFoundError

# model.params.unet_config.params (training-only keys dropped).
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

# The model config file beside a checkpoint (Make-An-Audio's configs/text_to_audio/txt2audio_args.yaml).
MODEL_CONFIG_FILE = "txt2audio_args.yaml"
# unet_config.params keys that only concern training or the original code's memory tricks.
_UNET_IGNORED_KEYS = {"image_size", "use_checkpoint", "legacy", "use_fp16", "dropout", "use_spatial_transformer"}


def _dict_field(default: Mapping) -> Any:
    return dataclasses.field(default_factory=lambda: dict(default))


@dataclasses.dataclass(frozen=True)
class MakeAnAudioConfig:
    """Architecture of a Make-An-Audio checkpoint (default: the published one).

    Attributes:
        unet: :class:`~adm_export.models.make_an_audio.unet.UNetModel` keyword arguments.
        vae_ddconfig: The VAE's LDM ``ddconfig``.
        scheduler: ``DDIMScheduler`` keyword arguments (the LDM schedule).
    """

    unet: Mapping[str, Any] = _dict_field(MAKE_AN_AUDIO_UNET_CONFIG)
    vae_ddconfig: Mapping[str, Any] = _dict_field(MAKE_AN_AUDIO_VAE_DDCONFIG)
    scheduler: Mapping[str, Any] = _dict_field(MAKE_AN_AUDIO_SCHEDULER_CONFIG)

    @classmethod
    def from_yaml(cls, path: str | Path) -> MakeAnAudioConfig:
        """Read Make-An-Audio's model config (``txt2audio_args.yaml``: ``model.params.unet_config``,
        ``first_stage_config.params.ddconfig``, ``linear_start``/``linear_end``/``timesteps``).

        Raises:
            ModelNotFoundError: the file is missing, not that layout, or asks for a U-Net option
                this implementation does not have.
        """
        import yaml

        path = Path(path)
        try:
            params = (yaml.safe_load(path.read_text()) or {})["model"]["params"]
            unet = dict(params["unet_config"]["params"])
            ddconfig = dict(params["first_stage_config"]["params"]["ddconfig"])
            embed_dim = params["first_stage_config"]["params"].get("embed_dim", ddconfig["z_channels"])
        except FileNotFoundError:
            raise ModelNotFoundError(f"no Make-An-Audio model config at {str(path)!r}") from None
        except (KeyError, TypeError, yaml.YAMLError) as exc:
            raise ModelNotFoundError(
                f"{str(path)!r} is not a Make-An-Audio model config (model.params.unet_config / "
                f"first_stage_config.params.ddconfig): {exc!r}") from None
        if int(embed_dim) != int(ddconfig["z_channels"]):
            raise ModelNotFoundError(f"{str(path)!r}: VAE embed_dim {embed_dim} != z_channels "
                                     f"{ddconfig['z_channels']} is not supported")
        if unet.get("use_spatial_transformer") is False:
            raise ModelNotFoundError(f"{str(path)!r}: use_spatial_transformer: false is not supported")
        unknown = sorted(set(unet) - set(MAKE_AN_AUDIO_UNET_CONFIG) - _UNET_IGNORED_KEYS)
        if unknown:
            raise ModelNotFoundError(f"{str(path)!r}: U-Net options not supported: {', '.join(unknown)}")
        scheduler = dict(MAKE_AN_AUDIO_SCHEDULER_CONFIG)
        for ours, theirs in (("beta_start", "linear_start"), ("beta_end", "linear_end"),
                             ("num_train_timesteps", "timesteps")):
            if theirs in params:
                scheduler[ours] = params[theirs]
        return cls(unet={k: v for k, v in unet.items() if k in MAKE_AN_AUDIO_UNET_CONFIG},
                   vae_ddconfig=ddconfig, scheduler=scheduler)

    def to_yaml(self, path: str | Path) -> None:
        """Write this config in the layout :meth:`from_yaml` (and Make-An-Audio's own code) reads."""
        import yaml

        params = {
            "linear_start": self.scheduler["beta_start"], "linear_end": self.scheduler["beta_end"],
            "timesteps": self.scheduler["num_train_timesteps"], "channels": self.unet["in_channels"],
            "conditioning_key": "crossattn",
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                            "params": {**dict(self.unet), "use_spatial_transformer": True, "legacy": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                   "params": {"embed_dim": self.vae_ddconfig["z_channels"],
                                              "ddconfig": dict(self.vae_ddconfig)}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLAPEmbedder"},
        }
        doc = {"model": {"target": "ldm.models.diffusion.ddpm_audio.LatentDiffusion_audio", "params": params}}
        Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
