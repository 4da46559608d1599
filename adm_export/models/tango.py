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
from adm_export.models.conditioning import TextCondSpec, call_arg, pad_tokens, timestep_rows, usable_length

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

# Text length of the engine. FLAN-T5 allows 512 tokens; audio captions use 10-40, and every padded
# token costs cross-attention work (keys and values at every transformer), so 128, as AudioLDM2's
# published pipeline truncates the same FLAN-T5. Longer prompts are truncated at this length.
DEFAULT_TEXT_LEN = 128


def _pipeline_class():
    """``TangoPipeline`` (defined lazily: it subclasses diffusers' ``DiffusionPipeline``)."""
    global _TANGO_PIPELINE
    if _TANGO_PIPELINE is None:
        _TANGO_PIPELINE = _define_pipeline()
    return _TANGO_PIPELINE


_TANGO_PIPELINE = None


def _define_pipeline():
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.pipeline_utils import AudioPipelineOutput
    from diffusers.utils.torch_utils import randn_tensor

    class TangoPipeline(DiffusionPipeline):
        """TANGO's sampler: T5 text states and mask, CFG against the empty prompt, DDPM (or any
        diffusers scheduler), VAE decode, HiFi-GAN.

        Args:
            vae: ``AutoencoderKL`` (AudioLDM's mel VAE; ``scaling_factor`` = TANGO's ``scale_factor``).
            text_encoder: ``T5EncoderModel`` (FLAN-T5).
            tokenizer: Its tokenizer.
            unet: ``UNet2DConditionModel``.
            scheduler: ``DDPMScheduler`` (TANGO's) or another diffusers scheduler.
            vocoder: ``SpeechT5HifiGan``.
            text_len: Fixed text length (tokens) the U-Net sees.
        """

        model_cpu_offload_seq = "text_encoder->unet->vae->vocoder"

        def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, vocoder, text_len: int = DEFAULT_TEXT_LEN):
            super().__init__()
            self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                  scheduler=scheduler, vocoder=vocoder)
            self.register_to_config(text_len=int(text_len))
            self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

        @property
        def text_len(self) -> int:
            return int(self.config.text_len)

        def encode_prompt(self, prompts: list[str], guidance: bool):
            """T5 states and float mask, padded to ``text_len``; with guidance the empty-prompt rows first.

            TANGO truncates at the tokenizer's maximum and masks padding; T5's outputs at valid
            positions do not depend on how much padding follows (masked attention, relative
            positions), and the U-Net masks the rest, so padding to ``text_len`` changes nothing.
            """
            texts = ([""] * len(prompts) if guidance else []) + list(prompts)
            n = self.text_len
            batch = self.tokenizer(texts, max_length=n, padding="max_length", truncation=True, return_tensors="pt")
            ids = batch.input_ids.to(self.device)
            mask = batch.attention_mask.to(self.device)
            states = self.text_encoder(input_ids=ids, attention_mask=mask)[0]
            return pad_tokens(states, n), pad_tokens(mask.to(states.dtype), n)

        @torch.no_grad()
        def __call__(self, prompt: str | list[str], num_inference_steps: int = 100, guidance_scale: float = 3.0,
                     audio_length_in_s: float = 10.24, latents=None, generator=None, output_type: str = "np"):
            """Generate audio.

            Args:
                prompt: Prompt(s).
                num_inference_steps: Sampler steps (TANGO: 100-200 with DDPM).
                guidance_scale: Classifier-free guidance weight (TANGO: 3); <= 1 disables it.
                audio_length_in_s: Length; rounded up to whole latent frames of the U-Net.
                latents: Initial noise ``(B, C, frames, mel/scale)``; drawn from ``generator`` if None.
                generator: ``torch.Generator`` or one per prompt (also drives DDPM's step noise).
                output_type: ``"np"``, ``"pt"`` or ``"latent"``.

            Returns:
                ``AudioPipelineOutput(audios=...)``.
            """
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            guidance = guidance_scale > 1.0
            states, mask = self.encode_prompt(prompts, guidance)
            frames = self.latent_frames(audio_length_in_s)
            shape = (len(prompts), self.unet.config.in_channels, frames,
                     self.vocoder.config.model_in_dim // self.vae_scale_factor)
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=self.device, dtype=states.dtype)
            latents = latents.to(self.device) * self.scheduler.init_noise_sigma
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
            for t in self.progress_bar(self.scheduler.timesteps):
                x = torch.cat([latents] * 2) if guidance else latents
                x = self.scheduler.scale_model_input(x, t)
                noise = self.unet(x, t, encoder_hidden_states=states, encoder_attention_mask=mask,
                                  return_dict=False)[0]
                if guidance:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise, t, latents, generator=generator).prev_sample
            if output_type == "latent":
                return AudioPipelineOutput(audios=latents)
            mel = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            audio = self.vocoder(mel.squeeze(1)).float().cpu()
            audio = audio[:, : int(audio_length_in_s * self.vocoder.config.sampling_rate)]
            return AudioPipelineOutput(audios=audio.numpy() if output_type == "np" else audio)

        def latent_frames(self, seconds: float) -> int:
            """Latent frames for ``seconds``: mel frames over the VAE factor, rounded up to a multiple
            of the U-Net's downsampling (static engine shapes; the audio is trimmed afterwards)."""
            import math

            hop = float(np.prod(self.vocoder.config.upsample_rates))
            mel_frames = int(seconds * self.vocoder.config.sampling_rate / hop)
            multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)
            return max(multiple, math.ceil(mel_frames / self.vae_scale_factor / multiple) * multiple)

    return TangoPipeline


def __getattr__(name: str):
    # ``TangoPipeline`` subclasses diffusers' DiffusionPipeline: defined on first access so that
    # importing this module does not import torch and diffusers.
    if name == "TangoPipeline":
        return _pipeline_class()
    raise AttributeError(name)


class _Export:
    @staticmethod
    def make(unet):
        import torch

        class TangoDenoiser(torch.nn.Module):
            """``(sample, timestep, encoder_hidden_states, encoder_attention_mask) -> noise``."""

            def __init__(self, unet):
                super().__init__()
                self.unet = unet

            def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask):
                return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                 encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]

        return TangoDenoiser(unet)


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
        return _Export.make(denoiser if denoiser is not None else self.denoiser)



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
