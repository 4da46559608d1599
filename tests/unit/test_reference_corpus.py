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
