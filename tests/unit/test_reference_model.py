"""The shipped reference model (reference-audioldm) and its embedder (reference-clap)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adm_export.models.reference import REFERENCE_DIR
from adm_export.reference import corpus

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def adapter():
    from adm_export.models import load_model

    return load_model("reference-audioldm")


def test_folder_is_a_small_fp16_audioldm_with_its_records():
    from safetensors import safe_open

    index = json.loads((REFERENCE_DIR / "audioldm" / "model_index.json").read_text())
    assert index["_class_name"] == "AudioLDMPipeline"
    files = sorted(REFERENCE_DIR.rglob("*.safetensors"))
    assert len(files) == 5
    total = sum(f.stat().st_size for f in files)
    assert total < 40e6, total  # "a few tens of MB at most"
    for f in files:
        with safe_open(str(f), "pt") as st:
            dtypes = {st.get_slice(k).get_dtype() for k in st.keys()}
        assert dtypes <= {"F16", "I64"}, (f, dtypes)  # I64: BatchNorm step counters
    assert (REFERENCE_DIR / "GENERATOR_VERSION").read_text().strip() == str(corpus.GENERATOR_VERSION)
    log = json.loads((REFERENCE_DIR / "training_log.json").read_text())
    run1 = log["continued_from"]
    for stage in ("vae", "clap", "unet", "vocoder"):
        assert run1["stages"][stage]["steps"] > 100, stage
    assert log["stages"]["unet"]["steps"] > 100
    assert (REFERENCE_DIR / "README.md").exists() and (REFERENCE_DIR / "config.json").exists()


def test_shipped_weights_load_and_generate(adapter):
    pipe = adapter.pipeline
    assert adapter.family == "audioldm" and pipe.unet.dtype == torch.float32
    assert pipe.unet.config.class_embed_type == "simple_projection"
    assert pipe.unet.config.projection_class_embeddings_input_dim == pipe.text_encoder.config.projection_dim
    audio = adapter.generate(["A loud siren, rising in pitch"], [0], steps=2, audio_seconds=0.64, guidance_scale=2.5)
    a = np.asarray(audio[0]).reshape(-1)
    assert a.shape == (int(0.64 * 16000),)
    assert np.isfinite(a).all() and a.std() > 1e-4


def test_text_conditioning_is_trained(adapter):
    """Captions of one class embed closer to each other than to another class (random weights do not)."""
    from adm_export.reference.train import text_embeddings

    pipe = adapter.pipeline
    specs = [s for s in (corpus.sample_spec(np.random.default_rng([5, i, 1]), allow_layer=False) for i in range(200))]
    pick = {c: [s.caption() for s in specs if s.cls == c][:6] for c in ("siren", "rain")}
    e = {c: text_embeddings(pipe.text_encoder, pipe.tokenizer, v, "cpu") for c, v in pick.items()}
    within = float((e["siren"] @ e["siren"].T).mean() + (e["rain"] @ e["rain"].T).mean()) / 2
    across = float((e["siren"] @ e["rain"].T).mean())
    assert within > across + 0.2, (within, across)


def test_embedder_probabilities_and_accuracy_on_real_clips():
    from adm_export.eval.embedders import get_embedder
    from adm_export.reference.corpus import label_vector

    emb = get_embedder("reference-clap")
    clips = list(corpus.corpus(30, seed=7))
    waves = [c.audio for c in clips]
    e, logits = emb.embed_and_logits(waves, 16000)
    assert e.shape == (30, 192) and logits.shape == (30, 10) and np.isfinite(e).all()
    p = emb.probabilities(waves, 16000)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    acc = np.mean([pr == corpus.CLASSES[label_vector(c.spec)[0]] for pr, c in zip(emb.predict(waves, 16000), clips)])
    assert acc >= 0.6, acc  # 0.89 on 512 held-out clips; chance is 0.1
    # Resampled input gives about the same class (the embedder resamples to 16 kHz).
    p48 = emb.probabilities([np.repeat(waves[0], 3)], 48000)
    assert p48.shape == (1, 10) and abs(p48.sum() - 1) < 1e-9


def test_embedder_checkpoint_errors_are_one_line(tmp_path):
    from adm_export.errors import InvalidInputError
    from adm_export.eval.embedders import get_embedder

    with pytest.raises(InvalidInputError, match="reference_clap.safetensors"):
        get_embedder("reference-clap", checkpoint=str(tmp_path))
    f = tmp_path / "x.pt"
    f.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="--embedder-checkpoint"):
        get_embedder("reference-clap", checkpoint=str(f))


def test_folder_path_loads_the_same_model_in_float32(adapter):
    """`--model <folder>` (the generic from_pretrained path) gives the registered model, in float32."""
    import torch

    from adm_export.models import load_model
    from adm_export.models.reference import REFERENCE_DIR

    by_path = load_model(str(REFERENCE_DIR / "audioldm"))
    assert by_path.family == "audioldm"
    for name in ("unet", "vae", "text_encoder", "vocoder"):
        assert {p.dtype for p in getattr(by_path.pipeline, name).parameters()} == {torch.float32}, name
    assert by_path.fingerprint() == adapter.fingerprint()
