"""Make-An-Audio's vocoder: BigVGAN through NVIDIA's ``bigvgan`` package (PyPI, 2.4.x).

Make-An-Audio decodes its 80-bin mels with a BigVGAN (SnakeBeta activations, anti-aliased
resampling) trained at 16 kHz, hop 256; the published files are ``useful_ckpts/bigvgan/args.yml``
(its training arguments, the generator's keys among them) and ``best_netG.pt``
(``{"generator": state_dict}``). Its generator code is BigVGAN v1's, which NVIDIA's package keeps
with the same parameter and buffer names and the same config keys, so the checkpoint loads into
``bigvgan.BigVGAN`` as it is; what differs is only the file names (``args.yml``/``best_netG.pt``
against the package's ``config.json``/``bigvgan_generator.pt``, both read here) and two keys the
package added later (``use_bias_at_final``, ``use_tanh_at_final``) whose defaults are v1's behaviour.

Two adaptations, both numerically identical to the package's module (tested):

* The weight norm is folded into the weights after loading (what BigVGAN's own ``inference.py``
  does): faster, deep-copyable, and the ONNX graph holds plain convolutions.
* The anti-aliased activations' resamplers read their channel count from the input's shape
  (``filter.expand(C, -1, -1)``), which the TorchScript ONNX exporter cannot export ("convolution
  for kernel of unknown shape", pytorch#98497). :class:`StaticUpSample1d` /
  :class:`StaticLowPassFilter1d` hold the same filter expanded to the (fixed) channel count.

The anti-aliased activation's CUDA kernel is never used (``use_cuda_kernel=False``): it needs nvcc
at run time and cannot be exported; the torch path runs on any device.

Installing: ``pip install --no-deps "bigvgan==2.4.1"``. The wheel declares its training
dependencies (librosa, tensorboard, auraloss, nnaudio, pesq built from source, ...: 21 packages,
~310 MB, 24 s here); the generator imports only torch, huggingface_hub, matplotlib and scipy, all
adm-export dependencies. Its package ``__init__`` also imports the training data loader
(``meldataset``, which needs librosa): when librosa is absent, :func:`import_bigvgan` imports the
generator module without the package ``__init__``, giving the data loader's one constant the
generator's ``utils`` reads (``MAX_WAV_VALUE``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import sys
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adm_export.devices import PlacedModule
from adm_export.errors import MissingDependencyError, ModelNotFoundError
from adm_export.models.make_an_audio.config import SAMPLING_RATE

INSTALL_HINT = ("pip install --no-deps 'bigvgan==2.4.1' (the generator needs nothing else), or "
                "pip install 'adm-export[make-an-audio]' (with bigvgan's training dependencies)")

# configs/text_to_audio/bigvgan_args.yaml: the generator's keys (the rest configures training).
MAKE_AN_AUDIO_BIGVGAN_CONFIG = {
    "resblock": "1",
    "num_mels": 80,
    "upsample_rates": [4, 4, 2, 2, 2, 2],
    "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4],
    "upsample_initial_channel": 1536,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "activation": "snakebeta",
    "snake_logscale": True,
}
_OPTIONAL_KEYS = ("use_bias_at_final", "use_tanh_at_final", "sampling_rate", "hop_size")
# Folder layouts: Make-An-Audio's first, then the bigvgan package's own (save_pretrained).
CONFIG_FILES = ("args.yml", "config.json")
WEIGHT_FILES = ("best_netG.pt", "bigvgan_generator.pt")
# The value of bigvgan.meldataset.MAX_WAV_VALUE (int16 peak), the only name bigvgan.utils takes from it.
_MAX_WAV_VALUE = 32767.0


def import_bigvgan() -> types.ModuleType:
    """The ``bigvgan.bigvgan`` module of NVIDIA's package (``BigVGAN``, ``AttrDict``).

    Raises:
        MissingDependencyError: the package (or a module its generator imports) is not installed.
    """
    if importlib.util.find_spec("bigvgan") is None:
        raise MissingDependencyError(f"Make-An-Audio's vocoder needs NVIDIA's bigvgan package: {INSTALL_HINT}")
    try:
        if "bigvgan" in sys.modules or importlib.util.find_spec("librosa") is not None:
            return importlib.import_module("bigvgan.bigvgan")
        return _import_generator_only()
    except ImportError as exc:
        raise MissingDependencyError(
            f"NVIDIA's bigvgan generator could not be imported ({exc}); {INSTALL_HINT}") from exc


def _import_generator_only() -> types.ModuleType:
    # The package object without running its __init__ (which imports the librosa data loader);
    # its submodules then import from their files as usual.
    spec = importlib.util.find_spec("bigvgan")
    package = importlib.util.module_from_spec(spec)
    sys.modules["bigvgan"] = package
    shim = types.ModuleType("bigvgan.meldataset")
    shim.MAX_WAV_VALUE = _MAX_WAV_VALUE
    sys.modules["bigvgan.meldataset"] = shim
    try:
        module = importlib.import_module("bigvgan.bigvgan")
    except BaseException:
        sys.modules.pop("bigvgan", None)
        raise
    finally:
        # A later "import bigvgan.meldataset" gets the real module (or librosa's ImportError).
        if sys.modules.get("bigvgan.meldataset") is shim:
            del sys.modules["bigvgan.meldataset"]
    # What the package __init__ would export first (`from .bigvgan import *`).
    for name in ("BigVGAN", "AMPBlock1", "AMPBlock2", "load_hparams_from_json"):
        setattr(package, name, getattr(module, name))
    return module


class StaticUpSample1d(nn.Module):
    """bigvgan's ``UpSample1d`` with its filter expanded to a fixed channel count (exportable).

    Same computation: replicate-pad, depthwise transposed convolution with the Kaiser-sinc filter
    (times the ratio), crop. Keeps the ``filter`` buffer, so state-dict names are unchanged.
    """

    def __init__(self, upsample: nn.Module, channels: int):
        super().__init__()
        self.ratio, self.stride, self.pad = upsample.ratio, upsample.stride, upsample.pad
        self.pad_left, self.pad_right = upsample.pad_left, upsample.pad_right
        self.register_buffer("filter", upsample.filter.detach().clone())
        self.register_buffer("weight", upsample.filter.detach().expand(channels, -1, -1).clone(), persistent=False)

    def forward(self, x):
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        x = self.ratio * F.conv_transpose1d(x, self.weight, stride=self.stride, groups=self.weight.shape[0])
        return x[..., self.pad_left: -self.pad_right]


class StaticLowPassFilter1d(nn.Module):
    """bigvgan's ``LowPassFilter1d`` (the downsampler) with its filter expanded to a fixed channel count."""

    def __init__(self, lowpass: nn.Module, channels: int):
        super().__init__()
        self.stride, self.padding, self.padding_mode = lowpass.stride, lowpass.padding, lowpass.padding_mode
        self.pad_left, self.pad_right = lowpass.pad_left, lowpass.pad_right
        self.register_buffer("filter", lowpass.filter.detach().clone())
        self.register_buffer("weight", lowpass.filter.detach().expand(channels, -1, -1).clone(), persistent=False)

    def forward(self, x):
        if self.padding:
            x = F.pad(x, (self.pad_left, self.pad_right), mode=self.padding_mode)
        return F.conv1d(x, self.weight, stride=self.stride, groups=self.weight.shape[0])


