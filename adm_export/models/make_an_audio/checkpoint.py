"""Make-An-Audio's published files: the LDM checkpoint, its folder layout, and writing them back.

A Make-An-Audio folder (``--model DIR``) is the original repository's ``useful_ckpts/``::

    DIR/
    ├── maa1_full.ckpt            Lightning checkpoint: U-Net, VAE, CLAP text tower, scale_factor
    ├── bigvgan/                  the vocoder: args.yml + best_netG.pt
    ├── CLAP/CLAP_weights_2022.pth  only needed when the checkpoint holds no text-encoder weights
    ├── tokenizer/                bert-base-uncased's tokenizer (and config.json), as save_pretrained writes it;
    │                             optional when it is in the Hugging Face cache
    └── txt2audio_args.yaml       optional: the model config (configs/text_to_audio/); default: the published one
"""

from __future__ import annotations

import logging
from pathlib import Path

from adm_export.errors import ModelNotFoundError
from adm_export.models.make_an_audio.config import CLAP_TEXT_MODEL, MODEL_CONFIG_FILE, MakeAnAudioConfig

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.caption_encoder."
CHECKPOINT_FILE = "maa1_full.ckpt"
VOCODER_DIR = "bigvgan"
CLAP_WEIGHTS = Path("CLAP") / "CLAP_weights_2022.pth"
TOKENIZER_DIR = "tokenizer"


def _vocoder_for(ckpt: Path, vocoder_dir, vocoder):
    """The vocoder module: given, from ``vocoder_dir``, or from ``bigvgan/`` beside the checkpoint."""
    from adm_export.models.make_an_audio.vocoder import is_bigvgan_folder, load_bigvgan_folder

    if vocoder is not None:
        return vocoder
    if vocoder_dir is not None:
        return load_bigvgan_folder(vocoder_dir)
    beside = ckpt.parent / VOCODER_DIR
    if is_bigvgan_folder(beside):
        return load_bigvgan_folder(beside)
    raise ModelNotFoundError(
        f"Make-An-Audio checkpoint {str(ckpt)!r} needs its BigVGAN vocoder: pass vocoder_dir=<Make-An-Audio's "
        f"useful_ckpts/bigvgan folder (args.yml + best_netG.pt)> or put that folder at {str(beside)!r}")


def load_make_an_audio_checkpoint(ckpt: str | Path, vocoder_dir: str | Path | None = None, *,
                                  config: MakeAnAudioConfig | None = None, vocoder=None, tokenizer=None,
                                  clap_weights: str | Path | None = None, bert_config=None):
    """Build a :class:`~adm_export.models.make_an_audio.pipeline.MakeAnAudioPipeline` from a
    published LDM checkpoint (``maa1_full.ckpt``) and its BigVGAN vocoder.

    Args:
        ckpt: The Lightning checkpoint (``{"state_dict": ...}``) with ``model.diffusion_model.*``,
            ``first_stage_model.*``, ``scale_factor`` and (usually) ``cond_stage_model.*``.
        vocoder_dir: Make-An-Audio's ``useful_ckpts/bigvgan`` (``args.yml`` + ``best_netG.pt``);
            default: ``bigvgan/`` beside the checkpoint.
        config: The architecture (default: the published one).
        vocoder: A module mapping mel ``(B, T, 80)`` to waveform, instead of ``vocoder_dir``.
        tokenizer: BERT tokenizer; default: ``tokenizer/`` beside the checkpoint, else the
            ``bert-base-uncased`` tokenizer from the Hugging Face cache.
        clap_weights: ``CLAP_weights_2022.pth`` when the checkpoint holds no text-encoder weights.
        bert_config: ``BertConfig`` of the text tower; default: ``tokenizer/config.json`` beside
            the checkpoint if present, else bert-base-uncased's.

    Returns:
        The pipeline in float32 on the CPU.

    Raises:
        ModelNotFoundError: a missing part (vocoder, checkpoint, tokenizer, text weights) or
            mismatched weights.
        MissingDependencyError: NVIDIA's ``bigvgan`` is not installed.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import BertConfig

    from adm_export.models.ldm_vae import load_ldm_vae_weights, vae_config_from_ldm
    from adm_export.models.make_an_audio.pipeline import MakeAnAudioPipeline
    from adm_export.models.make_an_audio.text import ClapTextEncoder
    from adm_export.models.make_an_audio.unet import UNetModel

    ckpt = Path(ckpt)
    config = config or MakeAnAudioConfig()
    # 1. The vocoder first: a missing one fails before reading a multi-GB checkpoint.
    vocoder = _vocoder_for(ckpt, vocoder_dir, vocoder)
    if not ckpt.is_file():
        raise ModelNotFoundError(f"no Make-An-Audio checkpoint at {str(ckpt)!r}")
    raw = torch.load(str(ckpt), map_location="cpu", weights_only=False)
    state = raw.get("state_dict", raw)

    # 2. U-Net: names as in the checkpoint, prefix removed.
    unet = UNetModel(**config.unet)
    _load_strict(unet, {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}, "U-Net")

    # 3. VAE: LDM names onto diffusers' AutoencoderKL; latent scale from the diffusion model.
    scale = float(torch.as_tensor(state.get("scale_factor", 1.0)))
    ddconfig = config.vae_ddconfig
    vae = AutoencoderKL(**vae_config_from_ldm(ddconfig, ddconfig["z_channels"], scale))
    load_ldm_vae_weights(vae, state, prefix=VAE_PREFIX)

    # 4. Text encoder: from the checkpoint, else from MS-CLAP's own weights file.
    text_state = {k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    if not text_state and clap_weights is not None:
        clap = torch.load(str(clap_weights), map_location="cpu", weights_only=False)
        clap = clap.get("model", clap)
        text_state = {k[len("caption_encoder."):]: v for k, v in clap.items() if k.startswith("caption_encoder.")}
    if not text_state:
        raise ModelNotFoundError(
            f"{str(ckpt)!r} holds no text-encoder weights ({TEXT_PREFIX}*); pass clap_weights=CLAP_weights_2022.pth"
        )
    if bert_config is None:
        local = ckpt.parent / TOKENIZER_DIR / "config.json"
        bert_config = BertConfig.from_json_file(str(local)) if local.is_file() else BertConfig()
    # The CLAP projection's width is the U-Net's context width (1024 published).
    text_encoder = ClapTextEncoder(bert_config, int(config.unet["context_dim"]))
    # Older transformers saved BERT's position_ids buffer; it is not a weight.
    text_state = {k: v for k, v in text_state.items() if not k.endswith("position_ids")}
    _load_strict(text_encoder, text_state, "CLAP text encoder", optional=("base.pooler.",))

    # 5. Tokenizer and sampler; the audio format is the vocoder's.
    if tokenizer is None:
        tokenizer = _bert_tokenizer(ckpt.parent)
    audio = getattr(vocoder, "config", None)
    fmt = {} if audio is None or not hasattr(audio, "hop_length") else {
        "sampling_rate": audio.sampling_rate, "hop_length": audio.hop_length, "mel_bins": audio.model_in_dim}
    return MakeAnAudioPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                               tokenizer=tokenizer, scheduler=DDIMScheduler(**config.scheduler), vocoder=vocoder,
                               **fmt)


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

    for source, kwargs in ((folder / TOKENIZER_DIR, {}), (CLAP_TEXT_MODEL, {"local_files_only": True})):
        if isinstance(source, Path) and not source.is_dir():
            continue
        try:
            return AutoTokenizer.from_pretrained(str(source), **kwargs)
        except Exception as exc:  # missing files: OSError / ValueError
            logger.debug("tokenizer from %s: %s", source, exc)
    raise ModelNotFoundError(
        f"no {CLAP_TEXT_MODEL} tokenizer: save it to {str(folder / TOKENIZER_DIR)!r} or put it in the Hugging Face "
        f"cache"
    )


# -- the folder layout (--model DIR) --------------------------------------------------------------


def is_make_an_audio_folder(path: str | Path) -> bool:
    """True if ``path`` looks like Make-An-Audio's ``useful_ckpts/`` (a ``*.ckpt`` at its top)."""
    return any(Path(path).glob("*.ckpt"))


