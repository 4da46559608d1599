"""Procedural sound corpus with captions (seeded, offline, numpy only).

Each clip is drawn from clearly distinct sound classes and attributes and captioned from those
attributes with the same vocabulary as the prompt-augmentation taxonomy
(``adm_export/data/taxonomy.json``), so the tagger of ``calibration.prompts`` recovers the
attributes from the caption. It is the data of the reference model that can be trained here
(no corpus can be downloaded) and of a domain embedder that knows these classes.

Classes: beep (alarm), siren, chirp (sweep), chord, melody, noise burst (white / pink / brown),
clicks, drum hits, engine hum, rain. Attributes: pitch register or contour, loudness and dynamics,
duration, rhythm, environment (reverberation), and layering (a second source).

``GENERATOR_VERSION`` changes whenever the same seed would give other audio: trained weights
record it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

GENERATOR_VERSION = 1
SAMPLING_RATE = 16000

CLASSES = ("beep", "siren", "chirp", "chord", "melody", "noise", "clicks", "drums", "engine", "rain")
# Attribute values, each phrased with taxonomy keywords so the caption tagger finds them.
PITCH = ("low", "high", "rising", "falling")
LOUDNESS = ("loud", "quiet", "getting louder", "fading")
DURATION = ("short", "sustained")
RHYTHM = ("single", "repeated", "fast", "slow")
ENVIRONMENT = ("dry", "small room", "large reverberant space", "far away")
NOISE_COLOURS = ("white", "pink", "brown")

_NOUN = {
    "beep": "alarm beep", "siren": "siren", "chirp": "electronic chirp sweep", "chord": "synthesizer chord",
    "melody": "synthesizer melody", "noise": "burst of {colour} noise", "clicks": "clicking",
    "drums": "drum hits", "engine": "engine hum", "rain": "rain",
}
# Classes whose pitch contour is part of what they are (a siren always moves) or that have no pitch.
_PITCHED = {"beep", "siren", "chirp", "chord", "melody", "engine"}
_RHYTHMIC = {"beep", "clicks", "drums", "noise", "chirp"}
_PHRASE = {
    "pitch": {"low": "low-pitched", "high": "high-pitched", "rising": "rising in pitch", "falling": "falling in pitch"},
    "loudness": {"loud": "loud", "quiet": "quiet", "getting louder": "getting louder", "fading": "fading out"},
    "duration": {"short": "a short", "sustained": "a sustained"},
    "rhythm": {"single": "once", "repeated": "repeatedly", "fast": "in a fast rhythm", "slow": "slowly, repeated"},
    "environment": {"dry": "", "small room": "in a small room", "large reverberant space": "in a large reverberant hall",
                    "far away": "far away"},
}


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """The attributes of one clip (everything its audio and caption are made from)."""

    cls: str
    pitch: str | None
    loudness: str
    duration: str
    rhythm: str | None
    environment: str
    colour: str | None = None
    layer: "ClipSpec | None" = None
    seed: int = 0

    def caption(self) -> str:
        """An AudioCaps-style caption composed from the attributes."""
        noun = _NOUN[self.cls].format(colour=self.colour or "white")
        # Rain and engine hum are textures: no duration word, and rain takes no article.
        article = {"rain": "", "engine": "a"}.get(self.cls)
        words = [_PHRASE["duration"][self.duration] if article is None else article]
        words.append(_PHRASE["loudness"][self.loudness] if self.loudness in ("loud", "quiet") else "")
        if self.pitch in ("low", "high"):
            words.append(_PHRASE["pitch"][self.pitch])
        words.append(noun)
        text = " ".join(w for w in words if w)
        tail = []
        if self.pitch in ("rising", "falling"):
            tail.append(_PHRASE["pitch"][self.pitch])
        if self.rhythm is not None:
            tail.append(_PHRASE["rhythm"][self.rhythm])
        if self.loudness in ("getting louder", "fading"):
            tail.append(_PHRASE["loudness"][self.loudness])
        if tail:
            text += ", " + ", ".join(tail)
        env = _PHRASE["environment"][self.environment]
        if env:
            text += " " + env
        if self.layer is not None:
            text += " while " + self.layer.caption()[0].lower() + self.layer.caption()[1:]
        return text[0].upper() + text[1:]

    def attributes(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("layer")
        d["layer"] = None if self.layer is None else self.layer.attributes()
        return d


def sample_spec(rng: np.random.Generator, allow_layer: bool = True) -> ClipSpec:
    """Draw one clip's attributes."""
    cls = CLASSES[rng.integers(len(CLASSES))]
    pitch = PITCH[rng.integers(len(PITCH))] if cls in _PITCHED else None
    if cls == "siren" and pitch in ("low", "high"):
        pitch = ("rising", "falling")[rng.integers(2)]
    rhythm = RHYTHM[rng.integers(len(RHYTHM))] if cls in _RHYTHMIC else None
    layer = None
    if allow_layer and rng.random() < 0.25:
        layer = sample_spec(rng, allow_layer=False)
        while layer.cls == cls:
            layer = sample_spec(rng, allow_layer=False)
    return ClipSpec(
        cls=cls, pitch=pitch, loudness=LOUDNESS[rng.integers(len(LOUDNESS))],
        duration=DURATION[rng.integers(len(DURATION))], rhythm=rhythm,
        environment=ENVIRONMENT[rng.integers(len(ENVIRONMENT))],
        colour=NOISE_COLOURS[rng.integers(3)] if cls == "noise" else None,
        layer=layer, seed=int(rng.integers(2**31)),
    )


