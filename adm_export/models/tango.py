"""TANGO: pipeline, adapter and loader of the published checkpoint layout (declare-lab/tango).

TANGO is AudioLDM's latent space driven by a text-conditioned U-Net: a diffusers
``UNet2DConditionModel`` (Stable Diffusion 2 layout, widths 320-1280, linear projections, upcast
attention) attending to FLAN-T5-large states with the text attention mask; AudioLDM's mel VAE
(8-channel latent, 4x down) and its 16 kHz HiFi-GAN; latent (B, 8, 256, 16) for 10.24 s.
Training and sampling use the Stable Diffusion 2.1 noise schedule (scaled-linear betas
0.00085-0.012, v-prediction) with DDPM steps and classifier-free guidance (empty prompt).
There is no diffusers pipeline for it: :class:`TangoPipeline` is this package's own.

Published layout (a snapshot of the hub repo ``declare-lab/tango``, read by
:func:`load_tango_folder`)::

    main_config.json        {"text_encoder_name": "google/flan-t5-large", "scheduler_name": ..., ...}
    vae_config.json         LDM AutoencoderKL kwargs (ddconfig, embed_dim, scale_factor)
    stft_config.json        mel front end (not needed to generate)
    pytorch_model_main.bin  "unet.*" (diffusers names) and "text_encoder.*" (T5EncoderModel names)
    pytorch_model_vae.bin   LDM VAE names plus "vocoder.*" (AudioLDM HiFi-GAN, weight norm removed)
    pytorch_model_stft.bin  (not needed to generate)

The U-Net config is not in the snapshot (it lives in the GitHub repo); the published one is built
in (:data:`TANGO_UNET_CONFIG`) and a ``diffusion_model_config.json`` beside the weights wins.
The FLAN-T5 tokenizer is not in the snapshot either: put it in ``tokenizer/`` in the folder
(``AutoTokenizer.from_pretrained("google/flan-t5-large").save_pretrained(DIR / "tokenizer")``)
or have it in the Hugging Face cache.

Differences from the original sampler, all output-preserving: the text is padded to a fixed
``text_len`` (128 tokens by default; TANGO pads a batch to its longest prompt) with the mask
zeroing the padding exactly; per-prompt generators make a clip independent of its batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from adm_export.errors import ModelNotFoundError
from adm_export.models.base import DiffusersUNetAdapter, TensorSpec
from adm_export.models.conditioning import DEFAULT_TEXT_LEN, TextCondSpec, call_arg, pad_tokens, timestep_rows, usable_length

logger = logging.getLogger(__name__)

# declare-lab/tango configs/diffusion_model_config.json (also tango2/configs/): SD 2 layout at 8 channels.
TANGO_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 8,
    "sample_size": [32, 2],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
    "upcast_attention": True,
}

# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json, which TANGO's main_config names
# (its code builds a DDPMScheduler from it).
TANGO_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "steps_offset": 1,
}

# google/flan-t5-large encoder, for when its config.json is not available locally.
FLAN_T5_LARGE_CONFIG = {
    "d_model": 1024, "d_ff": 2816, "d_kv": 64, "num_heads": 16, "num_layers": 24,
    "feed_forward_proj": "gated-gelu", "vocab_size": 32128, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}

# AudioLDM's 16 kHz HiFi-GAN (64 mel bins, hop 160), as TANGO's VAE builds it.
AUDIOLDM_HIFIGAN_CONFIG = {
    "model_in_dim": 64, "sampling_rate": 16000, "upsample_initial_channel": 1024,
    "upsample_rates": [5, 4, 2, 2, 2], "upsample_kernel_sizes": [16, 16, 8, 4, 4],
    "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "normalize_before": False,
}



def _pipeline_class():
    """:class:`~adm_export.models.tango_pipeline.TangoPipeline`, imported on first use (torch, diffusers)."""
    from adm_export.models.tango_pipeline import TangoPipeline

    return TangoPipeline


def __getattr__(name: str):
    # ``TangoPipeline`` subclasses diffusers' DiffusionPipeline: imported on first access so that
    # importing this module does not import torch and diffusers.
    if name == "TangoPipeline":
        return _pipeline_class()
    raise AttributeError(name)


class TangoAdapter(DiffusersUNetAdapter):
    """Adapter of :class:`TangoPipeline` (TANGO, TANGO-full, TANGO 2 and the embedded tiny model)."""

    family = "tango"

    @property
    def text_len(self) -> int:
        return self.pipeline.text_len

    def denoiser_spec(self) -> TextCondSpec:
        cfg = self.pipeline.unet.config
        vocoder = self.pipeline.vocoder.config
        scale = self.pipeline.vae_scale_factor
        hop = self.vocoder_hop()
        width = vocoder.model_in_dim // scale
        cross = cfg.cross_attention_dim
        cross = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
        return TextCondSpec(
            inputs=(
                TensorSpec("sample", ("batch", cfg.in_channels, "frames", width)),
                TensorSpec("timestep", ("batch",)),
                TensorSpec("encoder_hidden_states", ("batch", self.text_len, cross)),
                TensorSpec("encoder_attention_mask", ("batch", self.text_len)),
            ),
            outputs=(TensorSpec("noise_pred", ("batch", cfg.out_channels, "frames", width)),),
            latent_frames_per_second=vocoder.sampling_rate / hop / scale,
            frame_multiple=2 ** (len(cfg.block_out_channels) - 1),
        )

    def inputs_from_call(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        sample = call_arg(args, kwargs, "sample", 0)
        states = call_arg(args, kwargs, "encoder_hidden_states", 2)
        mask = kwargs.get("encoder_attention_mask")
        if mask is None:
            mask = states.new_ones(states.shape[:2])
        return {
            "sample": sample,
            "timestep": timestep_rows(call_arg(args, kwargs, "timestep", 1), sample),
            "encoder_hidden_states": pad_tokens(states, self.text_len),
            "encoder_attention_mask": pad_tokens(mask.to(states.dtype), self.text_len),
        }

    def export_module(self, denoiser=None):
        from adm_export.models.denoisers import TangoDenoiser

        return TangoDenoiser(denoiser if denoiser is not None else self.denoiser)



    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, audio_seconds: float,
                 guidance_scale: float) -> list:
        import torch

        pipe = self.pipeline
        # One CPU generator per prompt draws its initial noise and then DDPM's step noise, so a
        # clip depends only on its prompt and seed (and the same seed gives the same clip on
        # the baseline and on the engine).
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        shape = (pipe.unet.config.in_channels, pipe.latent_frames(audio_seconds),
                 pipe.vocoder.config.model_in_dim // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(pipe.device)
        with torch.inference_mode():
            out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                       audio_length_in_s=audio_seconds, latents=latents, generator=generators, output_type="np")
        return [a.astype("float32") for a in out.audios]


# -- loading the published layout -------------------------------------------------------------------


def is_tango_folder(path: str | Path) -> bool:
    """True if ``path`` holds TANGO's published files (main config and main weights)."""
    p = Path(path)
    return (p / "main_config.json").is_file() and (p / "pytorch_model_main.bin").is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"TANGO folder {str(path.parent)!r} has no {path.name}") from None


