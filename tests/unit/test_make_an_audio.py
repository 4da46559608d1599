"""Make-An-Audio's BigVGAN vocoder (NVIDIA's bigvgan package) and its published folder layout.

The vocoder tests write checkpoints with the names Make-An-Audio's training saves and load them
back; the folder test writes tiny-make-an-audio as a ``useful_ckpts/`` folder and runs
``adm-export generate`` and ``build`` on it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

# Make-An-Audio's configs/text_to_audio/bigvgan_args.yaml at toy width: the generator keys plus the
# training keys a real args.yml carries (which the loader must ignore).
TRAINING_KEYS = {
    "num_gpus": 0, "batch_size": 64, "learning_rate": 0.0001, "adam_b1": 0.8, "adam_b2": 0.99, "lr_decay": 0.999,
    "seed": 1234, "resolutions": [[1024, 120, 600], [2048, 240, 1200], [512, 50, 240]],
    "mpd_reshapes": [2, 3, 5, 7, 11], "use_spectral_norm": False, "discriminator_channel_mult": 1,
    "num_workers": 4, "dist_config": {"dist_backend": "nccl", "dist_url": "tcp://localhost:54341", "world_size": 1},
}
GENERATOR_KEYS = {
    "resblock": "1", "num_mels": 80, "upsample_rates": [4, 4, 2, 2, 2, 2], "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4],
    "upsample_initial_channel": 64, "resblock_kernel_sizes": [3, 7], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
    "activation": "snakebeta", "snake_logscale": True,
}


def _package_generator(seed: int = 0):
    """A weight-normed ``bigvgan.BigVGAN`` straight from the package, every parameter perturbed
    (SnakeBeta's alpha/beta start at 0 in log scale: perturbing them makes them matter)."""
    from adm_export.models.make_an_audio.vocoder import import_bigvgan

    mod = import_bigvgan()
    torch.manual_seed(seed)
    gen = mod.BigVGAN(mod.AttrDict(dict(GENERATOR_KEYS)), use_cuda_kernel=False).eval()
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return gen


def _write_make_an_audio_vocoder(gen, folder):
    folder.mkdir(parents=True)
    (folder / "args.yml").write_text(yaml.safe_dump({**GENERATOR_KEYS, **TRAINING_KEYS}))
    torch.save({"generator": gen.state_dict()}, folder / "best_netG.pt")


def test_make_an_audio_bigvgan_checkpoint_round_trips(tmp_path):
    """args.yml + best_netG.pt (weight-normed names) load into the vocoder: same waveform as the
    package module they were written from; written back, the names are Make-An-Audio's again."""
    from adm_export.models.make_an_audio.vocoder import load_bigvgan_folder, save_bigvgan_folder

    gen = _package_generator()
    names = set(gen.state_dict())
    # The names Make-An-Audio's training saves (BigVGAN v1 = the package's layout).
    for name in ("conv_pre.weight_g", "conv_pre.weight_v", "ups.0.0.weight_v", "resblocks.0.convs1.0.weight_g",
                 "resblocks.0.activations.0.act.beta", "resblocks.0.activations.0.upsample.filter",
                 "activation_post.downsample.lowpass.filter", "conv_post.bias"):
        assert name in names, name
    _write_make_an_audio_vocoder(gen, tmp_path / "bigvgan")
    vocoder = load_bigvgan_folder(tmp_path / "bigvgan")
    assert vocoder.config.sampling_rate == 16000 and vocoder.config.hop_length == 256
    assert vocoder.config.model_in_dim == 80

    mel = torch.randn(2, 80, 23, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = gen(mel).squeeze(1)
        out = vocoder(mel.transpose(1, 2))  # the vocoder takes (B, frames, mels)
    assert out.shape == (2, 23 * 256)
    assert float((out - ref).abs().max()) < 1e-6
    assert float(ref.std()) > 1e-3  # a real signal, not a constant the comparison would pass on

    save_bigvgan_folder(vocoder, tmp_path / "written")
    written = torch.load(tmp_path / "written" / "best_netG.pt", weights_only=True)["generator"]
    assert set(written) == names
    again = load_bigvgan_folder(tmp_path / "written")
    with torch.no_grad():
        assert float((again(mel.transpose(1, 2)) - ref).abs().max()) < 1e-5


def test_bigvgan_weights_that_do_not_fit_name_the_folder(tmp_path):
    from adm_export.errors import ModelNotFoundError
    from adm_export.models.make_an_audio.vocoder import load_bigvgan_folder

    gen = _package_generator()
    _write_make_an_audio_vocoder(gen, tmp_path / "bigvgan")
    args = yaml.safe_load((tmp_path / "bigvgan" / "args.yml").read_text())
    (tmp_path / "bigvgan" / "args.yml").write_text(yaml.safe_dump({**args, "upsample_initial_channel": 128}))
    with pytest.raises(ModelNotFoundError, match="do not match the config"):
        load_bigvgan_folder(tmp_path / "bigvgan")
    (tmp_path / "bigvgan" / "args.yml").write_text(yaml.safe_dump({**args, "upsample_initial_channel": 32}))
    with pytest.raises(ModelNotFoundError, match="leaves no channel"):
        load_bigvgan_folder(tmp_path / "bigvgan")
    (tmp_path / "bigvgan" / "args.yml").unlink()
    with pytest.raises(ModelNotFoundError, match="args.yml or config.json"):
        load_bigvgan_folder(tmp_path / "bigvgan")


def test_published_bigvgan_config_builds_the_112m_generator():
    """Make-An-Audio's bigvgan_args.yaml gives BigVGAN-base (112 M parameters), on the meta device."""
    from adm_export.models.make_an_audio.vocoder import MAKE_AN_AUDIO_BIGVGAN_CONFIG, import_bigvgan

    mod = import_bigvgan()
    with torch.device("meta"):
        gen = mod.BigVGAN(mod.AttrDict(dict(MAKE_AN_AUDIO_BIGVGAN_CONFIG)))
    shapes = {k: tuple(v.shape) for k, v in gen.state_dict().items()}
    assert shapes["conv_pre.weight_v"] == (1536, 80, 7)
    assert shapes["ups.5.0.weight_v"] == (48, 24, 4)
    assert shapes["resblocks.17.convs2.2.weight_v"] == (24, 24, 11)
    assert 112e6 < sum(v.numel() for v in gen.state_dict().values()) < 112.5e6


def test_bigvgan_vocoder_exports_to_onnx_with_parity(tmp_path):
    """The vocoder as the bundle exports it (an nn.Module mel -> waveform, TorchScript exporter):
    dynamic batch and frames, ONNX Runtime CPU equal to torch; no CUDA-kernel activation inside."""
    import onnxruntime as ort

    from adm_export.models.make_an_audio.tiny import TINY_MAKE_AN_AUDIO_BIGVGAN_CONFIG
    from adm_export.models.make_an_audio.vocoder import build_bigvgan

    torch.manual_seed(0)
    vocoder = build_bigvgan(TINY_MAKE_AN_AUDIO_BIGVGAN_CONFIG)
    assert vocoder.generator.h["use_cuda_kernel"] is False
    assert not [m for m in vocoder.modules() if ".cuda" in type(m).__module__]
    path = tmp_path / "vocoder.onnx"
    mel = torch.randn(2, 20, 80)
    torch.onnx.export(vocoder, (mel,), str(path), input_names=["mel"], output_names=["waveform"], opset_version=17,
                      dynamic_axes={"mel": {0: "batch", 1: "frames"}, "waveform": {0: "batch", 1: "samples"}},
                      dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, frames in ((2, 20), (1, 37)):
        x = torch.randn(batch, frames, 80, generator=torch.Generator().manual_seed(frames))
        with torch.no_grad():
            ref = vocoder(x).numpy()
        got = session.run(None, {"mel": x.numpy()})[0]
        assert got.shape == ref.shape == (batch, frames * 256)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_bigvgan_imports_without_librosa():
    """The generator imports without the package's librosa data loader (how it runs where only the
    bigvgan wheel was installed with --no-deps), and the loader's stand-in does not linger."""
    code = (
        "import sys; sys.modules['librosa'] = None\n"  # importing librosa now raises ImportError
        "from adm_export.models.make_an_audio.vocoder import import_bigvgan\n"
        "mod = import_bigvgan(); import bigvgan\n"
        "assert bigvgan.BigVGAN is mod.BigVGAN\n"
        "assert 'bigvgan.meldataset' not in sys.modules\n"
        "print('ok', mod.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok bigvgan.bigvgan" in result.stdout


def test_missing_bigvgan_names_the_install(monkeypatch):
    from adm_export.errors import MissingDependencyError
    from adm_export.models.make_an_audio.vocoder import import_bigvgan

    monkeypatch.setitem(sys.modules, "bigvgan", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"--no-deps 'bigvgan==2\.4\.1'.*adm-export\[make-an-audio\]"):
        import_bigvgan()


def test_tiny_make_an_audio_decodes_with_the_bigvgan_package():
    """tiny-make-an-audio's vocoder is NVIDIA's BigVGAN (SnakeBeta, anti-aliased activations)."""
    from adm_export.models import load_model

    vocoder = load_model("tiny-make-an-audio").pipeline.vocoder
    kinds = {type(m).__module__ + "." + type(m).__name__ for m in vocoder.modules()}
    assert "bigvgan.bigvgan.BigVGAN" in kinds and "bigvgan.activations.SnakeBeta" in kinds
    assert "bigvgan.alias_free_activation.torch.act.Activation1d" in kinds


# ------------------------------------------------------------------------------------------------
# The published folder layout (--model DIR)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def maa_folder(tmp_path_factory):
    """tiny-make-an-audio written as Make-An-Audio's useful_ckpts/ folder; (folder, original pipeline)."""
    from adm_export.models.make_an_audio import save_make_an_audio_folder
    from adm_export.models.make_an_audio.tiny import build_tiny_make_an_audio, tiny_make_an_audio_config

    pipe = build_tiny_make_an_audio(seed=0)
    folder = save_make_an_audio_folder(pipe, tmp_path_factory.mktemp("maa") / "useful_ckpts",
                                       tiny_make_an_audio_config())
    return folder, pipe


def test_make_an_audio_folder_loads_by_path(maa_folder):
    from adm_export.models import load_model
    from adm_export.models.make_an_audio import MakeAnAudioAdapter

    folder, pipe = maa_folder
    assert sorted(p.name for p in folder.iterdir()) == ["bigvgan", "maa1_full.ckpt", "tokenizer",
                                                        "txt2audio_args.yaml"]
    assert sorted(p.name for p in (folder / "bigvgan").iterdir()) == ["args.yml", "best_netG.pt"]
    adapter = load_model(str(folder))
    assert adapter.family == "make_an_audio"
    a = adapter.generate(["birds chirp"], [2], 2, 1.0, 3.0)[0]
    b = MakeAnAudioAdapter("orig", pipe).generate(["birds chirp"], [2], 2, 1.0, 3.0)[0]
    assert a.shape == (16000,) and float(np.abs(b).max()) > 1e-3
    assert float(np.abs(a - b).max()) < 1e-5


def test_make_an_audio_folder_without_vocoder_is_one_line(maa_folder, tmp_path):
    import shutil

    from click.testing import CliRunner

    from adm_export.cli import cli

    folder, _ = maa_folder
    broken = tmp_path / "useful_ckpts"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "bigvgan")
    result = CliRunner().invoke(cli, ["generate", "--model", str(broken), "-p", "x", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "bigvgan" in lines[0] and "args.yml" in lines[0], result.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_make_an_audio_folder_generates_and_builds(maa_folder, tmp_path):
    """``adm-export generate`` and ``build`` (calibrate, quantize, export, engine) on the folder."""
    from click.testing import CliRunner

    from adm_export.cli import cli

    folder, _ = maa_folder
    runner = CliRunner()
    gen = runner.invoke(cli, ["--quiet", "generate", "--model", str(folder), "-p", "a dog barks", "--steps", "2",
                              "--seconds", "1", "-o", str(tmp_path / "gen")])
    assert gen.exit_code == 0, gen.output + repr(gen.exception)
    assert list((tmp_path / "gen").rglob("*.wav"))
    out = tmp_path / "build"
    build = runner.invoke(cli, ["--quiet", "build", "--model", str(folder), "--out", str(out), "--num-prompts", "2",
                                "--steps", "2", "--points", "2", "--seconds", "1.28", "--no-eval"])
    assert build.exit_code == 0, build.output + repr(build.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["id"] == str(folder)
    assert json.loads((out / "onnx" / "manifest.json").read_text())["parity"]["passed"] is True