def _static_resamplers(generator: nn.Module) -> None:
    act_module = importlib.import_module("bigvgan.alias_free_activation.torch.act")
    for module in generator.modules():
        if isinstance(module, act_module.Activation1d):
            channels = int(module.act.alpha.numel())  # Snake/SnakeBeta: one alpha per channel
            module.upsample = StaticUpSample1d(module.upsample, channels)
            module.downsample.lowpass = StaticLowPassFilter1d(module.downsample.lowpass, channels)


def _fold_weight_norm(generator: nn.Module) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Removing weight norm..."
        generator.remove_weight_norm()


class BigVGANVocoder(PlacedModule, nn.Module):
    """Mel ``(B, frames, num_mels)`` -> waveform ``(B, frames * hop)`` through a ``bigvgan.BigVGAN``.

    The mel layout of the other families' vocoders (diffusers' ``SpeechT5HifiGan``), so the
    pipeline and the ONNX export treat every vocoder alike. ``config`` carries ``sampling_rate``,
    ``model_in_dim``, ``upsample_rates`` and ``hop_length``.

    Args:
        generator: The ``bigvgan.BigVGAN`` (weight norm folded, static resamplers).
        hparams: Its generator config (``args.yml`` keys).
        sampling_rate: Output rate in Hz.
    """

    def __init__(self, generator: nn.Module, hparams: Mapping[str, Any], sampling_rate: int):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.generator = generator
        self.hparams = dict(hparams)
        rates = [int(r) for r in hparams["upsample_rates"]]
        hop = 1
        for r in rates:
            hop *= r
        self.config = FrozenDict(sampling_rate=int(sampling_rate), model_in_dim=int(hparams["num_mels"]),
                                 upsample_rates=rates, hop_length=hop)

    def forward(self, mel):
        return self.generator(mel.transpose(1, 2)).squeeze(1)