def load_make_an_audio_folder(path: str | Path):
    """Load a Make-An-Audio folder (layout in this module's docstring) as a pipeline.

    Raises:
        ModelNotFoundError: a part is missing; the message names the file or folder to add.
    """
    from adm_export.models.make_an_audio.vocoder import is_bigvgan_folder

    path = Path(path)
    ckpts = sorted(path.glob("*.ckpt"))
    ckpt = path / CHECKPOINT_FILE if (path / CHECKPOINT_FILE).is_file() else (ckpts[0] if len(ckpts) == 1 else None)
    if ckpt is None:
        raise ModelNotFoundError(f"--model {str(path)!r} holds several checkpoints "
                                 f"({', '.join(p.name for p in ckpts)}); keep one or name it {CHECKPOINT_FILE}")
    vocoder_dir = path / VOCODER_DIR
    if not is_bigvgan_folder(vocoder_dir):
        raise ModelNotFoundError(
            f"--model {str(path)!r} (a Make-An-Audio folder) has no BigVGAN vocoder: copy Make-An-Audio's "
            f"useful_ckpts/bigvgan (args.yml + best_netG.pt) to {str(vocoder_dir)!r}")
    model_config = path / MODEL_CONFIG_FILE
    config = MakeAnAudioConfig.from_yaml(model_config) if model_config.is_file() else None
    clap = path / CLAP_WEIGHTS
    return load_make_an_audio_checkpoint(ckpt, vocoder_dir, config=config,
                                         clap_weights=clap if clap.is_file() else None)


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


def save_make_an_audio_folder(pipe, folder: str | Path, config: MakeAnAudioConfig) -> Path:
    """Write ``pipe`` as a Make-An-Audio folder that :func:`load_make_an_audio_folder` reads back.

    Args:
        pipe: A pipeline whose vocoder is a :class:`~adm_export.models.make_an_audio.vocoder.BigVGANVocoder`.
        folder: Where to write (created).
        config: ``pipe``'s architecture (written as ``txt2audio_args.yaml``).

    Returns:
        ``folder``.
    """
    import torch

    from adm_export.models.make_an_audio.vocoder import save_bigvgan_folder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": make_an_audio_state_dict(pipe)}, folder / CHECKPOINT_FILE)
    config.to_yaml(folder / MODEL_CONFIG_FILE)
    save_bigvgan_folder(pipe.vocoder, folder / VOCODER_DIR)
    pipe.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    pipe.text_encoder.base.config.to_json_file(str(folder / TOKENIZER_DIR / "config.json"))
    return folder
