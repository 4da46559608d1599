"""Embedders: weight-free log-mel features, PANNs Cnn14 / VGGish name compatibility and loading."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from adm_export import audio
from adm_export.errors import InvalidInputError
from adm_export.eval import embedders as E
from adm_export.eval.embedders import registry

SR = 16000

#: Names and shapes of the public Cnn14_16k_mAP=0.438.pth state dict (a sample).
PANNS_PUBLIC_KEYS = {
    "spectrogram_extractor.stft.conv_real.weight": (257, 1, 512),
    "spectrogram_extractor.stft.conv_imag.weight": (257, 1, 512),
    "logmel_extractor.melW": (257, 64),
    "bn0.weight": (64,),
    "bn0.running_var": (64,),
    "conv_block1.conv1.weight": (64, 1, 3, 3),
    "conv_block1.conv2.weight": (64, 64, 3, 3),
    "conv_block1.bn1.running_mean": (64,),
    "conv_block3.bn2.bias": (256,),
    "conv_block6.conv1.weight": (2048, 1024, 3, 3),
    "conv_block6.conv2.weight": (2048, 2048, 3, 3),
    "conv_block6.bn2.weight": (2048,),
    "fc1.weight": (2048, 2048),
    "fc1.bias": (2048,),
    "fc_audioset.weight": (527, 2048),
    "fc_audioset.bias": (527,),
}

#: Names and shapes of torchvggish's vggish-10086976.pth.
VGGISH_PUBLIC_KEYS = {
    "features.0.weight": (64, 1, 3, 3),
    "features.0.bias": (64,),
    "features.3.weight": (128, 64, 3, 3),
    "features.6.weight": (256, 128, 3, 3),
    "features.8.weight": (256, 256, 3, 3),
    "features.11.weight": (512, 256, 3, 3),
    "features.13.weight": (512, 512, 3, 3),
    "features.13.bias": (512,),
    "embeddings.0.weight": (4096, 12288),
    "embeddings.2.weight": (4096, 4096),
    "embeddings.4.weight": (128, 4096),
    "embeddings.4.bias": (128,),
}


def tone(freq=440.0, seconds=2.56, sr=SR, amp=0.3):
    t = np.arange(int(seconds * sr)) / sr
    return amp * np.sin(2 * np.pi * freq * t)


def noise(seed, seconds=2.56, sr=SR, amp=0.1):
    return amp * np.random.default_rng(seed).normal(size=int(seconds * sr))


# ------------------------------------------------------------------------------------------
# Registry, factory, laziness
# ------------------------------------------------------------------------------------------


def test_import_does_not_import_torch():
    code = (
        "import sys, adm_export.eval.embedders, adm_export.eval.fd; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_registry_and_unknown_name():
    assert set(E.EMBEDDERS) == {"logmel", "panns-cnn14", "vggish", "clap", "reference-clap"}
    with pytest.raises(InvalidInputError, match="logmel, panns-cnn14, vggish, clap") as info:
        E.get_embedder("openl3")
    assert "'openl3'" in str(info.value) and "\n" not in str(info.value)


def test_logmel_needs_nothing():
    emb = E.get_embedder("logmel")
    assert isinstance(emb, E.Embedder) and emb.weight_free and emb.name == "logmel"
    assert emb.logits([tone()], SR) is None
    assert emb.description.endswith(".")


def test_missing_checkpoint_names_the_flag(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_cache_candidates", lambda name: [tmp_path / "absent.pth"])
    for name in ("panns-cnn14", "vggish"):
        with pytest.raises(InvalidInputError, match="--embedder-checkpoint"):
            E.get_embedder(name)
        with pytest.raises(InvalidInputError, match="--embedder-checkpoint"):
            E.get_embedder(name, checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(InvalidInputError, match="--embedder-checkpoint"):
        E.get_embedder("clap")


def test_bad_clips_are_user_errors():
    emb = E.LogMelEmbedder()
    with pytest.raises(InvalidInputError):
        emb.embed([], SR)
    with pytest.raises(InvalidInputError, match="NaN"):
        emb.embed([np.full(1000, np.nan)], SR)
    with pytest.raises(InvalidInputError):
        emb.embed([tone()], 0)


# ------------------------------------------------------------------------------------------
# Weight-free log-mel embedder
# ------------------------------------------------------------------------------------------


def test_mel_filterbanks_match_reference_implementations():
    """Slaney filters (librosa / torchlibrosa melW) and VGGish's HTK filters, via transformers."""
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(num_frequency_bins=257, num_mel_filters=64, min_frequency=50,
                          max_frequency=8000, sampling_rate=SR, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(audio.mel_filterbank(SR, 512, 64, 50, 8000).T, ref, atol=1e-12)
    ref_htk = mel_filter_bank(num_frequency_bins=257, num_mel_filters=64, min_frequency=125,
                              max_frequency=7500, sampling_rate=SR, norm=None, mel_scale="htk",
                              triangularize_in_mel_space=True)
    mine = audio.vggish_mel_matrix()
    np.testing.assert_allclose(mine[1:], ref_htk[1:], atol=1e-10)
    assert not mine[0].any()  # VGGish gives the DC bin no weight


def test_logmel_shape_determinism_and_speed():
    emb = E.LogMelEmbedder()
    clips = [noise(i) for i in range(8)]
    emb.embed(clips[:1], SR)  # warm-up
    start = time.perf_counter()
    a = emb.embed(clips, SR)
    elapsed = time.perf_counter() - start
    assert a.shape == (8, emb.dim) and a.dtype == np.float64
    assert len(emb.feature_names) == emb.dim
    np.testing.assert_array_equal(a, emb.embed(clips, SR))
    assert np.isfinite(a).all()
    assert elapsed < 1.0


def test_logmel_tells_tone_from_noise():
    emb = E.LogMelEmbedder()
    e = emb.embed([tone(), noise(1), noise(2)], SR)
    tone_vs_noise = np.linalg.norm(e[0] - e[1])
    noise_vs_noise = np.linalg.norm(e[1] - e[2])
    assert tone_vs_noise > 20 * noise_vs_noise


def test_logmel_resamples_and_handles_silence_and_short_clips():
    emb = E.LogMelEmbedder()
    e16 = emb.embed([tone(seconds=1.0)], SR)
    e48 = emb.embed([tone(seconds=1.0, sr=48000)], 48000)
    far = np.linalg.norm(e16 - emb.embed([noise(3, seconds=1.0)], SR))
    assert np.linalg.norm(e16 - e48) < 0.05 * far
    e = emb.embed([np.zeros(SR), np.zeros(100), np.ones((1, 800)) * 0.1], SR)
    assert e.shape == (3, emb.dim) and np.isfinite(e).all()


# ------------------------------------------------------------------------------------------
# PANNs Cnn14 and VGGish (random weights, fixed seed)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cnn14(torch, tmp_path_factory):
    torch.manual_seed(0)
    model = E.PANNsCNN14()
    path = tmp_path_factory.mktemp("ckpt") / "Cnn14_16k_random.pth"
    torch.save({"model": model.state_dict()}, path)  # nested under "model" as PANNs ships it
    return model, path


@pytest.fixture(scope="module")
def vggish(torch, tmp_path_factory):
    torch.manual_seed(0)
    model = E.VGGish()
    path = tmp_path_factory.mktemp("ckpt") / "vggish_random.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _check_public_keys(model, public):
    sd = model.state_dict()
    for key, shape in public.items():
        assert key in sd, f"public key {key} missing"
        assert tuple(sd[key].shape) == shape, key


def test_cnn14_state_dict_names_match_public_checkpoint(cnn14):
    model, _ = cnn14
    _check_public_keys(model, PANNS_PUBLIC_KEYS)
    for i in range(1, 7):
        for part in ("conv1.weight", "conv2.weight", "bn1.weight", "bn2.running_var"):
            assert f"conv_block{i}.{part}" in model.state_dict()


def test_cnn14_front_end_matches_numpy(cnn14, torch):
    model, _ = cnn14
    x = noise(4, seconds=0.5)
    spec = model.spectrogram_extractor(torch.from_numpy(x).float()[None])[0, 0].double().numpy()
    ref = audio.power_spectrogram(x, 512, 160)
    np.testing.assert_allclose(spec, ref, atol=1e-5 * ref.max())


def test_cnn14_loads_through_get_embedder(cnn14):
    model, path = cnn14
    emb = E.get_embedder("panns-cnn14", checkpoint=str(path))
    clips = [noise(5, seconds=1.0), tone(seconds=1.0), tone(seconds=0.2)]
    e, lg = emb.embed_and_logits(clips, SR)
    assert e.shape == (3, 2048) and lg.shape == (3, 527)
    assert e.dtype == np.float64 and np.isfinite(e).all() and np.isfinite(lg).all()
    np.testing.assert_allclose(emb.logits(clips[:1], SR), lg[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.embed(clips[:2], SR), e[:2], rtol=1e-5, atol=1e-6)


def test_vggish_state_dict_names_match_public_checkpoint(vggish):
    model, _ = vggish
    _check_public_keys(model, VGGISH_PUBLIC_KEYS)
    assert set(model.state_dict()) == set(VGGISH_PUBLIC_KEYS) | {
        "features.3.bias", "features.6.bias", "features.8.bias", "features.11.bias",
        "embeddings.0.bias", "embeddings.2.bias",
    }


def test_vggish_loads_through_get_embedder(vggish):
    model, path = vggish
    emb = E.get_embedder("vggish", checkpoint=str(path))
    clips = [noise(6, seconds=2.0), tone(seconds=0.5)]
    e = emb.embed(clips, SR)
    assert e.shape == (2, 128) and e.dtype == np.float64
    frames = emb.frame_embeddings(clips, SR)
    assert [f.shape for f in frames] == [(2, 128), (1, 128)]  # 0.96 s frames; short clip padded
    assert emb.fd_embeddings(clips, SR).shape == (3, 128)
    np.testing.assert_allclose(e[0], frames[0].mean(axis=0))
    np.testing.assert_allclose(model.embed(clips, SR), e, rtol=1e-5, atol=1e-6)
    assert emb.logits(clips, SR) is None


def test_vggish_examples_layout():
    from adm_export.eval.embedders.vggish import vggish_examples

    ex = vggish_examples(noise(7, seconds=3.0))
    assert ex.shape == (3, 96, 64) and ex.dtype == np.float32


def _save_fake(torch, path, shapes):
    # Expanded one-element tensors: the right shapes with a tiny file (storages are shared).
    torch.save({k: torch.zeros(1).expand(s) if s else torch.zeros(()) for k, s in shapes.items()},
               path)


def test_renamed_key_is_refused(cnn14, torch, tmp_path):
    model, _ = cnn14
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["fc_audioset.weights"] = shapes.pop("fc_audioset.weight")
    path = tmp_path / "renamed.pth"
    _save_fake(torch, path, shapes)
    with pytest.raises(InvalidInputError) as info:
        E.get_embedder("panns-cnn14", checkpoint=str(path))
    msg = str(info.value)
    assert "--embedder-checkpoint" in msg and "\n" not in msg
    assert "missing keys [fc_audioset.weight]" in msg
    assert "unexpected keys [fc_audioset.weights]" in msg


def test_wrong_shapes_are_refused(vggish, torch, tmp_path):
    model, _ = vggish
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["embeddings.4.weight"] = (256, 4096)
    path = tmp_path / "wide.pth"
    _save_fake(torch, path, shapes)
    with pytest.raises(InvalidInputError, match=r"embeddings\.4\.weight \(256, 4096\)"):
        E.get_embedder("vggish", checkpoint=str(path))


def test_32k_cnn14_gets_a_hint(cnn14, torch, tmp_path):
    model, _ = cnn14
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["logmel_extractor.melW"] = (513, 64)
    shapes["spectrogram_extractor.stft.conv_real.weight"] = (513, 1, 1024)
    path = tmp_path / "cnn14_32k.pth"
    _save_fake(torch, path, shapes)
    with pytest.raises(InvalidInputError, match="Cnn14_16k"):
        E.get_embedder("panns-cnn14", checkpoint=str(path))


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInputError, match="--embedder-checkpoint"):
        E.get_embedder("vggish", checkpoint=str(path))


# ------------------------------------------------------------------------------------------
# CLAP (tiny random model saved locally)
# ------------------------------------------------------------------------------------------


def test_clap_from_local_folder(torch, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    audio = transformers.ClapAudioConfig(
        depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1], patch_embeds_hidden_size=16,
        hidden_size=128, projection_dim=32, window_size=8, spec_size=256, num_mel_bins=64,
    )
    text = transformers.ClapTextConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=37, projection_dim=32, max_position_embeddings=64,
    )
    config = transformers.ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(),
                                     projection_dim=32)
    transformers.ClapModel(config).save_pretrained(tmp_path)
    transformers.ClapFeatureExtractor().save_pretrained(tmp_path)
    emb = E.get_embedder("clap", checkpoint=str(tmp_path))
    e = emb.embed([noise(8, seconds=1.0), tone(seconds=0.5)], SR)
    assert e.shape == (2, 32) and emb.dim == 32 and emb.sampling_rate == 48000
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert emb.logits([tone()], SR) is None