def _hparams(config: Mapping[str, Any], source: str):
    missing = [k for k in MAKE_AN_AUDIO_BIGVGAN_CONFIG if k not in config]
    if missing:
        raise ModelNotFoundError(f"BigVGAN config {source} lacks {', '.join(missing)}")
    if config["activation"] not in ("snake", "snakebeta") or str(config["resblock"]) not in ("1", "2"):
        raise ModelNotFoundError(f"BigVGAN config {source}: activation {config['activation']!r} / resblock "
                                 f"{config['resblock']!r} not supported (snake|snakebeta, 1|2)")
    keep = {k: config[k] for k in (*MAKE_AN_AUDIO_BIGVGAN_CONFIG, *_OPTIONAL_KEYS) if k in config}
    keep["resblock"] = str(keep["resblock"])
    hop = 1
    for r in keep["upsample_rates"]:
        hop *= int(r)
    if int(keep["upsample_initial_channel"]) >> len(keep["upsample_rates"]) < 1 or \
            len(keep["upsample_rates"]) != len(keep["upsample_kernel_sizes"]):
        raise ModelNotFoundError(f"BigVGAN config {source}: upsample_initial_channel "
                                 f"{keep['upsample_initial_channel']} halved at each of {len(keep['upsample_rates'])} "
                                 f"upsample_rates (one kernel size each) leaves no channel")
    if "hop_size" in keep and int(keep["hop_size"]) != hop:
        raise ModelNotFoundError(f"BigVGAN config {source}: hop_size {keep['hop_size']} != product of "
                                 f"upsample_rates {hop}")
    return keep


def _new_generator(mod: types.ModuleType, hparams: Mapping[str, Any]) -> nn.Module:
    with warnings.catch_warnings():
        # The package builds with torch.nn.utils.weight_norm, deprecated in torch 2.x (FutureWarning).
        warnings.simplefilter("ignore", FutureWarning)
        return mod.BigVGAN(mod.AttrDict(hparams), use_cuda_kernel=False)