# -- synthesis --------------------------------------------------------------------------------------
def _f0(spec: ClipSpec, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Fundamental frequency per sample: register and contour from the pitch attribute."""
    base = {"low": 110.0, "high": 1320.0, "rising": 330.0, "falling": 990.0, None: 440.0}[spec.pitch]
    base *= 2 ** (rng.uniform(-0.25, 0.25))
    t = np.arange(n) / sr
    if spec.pitch == "rising":
        return base * 2 ** (2.0 * t / t[-1])
    if spec.pitch == "falling":
        return base * 2 ** (-2.0 * t / t[-1])
    return np.full(n, base)


def _osc(f0: np.ndarray, sr: int, harmonics: int = 1) -> np.ndarray:
    phase = 2 * np.pi * np.cumsum(f0) / sr
    return sum(np.sin(k * phase) / k for k in range(1, harmonics + 1))


def _coloured_noise(n: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if colour == "white":
        return white
    spec = np.fft.rfft(white)
    f = np.arange(spec.size, dtype=float)
    f[0] = 1.0
    spec /= f ** (0.5 if colour == "pink" else 1.0)
    out = np.fft.irfft(spec, n)
    return out / (out.std() + 1e-12)


def _gate(spec: ClipSpec, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """On/off envelope from duration and rhythm: where the sound is present."""
    env = np.zeros(n)
    length = int(sr * (0.12 if spec.duration == "short" else 0.45))
    if spec.rhythm is None:
        start = int(0.1 * sr) if spec.duration == "short" else 0
        stop = n if spec.duration == "sustained" else min(n, start + int(0.6 * sr))
        env[start:stop] = 1.0
        return env
    period = {"single": n, "repeated": int(0.5 * sr), "fast": int(0.18 * sr), "slow": int(0.9 * sr)}[spec.rhythm]
    length = min(length, int(0.7 * period)) if spec.rhythm != "single" else length
    pos = int(0.05 * sr)
    while pos < n:
        jitter = 0
        env[pos:pos + length] = 1.0
        pos += period + jitter
        if spec.rhythm == "single":
            break
    return env


def _smooth(env: np.ndarray, sr: int, ms: float = 5.0) -> np.ndarray:
    k = max(1, int(sr * ms / 1000))
    return np.convolve(env, np.ones(k) / k, mode="same")


def _dynamics(spec: ClipSpec, n: int) -> np.ndarray:
    level = {"loud": 0.8, "quiet": 0.08, "getting louder": 0.5, "fading": 0.5}[spec.loudness]
    ramp = np.linspace(0.05, 1.0, n)
    if spec.loudness == "getting louder":
        return level * ramp
    if spec.loudness == "fading":
        return level * ramp[::-1]
    return np.full(n, level)


def _reverb(x: np.ndarray, environment: str, sr: int, rng: np.random.Generator) -> np.ndarray:
    if environment == "dry":
        return x
    if environment == "far away":
        # Distance: low-pass (air absorption), quieter, a little diffuse tail.
        k = 24
        x = np.convolve(x, np.ones(k) / k, mode="same") * 0.5  # short kernel: direct is fast
        environment = "small room"
    rt60 = {"small room": 0.25, "large reverberant space": 1.6}[environment]
    m = int(rt60 * sr)
    t = np.arange(m) / sr
    ir = rng.standard_normal(m) * np.exp(-6.9 * t / rt60)
    ir[0] = 1.0
    ir /= np.sqrt((ir ** 2).sum())
    from scipy.signal import fftconvolve

    wet = fftconvolve(x, ir)[: x.size]
    return 0.6 * x + 0.8 * wet


def synthesize(spec: ClipSpec, seconds: float = 2.56, sr: int = SAMPLING_RATE) -> np.ndarray:
    """Render a clip (float32, mono, peak at most 1)."""
    rng = np.random.default_rng(spec.seed)
    n = int(round(seconds * sr))
    cls = spec.cls
    if cls in ("beep", "chirp"):
        src = _osc(_f0(spec, n, sr, rng), sr, harmonics=1 if cls == "beep" else 3)
        if cls == "chirp":  # each event sweeps within itself too
            src = _osc(_f0(spec, n, sr, rng) * (1 + 0.5 * ((np.arange(n) % int(0.18 * sr)) / (0.18 * sr))), sr, 2)
    elif cls == "siren":
        f0 = _f0(spec, n, sr, rng) * (1 + 0.25 * np.sin(2 * np.pi * 0.8 * np.arange(n) / sr))
        src = _osc(f0, sr, harmonics=4)
    elif cls == "chord":
        f0 = _f0(spec, n, sr, rng)
        src = sum(_osc(f0 * r, sr, 3) for r in (1.0, 1.26, 1.5)) / 3
    elif cls == "melody":
        f0 = _f0(spec, n, sr, rng)
        steps = rng.choice([0, 2, 4, 5, 7, 9, 12], size=8)
        note = np.repeat(2 ** (steps / 12), int(np.ceil(n / 8)))[:n]
        src = _osc(f0 * note, sr, 3)
    elif cls == "noise":
        src = _coloured_noise(n, spec.colour or "white", rng)
    elif cls == "clicks":
        src = np.zeros(n)
        src[:: max(1, int(0.004 * sr))] = 1.0
        src = np.convolve(src, np.exp(-np.arange(40) / 6.0), mode="same")
    elif cls == "drums":
        src = np.zeros(n)
        hit = np.sin(2 * np.pi * 60 * np.arange(int(0.15 * sr)) / sr * (1 + np.exp(-np.arange(int(0.15 * sr)) / 200)))
        hit *= np.exp(-np.arange(hit.size) / (0.04 * sr))
        for i in range(0, n - hit.size, int(0.25 * sr)):
            src[i:i + hit.size] += hit
    elif cls == "engine":
        f0 = _f0(spec, n, sr, rng)
        src = _osc(f0 * 0.5, sr, harmonics=8) * (1 + 0.3 * np.sin(2 * np.pi * 7 * np.arange(n) / sr))
        src += 0.2 * _coloured_noise(n, "brown", rng)
    elif cls == "rain":
        src = 0.3 * _coloured_noise(n, "pink", rng)
        drops = rng.random(n) < 80 / sr
        src += np.convolve(drops * rng.uniform(0.3, 1.0, n), np.exp(-np.arange(80) / 10.0), mode="same")
    else:  # pragma: no cover - CLASSES is closed
        raise ValueError(cls)
    src = src / (np.abs(src).max() + 1e-12)
    gate = np.ones(n) if cls in ("rain", "engine", "siren") and spec.rhythm is None and spec.duration == "sustained" \
        else _smooth(_gate(spec, n, sr, rng), sr)
    x = src * gate * _dynamics(spec, n)
    x = _reverb(x, spec.environment, sr, rng)
    if spec.layer is not None:
        x = x + 0.7 * synthesize(spec.layer, seconds, sr)
    peak = np.abs(x).max()
    if peak > 1.0:
        x = x / peak
    return x.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Clip:
    """One corpus item."""

    index: int
    caption: str
    spec: ClipSpec
    audio: np.ndarray


def corpus(n: int, seed: int = 0, seconds: float = 2.56, sr: int = SAMPLING_RATE) -> Iterator[Clip]:
    """Yield ``n`` captioned clips; the same (n, seed, seconds) always gives the same clips.

    Item ``i`` depends only on ``seed`` and ``i`` (not on ``n``), so corpora of different sizes share
    their first items and a shard of a corpus can be generated on its own.
    """
    for i in range(n):
        spec = sample_spec(np.random.default_rng([seed, i, GENERATOR_VERSION]))
        yield Clip(index=i, caption=spec.caption(), spec=spec, audio=synthesize(spec, seconds, sr))


def label_vector(spec) -> list[int]:
    """Integer labels of a :class:`ClipSpec`, in the order of the reference model's attribute heads
    (:data:`adm_export.models.reference_components.HEADS`)."""

    def opt(values, v):
        return 0 if v is None else 1 + values.index(v)

    return [
        CLASSES.index(spec.cls), opt(PITCH, spec.pitch), LOUDNESS.index(spec.loudness),
        DURATION.index(spec.duration), opt(RHYTHM, spec.rhythm), ENVIRONMENT.index(spec.environment),
        0 if spec.layer is None else 1 + CLASSES.index(spec.layer.cls),
    ]
