"""The procedural corpus: determinism, captions that say what the audio is, audio that does it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from adm_export.calibration.prompts import tag_caption
from adm_export.reference.corpus import SAMPLING_RATE, ClipSpec, corpus, synthesize

SR = SAMPLING_RATE


def test_deterministic_and_independent_of_corpus_size():
    a = list(corpus(6, seed=3, seconds=1.0))
    b = list(corpus(6, seed=3, seconds=1.0))
    c = list(corpus(3, seed=3, seconds=1.0))
    for x, y in zip(a, b):
        assert x.caption == y.caption and np.array_equal(x.audio, y.audio)
    for x, y in zip(a, c):
        assert x.caption == y.caption and np.array_equal(x.audio, y.audio)
    assert [x.caption for x in corpus(6, seed=4, seconds=1.0)] != [x.caption for x in a]


def test_clips_are_valid_audio():
    for clip in corpus(20, seed=0, seconds=1.28):
        assert clip.audio.dtype == np.float32 and clip.audio.shape == (int(1.28 * SR),)
        assert np.isfinite(clip.audio).all() and np.abs(clip.audio).max() <= 1.0
        assert clip.audio.std() > 1e-4, clip.caption


# Taxonomy values the caption must carry for each attribute value.
_SOURCE = {"beep": "alarms and signals", "siren": "alarms and signals", "rain": "nature", "engine": "vehicles"}
_ENV = {"small room": "small room", "large reverberant space": "large reverberant space", "far away": "far away"}
_RHYTHM = {"repeated": "repeated", "fast": "fast", "slow": "slow"}


def test_captions_carry_the_attributes():
    checked = 0
    for clip in corpus(60, seed=1, seconds=0.5):
        tags = tag_caption(clip.caption)
        spec = clip.spec
        expected = []
        if spec.pitch:
            expected.append(("pitch", spec.pitch))
        expected.append(("loudness", spec.loudness))
        if spec.environment in _ENV:
            expected.append(("environment", _ENV[spec.environment]))
        if spec.rhythm in _RHYTHM:
            expected.append(("rhythm", _RHYTHM[spec.rhythm]))
        if spec.cls in _SOURCE:
            expected.append(("source", _SOURCE[spec.cls]))
        if spec.layer is not None:
            expected.append(("layering", "two sources"))
        missing = [e for e in expected if e not in tags]
        assert not missing, f"{clip.caption!r}: tagger misses {missing}"
        checked += len(expected)
    assert checked > 150


def _spec(**kw) -> ClipSpec:
    base = dict(cls="beep", pitch="high", loudness="loud", duration="sustained", rhythm="single",
                environment="dry", seed=11)
    base.update(kw)
    return ClipSpec(**base)


def _centroid(x: np.ndarray) -> float:
    mag = np.abs(np.fft.rfft(x))
    f = np.fft.rfftfreq(x.size, 1 / SR)
    return float((mag * f).sum() / mag.sum())


def test_audio_does_what_the_caption_says():
    loud, quiet = synthesize(_spec(loudness="loud")), synthesize(_spec(loudness="quiet"))
    assert loud.std() > 4 * quiet.std()
    high, low = synthesize(_spec(pitch="high")), synthesize(_spec(pitch="low"))
    assert _centroid(high) > 4 * _centroid(low)
    rising = synthesize(_spec(pitch="rising", rhythm=None))
    half = rising.size // 2
    assert _centroid(rising[half:]) > 1.5 * _centroid(rising[:half])
    louder = synthesize(_spec(loudness="getting louder", rhythm=None))
    assert np.abs(louder[-4000:]).mean() > 3 * np.abs(louder[:4000]).mean()


@pytest.mark.parametrize("environment", ["small room", "large reverberant space"])
def test_reverberation_lengthens_the_tail(environment):
    dry = synthesize(_spec(duration="short", environment="dry"))
    wet = synthesize(_spec(duration="short", environment=environment))
    # Energy after the 0.12 s event (0.05-0.17 s) has ended: reverb leaves a tail, dry does not.
    tail = slice(int(0.25 * SR), int(0.4 * SR))
    assert (wet[tail] ** 2).sum() > 100 * (dry[tail] ** 2).sum() + 1e-9
    big = synthesize(_spec(duration="short", environment="large reverberant space"))
    small = synthesize(_spec(duration="short", environment="small room"))
    assert (big[tail] ** 2).sum() > (small[tail] ** 2).sum()


def test_layering_mixes_a_second_source():
    layer = _spec(cls="rain", pitch=None, rhythm=None, seed=5)
    spec = dataclasses.replace(_spec(), layer=layer)
    assert " while " in spec.caption()
    mixed, alone = synthesize(spec), synthesize(_spec())
    assert not np.allclose(mixed, alone)


# -- the training data path (adm_export.reference.train / components) ------------------------------
_CLASS_WORD = {"beep": "beep", "siren": "siren", "chirp": "chirp", "chord": "chord", "melody": "melody",
               "noise": "noise", "clicks": "clicking", "drums": "drum", "engine": "engine", "rain": "rain"}


def test_label_vectors_agree_with_captions():
    from adm_export.models.reference_components import HEADS
    from adm_export.reference.corpus import label_vector
    from adm_export.reference.corpus import CLASSES, LOUDNESS, PITCH

    for clip in corpus(80, seed=2, seconds=0.1):
        lab = label_vector(clip.spec)
        assert len(lab) == len(HEADS) and all(0 <= v < n for v, n in zip(lab, HEADS.values()))
        main = clip.caption.split(" while ")[0].lower()
        assert _CLASS_WORD[CLASSES[lab[0]]] in main, clip.caption
        if clip.spec.pitch is not None:
            assert PITCH[lab[1] - 1] == clip.spec.pitch
        assert LOUDNESS[lab[2]] == clip.spec.loudness
        if clip.spec.layer is not None:
            assert _CLASS_WORD[CLASSES[lab[6] - 1]] in clip.caption.split(" while ")[1].lower()
        else:
            assert lab[6] == 0


def test_training_data_is_the_corpus(tmp_path):
    """What the recipe renders (worker processes, float16) is corpus() item for item."""
    import json

    from adm_export.reference.train import make_data

    info = make_data(tmp_path, n_train=6, n_eval=3, seconds=0.5, workers=2)
    assert info["train"]["clips"] == 6 and info["eval"]["seed"] == 1
    waves = np.load(tmp_path / "data" / "train_wave.npy")
    meta = json.loads((tmp_path / "data" / "train_meta.json").read_text())
    for i, clip in enumerate(corpus(6, seed=0, seconds=0.5)):
        assert meta["captions"][i] == clip.caption
        np.testing.assert_array_equal(waves[i], clip.audio.astype(np.float16))
    held = list(corpus(3, seed=1, seconds=0.5))
    assert json.loads((tmp_path / "data" / "eval_meta.json").read_text())["captions"] == [c.caption for c in held]


def test_log_mel_layout():
    torch = pytest.importorskip("torch")
    from adm_export.models.reference_components import MEL_BINS, log_mel

    clip = next(corpus(1, seed=0, seconds=1.28)).audio
    mel = log_mel(torch.from_numpy(clip)[None])
    assert mel.shape == (1, 128, MEL_BINS)  # 100 frames per second: hop 160 at 16 kHz
    assert torch.isfinite(mel).all() and float(mel.min()) >= np.log(1e-5) - 1e-4
    silent = log_mel(torch.zeros(1, 1600))
    assert torch.allclose(silent, torch.full_like(silent, float(np.log(1e-5))))