def build_bigvgan(config: Mapping[str, Any], state: Mapping[str, Any] | None = None,
                  source: str = "(given)") -> BigVGANVocoder:
    """A :class:`BigVGANVocoder` built from a generator config, with ``state``'s weights if given.

    Args:
        config: Generator keys of ``args.yml``/``config.json`` (others are ignored);
            ``sampling_rate`` defaults to Make-An-Audio's 16 kHz (its ``args.yml`` has none).
        state: The generator's state dict, with weight norm (``*.weight_g``/``*.weight_v``, as
            training saves it) or without (``*.weight``); None keeps the seeded initialisation.
        source: Where the config came from, for error messages.

    Raises:
        ModelNotFoundError: a config key is missing or unsupported, or ``state`` does not fit.
        MissingDependencyError: NVIDIA's ``bigvgan`` is not installed.
    """
    mod = import_bigvgan()
    hparams = _hparams(config, source)
    generator = _new_generator(mod, hparams)
    if state is not None and not any(k.endswith(".weight_g") for k in state):
        _fold_weight_norm(generator)  # a checkpoint saved after folding: load into the folded layout
    if state is not None:
        try:
            missing, unexpected = generator.load_state_dict(dict(state), strict=False)
        except RuntimeError as exc:  # shape mismatches raise even with strict=False
            raise ModelNotFoundError(f"BigVGAN weights {source} do not match the config: "
                                     f"{str(exc).splitlines()[-1].strip()[:300]}") from exc
        if missing or unexpected:
            raise ModelNotFoundError(
                f"BigVGAN weights {source} do not match the config: {len(missing)} missing "
                f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    if any(k.endswith(".weight_g") for k in generator.state_dict()):
        _fold_weight_norm(generator)
    _static_resamplers(generator)
    generator.eval().requires_grad_(False)
    return BigVGANVocoder(generator, hparams, int(hparams.get("sampling_rate", SAMPLING_RATE))).eval()


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def is_bigvgan_folder(folder: str | Path) -> bool:
    """True if ``folder`` holds a BigVGAN config and generator weights (either layout)."""
    folder = Path(folder)
    return _find(folder, CONFIG_FILES) is not None and _find(folder, WEIGHT_FILES) is not None


def load_bigvgan_folder(folder: str | Path) -> BigVGANVocoder:
    """Load a BigVGAN folder: Make-An-Audio's ``useful_ckpts/bigvgan`` (``args.yml`` +
    ``best_netG.pt``) or the bigvgan package's own (``config.json`` + ``bigvgan_generator.pt``).

    Raises:
        ModelNotFoundError: a file is missing or does not match (the message names the folder).
        MissingDependencyError: NVIDIA's ``bigvgan`` is not installed.
    """
    import yaml

    folder = Path(folder)
    config_file, weights = _find(folder, CONFIG_FILES), _find(folder, WEIGHT_FILES)
    if config_file is None or weights is None:
        raise ModelNotFoundError(
            f"{str(folder)!r} is not a BigVGAN folder: it needs {' or '.join(CONFIG_FILES)} and "
            f"{' or '.join(WEIGHT_FILES)} (Make-An-Audio's useful_ckpts/bigvgan)")
    try:
        config = yaml.safe_load(config_file.read_text())  # YAML is a superset of the JSON here
        ckpt = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # YAML errors, unpickling errors, truncated files
        raise ModelNotFoundError(f"could not read BigVGAN folder {str(folder)!r}: "
                                 f"{str(exc).splitlines()[0][:200]}") from exc
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{str(config_file)!r} is not a BigVGAN config (a mapping of keys)")
    state = ckpt.get("generator", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ModelNotFoundError(f"{str(weights)!r} holds no generator state dict")
    return build_bigvgan(config, state, source=repr(str(folder)))


def make_an_audio_vocoder_state(vocoder: BigVGANVocoder) -> dict:
    """The generator's weights under the names Make-An-Audio's training saves (with weight norm).

    Each folded ``weight`` ``w`` becomes ``weight_v = w`` and ``weight_g = ||w||`` (per output
    channel, as ``torch.nn.utils.weight_norm`` keeps them), so ``g * v / ||v||`` gives ``w`` back.
    """
    mod = import_bigvgan()
    names = _new_generator(mod, vocoder.hparams).state_dict().keys()
    folded = vocoder.generator.state_dict()
    out = {}
    for name in names:
        if name.endswith(".weight_v"):
            out[name] = folded[name[: -len("_v")]].clone()
        elif name.endswith(".weight_g"):
            out[name] = torch.norm_except_dim(folded[name[: -len("_g")]], 2, 0).clone()
        else:
            out[name] = folded[name].clone()
    return out


def save_bigvgan_folder(vocoder: BigVGANVocoder, folder: str | Path) -> None:
    """Write ``vocoder`` in Make-An-Audio's layout: ``args.yml`` and ``best_netG.pt`` (``{"generator": ...}``)."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**vocoder.hparams, "sampling_rate": vocoder.config.sampling_rate}
    (folder / CONFIG_FILES[0]).write_text(yaml.safe_dump(config, sort_keys=False))
    torch.save({"generator": make_an_audio_vocoder_state(vocoder)}, folder / WEIGHT_FILES[0])