def _torch_load(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise ModelNotFoundError(f"TANGO folder {str(path.parent)!r} has no {path.name}")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_tokenizer(folder: Path, name: str):
    from transformers import AutoTokenizer

    local = folder / "tokenizer"
    for source, kwargs in ((local, {}), (name, {"local_files_only": True})):
        if source is local and not local.is_dir():
            continue
        try:
            return AutoTokenizer.from_pretrained(str(source), **kwargs)
        except Exception as exc:  # transformers raises OSError/ValueError for missing files
            logger.debug("tokenizer from %s: %s", source, exc)
    raise ModelNotFoundError(
        f"TANGO folder {str(folder)!r}: no tokenizer for {name!r}; save it to {str(local)!r} "
        f"(AutoTokenizer.from_pretrained({name!r}).save_pretrained(...)) or put it in the Hugging Face cache"
    )


def _t5_config(folder: Path, name: str):
    from transformers import T5Config

    local = folder / "text_encoder_config.json"
    if local.is_file():
        return T5Config(**_read_json(local))
    try:
        return T5Config.from_pretrained(name, local_files_only=True)
    except Exception:  # not cached: the published FLAN-T5-large layout
        if "flan-t5-large" not in name:
            raise ModelNotFoundError(
                f"TANGO folder {str(folder)!r}: text encoder {name!r} has no local config; write its "
                f"config.json as {str(local)!r}"
            ) from None
        return T5Config(**FLAN_T5_LARGE_CONFIG)


def load_tango_folder(folder: str | Path, text_len: int | None = None, scheduler: str = "ddpm"):
    """Build a :class:`TangoPipeline` from TANGO's published checkpoint layout (see the module docstring).

    Args:
        folder: The snapshot folder.
        text_len: Fixed text length (default :data:`DEFAULT_TEXT_LEN`, at most the tokenizer's).
        scheduler: ``ddpm`` (TANGO's) or ``ddim``.

    Returns:
        The pipeline in float32 on the CPU.

    Raises:
        ModelNotFoundError: a file is missing or the weights do not match the configs.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig, T5EncoderModel

    from adm_export.models.ldm_vae import load_hifigan_weights, load_ldm_vae_weights, vae_config_from_ldm

    folder = Path(folder)
    main = _read_json(folder / "main_config.json")
    vae_cfg = _read_json(folder / "vae_config.json")
    if main.get("unet_model_name"):
        raise ModelNotFoundError(
            f"TANGO folder {str(folder)!r} was trained from a pretrained image U-Net "
            f"({main['unet_model_name']!r}, with group_in/group_out adapters), which adm-export does not support"
        )
    text_name = main.get("text_encoder_name", "google/flan-t5-large")
    unet_cfg = dict(TANGO_UNET_CONFIG)
    for candidate in (folder / Path(main.get("unet_model_config_path") or "x").name,
                      folder / "diffusion_model_config.json"):
        if candidate.is_file():
            unet_cfg = {k: v for k, v in _read_json(candidate).items() if not k.startswith("_")}
            break
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched_cfg = dict(TANGO_SCHEDULER_CONFIG)
    if sched_file.is_file():
        sched_cfg.update({k: v for k, v in _read_json(sched_file).items() if not k.startswith("_")})

    # 1. Main weights: "unet.*" in diffusers names, "text_encoder.*" in T5EncoderModel names.
    weights = _torch_load(folder / "pytorch_model_main.bin")
    unet = UNet2DConditionModel(**unet_cfg)
    text_encoder = T5EncoderModel(_t5_config(folder, text_name))
    for prefix, module in (("unet.", unet), ("text_encoder.", text_encoder)):
        part = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(part, strict=False)
        # T5EncoderModel ties encoder.embed_tokens to shared: either name may be absent.
        missing = [k for k in missing if k not in ("encoder.embed_tokens.weight", "shared.weight")]
        if missing or unexpected:
            raise ModelNotFoundError(
                f"TANGO weights do not match the {type(module).__name__} config: {len(missing)} missing "
                f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})"
            )
    other = sorted({k.split(".")[0] for k in weights} - {"unet", "text_encoder"})
    if other:
        logger.warning("TANGO main weights: ignoring %s", ", ".join(other))

    # 2. VAE (LDM names) and vocoder (AudioLDM HiFi-GAN names) from one file.
    vae_state = _torch_load(folder / "pytorch_model_vae.bin")
    ddconfig = vae_cfg["ddconfig"]
    vae = AutoencoderKL(**vae_config_from_ldm(ddconfig, vae_cfg.get("embed_dim", ddconfig["z_channels"]),
                                              vae_cfg.get("scale_factor", 1.0)))
    load_ldm_vae_weights(vae, vae_state)
    voc_cfg = dict(AUDIOLDM_HIFIGAN_CONFIG)
    voc_file = folder / "vocoder_config.json"
    if voc_file.is_file():
        voc_cfg.update(_read_json(voc_file))
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**voc_cfg))
    load_hifigan_weights(vocoder, vae_state, prefix="vocoder.")

    # 3. Tokenizer and scheduler.
    tokenizer = _load_tokenizer(folder, text_name)
    n = min(text_len or DEFAULT_TEXT_LEN, usable_length(tokenizer, 512))
    sched_cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[scheduler]
    sched = sched_cls.from_config(sched_cfg)
    for m in (unet, text_encoder, vae, vocoder):
        m.eval()
    with torch.no_grad():
        pipe = _pipeline_class()(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                             scheduler=sched, vocoder=vocoder, text_len=n)
    return pipe


def tango_state_dicts(pipe) -> dict[str, dict]:
    """The pipeline's weights in TANGO's published file layout (``main``, ``vae``).

    The inverse of :func:`load_tango_folder`'s mapping, used to write test checkpoints and to
    hand a model fine-tuned here back to the original code.
    """
    from adm_export.models.ldm_vae import hifigan_state_to_audioldm, vae_state_to_ldm

    main = {f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()}
    main.update({f"text_encoder.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()})
    vae = vae_state_to_ldm(pipe.vae)
    vae.update(hifigan_state_to_audioldm(pipe.vocoder, prefix="vocoder."))
    return {"main": main, "vae": vae}
