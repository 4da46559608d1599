"""Evaluation harness: the quality gate's exit codes on a real and a deliberately broken engine, paired
KL / IS through the harness, the bias-shifted bootstrap interval, FAD over frames, the reference folder,
the CLAP score, and the build's report with its figures.

One tiny build (1.28 s clips, 4 steps, 4 clips) is made per module through the CLI; the broken engine is
a copy of its engines folder whose INT8 weight scales are multiplied by 4 (same file size, so the
manifest check still passes and only the gate can catch it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from adm_export.config import EvalConfig
from adm_export.errors import InvalidInputError
from adm_export.eval import clips as eval_clips
from adm_export.eval import fd as fdlib
from adm_export.eval import harness, scoring
from adm_export.eval.embedders import Embedder
from adm_export.eval.embedders.clap import clap_scores

TINY_BUILD = ["--model", "tiny-audioldm", "--num-prompts", "2", "--steps", "4", "--points", "4", "--seconds", "1.28",
              "--num-clips", "4", "--eval-steps", "4", "--eval-seconds", "1.28"]
TINY_EVAL = ["--num-clips", "4", "--eval-steps", "4", "--eval-seconds", "1.28"]
# Thresholds with a wide margin on both sides: the good engine drifts by ~0.4 %, the broken one by ~40 %.
GATE = ["--max-fd-increase", "50", "--max-drift", "10"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """``adm-export build`` on tiny-audioldm through the CLI, eval included (exit 0); no TensorRT-RTX plan.

    The TensorRT-RTX plan is built opportunistically when the package is installed; it is not what
    these tests are about and costs ~10 s, so the import is made to fail for this build.
    """
    from click.testing import CliRunner

    from adm_export.cli import cli
    from adm_export.engines import tensorrt
    from adm_export.errors import MissingDependencyError

    def no_trt(flavor="auto"):
        raise MissingDependencyError("TensorRT-RTX disabled for this test")

    out = tmp_path_factory.mktemp("harness") / "build"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADM_EXPORT_NO_PROGRESS", "1")
        mp.setattr(tensorrt, "import_nvinfer", no_trt)
        # The later evals of this module reuse the build's baseline and reference draw (same model,
        # prompts and seeds): only the engine under test is sampled again.
        mp.setattr(harness, "BASELINE_CACHE", {})
        result = CliRunner().invoke(cli, ["--quiet", "build", "--out", str(out), *TINY_BUILD, *GATE])
        assert result.exit_code == 0, result.output + repr(result.exception)
        yield out


@pytest.fixture(scope="module")
def broken_engines(build_dir, tmp_path_factory):
    """A copy of the engines folder with every INT8 weight's DequantizeLinear scale multiplied by 4."""
    import onnx
    from onnx import numpy_helper

    dst = tmp_path_factory.mktemp("broken") / "engines"
    shutil.copytree(build_dir / "engines", dst)
    path = dst / "onnxruntime" / "unet.onnx"
    size = path.stat().st_size
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    scales = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type == onnx.TensorProto.INT8}
    assert len(scales) > 10
    for name in scales:
        # raw_data of the same length: the re-serialised file keeps its size byte for byte.
        inits[name].raw_data = (numpy_helper.to_array(inits[name]) * np.float32(4)).astype(np.float32).tobytes()
    onnx.save(model, str(path))
    assert path.stat().st_size == size
    return dst


def _run_eval(engines: Path, out: Path, *extra: str):
    from click.testing import CliRunner

    from adm_export.cli import cli

    return CliRunner().invoke(cli, ["--quiet", "--no-progress", "eval", "--engine", str(engines), "--out", str(out),
                                    *TINY_EVAL, *GATE, *extra])


def _read_wavs(folder: Path) -> list[np.ndarray]:
    import soundfile as sf

    return [sf.read(str(f), dtype="float32")[0] for f in sorted(folder.glob("*.wav"))]


def _valid_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] >= 400 and img.size[1] >= 200, img.size


# ------------------------------------------------------------------------------------------------
# The gate's exit codes through the CLI
# ------------------------------------------------------------------------------------------------


def test_build_report_includes_eval_figures(build_dir):
    report = json.loads((build_dir / "report.json").read_text())
    md = (build_dir / "report.md").read_text()
    ev = report["eval"]
    assert ev["gate"]["passed"] is True and ev["gate"]["threshold"] == 50.0
    assert set(ev["figures"]) == {"spectrograms", "latent_error", "fd"}
    for name, rel in ev["figures"].items():
        assert rel == f"eval/figures/{Path(rel).name}"
        assert f"]({rel})" in md, name
        _valid_png(build_dir / rel)
    # The eval folder holds its own reports, figures linked relative to that folder.
    eval_md = (build_dir / "eval" / "report.md").read_text()
    assert "](figures/spectrograms.png)" in eval_md
    assert "**Quality gate: PASSED**" in md


def test_eval_passes_on_the_good_engine(build_dir, tmp_path):
    """A folder reference (the build's reference draw) and the real engine: exit 0."""
    out = tmp_path / "good"
    result = _run_eval(build_dir / "engines", out, "--reference", str(build_dir / "eval" / "reference"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "quality gate: PASSED" in result.output
    report = json.loads((out / "report.json").read_text())
    ev = report["eval"]
    assert ev["reference"]["kind"] == "folder" and ev["reference"]["clips"] == 4
    assert ev["gate"]["passed"] is True and ev["gate"]["failed"] == []
    assert 0 <= ev["paired_drift_pct"] < 5
    assert ev["final_latent_rel_l2"] < 0.2
    for rel in ev["figures"].values():
        _valid_png(out / rel)


def test_eval_fails_with_exit_2_on_a_broken_engine(build_dir, broken_engines, tmp_path):
    out = tmp_path / "broken"
    result = _run_eval(broken_engines, out)
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "quality gate: FAILED" in result.output
    report = json.loads((out / "report.json").read_text())
    gate = report["eval"]["gate"]
    assert gate["passed"] is False and "paired_drift_pct" in gate["failed"]
    check = next(c for c in gate["checks"] if c["metric"] == "paired_drift_pct")
    assert check["value"] > 20 and check["excess"] == pytest.approx(check["value"] - 10)
    lo, hi = check["ci"]
    assert lo <= check["value"] <= hi
    md = (out / "report.md").read_text()
    # Which metric failed, by how much, with its interval.
    assert "**FAIL**: paired_drift_pct" in md
    assert f"exceeds --max-drift 10% by {check['value'] - 10:.1f} points" in md
    assert f"95% interval {lo:.1f} to {hi:.1f}%" in md
    assert "paired_drift_pct" in result.output
    # The latent trajectories tell the same story, far above the good engine's error.
    assert report["eval"]["final_latent_rel_l2"] > 0.2


# ------------------------------------------------------------------------------------------------
# Metrics through the harness (score_clips), on the build's clips
# ------------------------------------------------------------------------------------------------


class HeadEmbedder(Embedder):
    """A fixed random projection of log-mel statistics, with a 10-class head (PANNs-like logits)."""

    name = "test-head"
    weight_free = True
    description = "test embedder with a class head"

    def __init__(self) -> None:
        from adm_export.eval.embedders import LogMelEmbedder

        self.base = LogMelEmbedder()
        self.dim = 16
        rng = np.random.default_rng(0)
        self.proj = rng.normal(size=(self.base.dim, self.dim)) / np.sqrt(self.base.dim)
        self.head = rng.normal(size=(self.dim, 10))

    def embed(self, waveforms, sr):
        e = self.base.embed(waveforms, sr)
        return (e - e.mean()) @ self.proj

    def logits(self, waveforms, sr):
        return self.embed(waveforms, sr) @ self.head / 10.0


class FrameEmbedder(Embedder):
    """Frame-level rows (like VGGish): the log-mel of every 0.16 s frame."""

    name = "test-frames"
    weight_free = True
    description = "test frame embedder"
    dim = 8

    def frame_embeddings(self, waveforms, sr):
        out = []
        for w in waveforms:
            frames = np.asarray(w, dtype=np.float64)[: len(w) // 2560 * 2560].reshape(-1, 2560)
            spec = np.abs(np.fft.rfft(frames, axis=1))[:, :1280].reshape(len(frames), 8, -1).mean(axis=2)
            out.append(np.log(spec + 1e-6))
        return out

    def embed(self, waveforms, sr):
        return np.stack([f.mean(axis=0) for f in self.frame_embeddings(waveforms, sr)])


@pytest.fixture(scope="module")
def clips(build_dir):
    ev = build_dir / "eval"
    base, quant, ref = (_read_wavs(ev / d) for d in ("baseline", "quantized", "reference"))
    assert len(base) == len(quant) == len(ref) == 4
    prompts = json.loads((ev / "eval.json").read_text())["prompts"]
    return base, quant, ref, prompts


REF_DRAW = {"kind": "baseline_other_seeds", "clips": 4}


def _score(clips, embedder, cfg=None, quant=None, ref=None, info=REF_DRAW):
    base, q, r, prompts = clips
    cfg = cfg or EvalConfig(num_clips=4, steps=4, audio_seconds=1.28, max_drift=10.0, n_boot=50)
    return scoring.score_clips(cfg, prompts, base, q if quant is None else quant, r if ref is None else ref,
                               16000, embedder, info)


def test_kl_is_paired_by_prompt_and_seed(clips):
    emb = HeadEmbedder()
    base, quant, ref, _ = clips
    res = _score(clips, emb)
    lb, lq, lr = (emb.logits(w, 16000) for w in (base, quant, ref))
    kl = res["kl"]
    assert kl["quantized_vs_baseline"] == pytest.approx(fdlib.kl_paired(lq, lb))
    assert kl["baseline_vs_ref"] == pytest.approx(fdlib.kl_paired(lb, lr))
    assert res["inception_score"]["quantized"] == pytest.approx(fdlib.inception_score(lq))
    # Pairing matters: the same clips in another order are other pairs, and the KL grows.
    shuffled = [quant[i] for i in (1, 2, 3, 0)]
    res_shuffled = _score(clips, emb, quant=shuffled)
    assert res_shuffled["kl"]["quantized_vs_baseline"] > 5 * kl["quantized_vs_baseline"]
    # The set-level FD does not see the order, the paired drift does.
    assert res_shuffled["fd_quantized_vs_baseline"] == pytest.approx(res["fd_quantized_vs_baseline"], rel=1e-6)
    assert res_shuffled["paired_drift_pct"] > 10 * res["paired_drift_pct"]


def test_identical_output_gives_zero_drift_and_kl(clips):
    base = clips[0]
    res = _score(clips, HeadEmbedder(), quant=[w.copy() for w in base])
    assert res["paired_drift_pct"] == 0.0
    assert res["fd_quantized_vs_baseline"] == pytest.approx(0.0, abs=1e-9)
    assert abs(res["kl"]["quantized_vs_baseline"]) < 1e-4  # -C * eps of audioldm_eval's KL
    assert res["fd_increase_pct"] == pytest.approx(0.0, abs=1e-6)
    assert res["gate"]["passed"] is True and res["gate"]["failed"] == []


def test_logmel_has_no_class_head(clips):
    from adm_export.eval.embedders import LogMelEmbedder

    res = _score(clips, LogMelEmbedder())
    assert res["kl"] is None and res["inception_score"] is None
    assert res["fd_kind"] == "FD on logmel clip embeddings"


def test_frame_embedder_gives_fad_and_resamples_clips(clips):
    emb = FrameEmbedder()
    res = _score(clips, emb)
    assert res["fd_kind"].startswith("FAD")
    frames = sum(len(f) for f in emb.frame_embeddings(clips[0], 16000))
    assert res["fd_rows"]["baseline"] == frames > 4
    rows = [np.concatenate(emb.frame_embeddings(w, 16000)) for w in (clips[1], clips[0])]
    assert res["fd_quantized_vs_baseline"] == pytest.approx(fdlib.frechet_distance(*rows))


def test_interval_is_the_percentile_interval_shifted_by_the_median_bias():
    """Replicates all above the estimate (FD's resampling bias at N <= dim): the shown interval still holds it."""
    boots = np.linspace(10.0, 20.0, 101)
    iv = fdlib.interval(2.0, boots, 0.95, floor=0.0)
    assert iv["estimate_in_percentile_ci"] is False
    assert iv["bias"] == pytest.approx(15.0 - 2.0)
    lo, hi = iv["percentile_ci"]
    assert iv["ci"] == pytest.approx([max(0.0, lo - 13.0), hi - 13.0])
    assert iv["ci"][0] <= 2.0 <= iv["ci"][1]
    # The floor keeps an FD interval non-negative; the FD increase has none.
    assert fdlib.interval(0.1, boots, 0.95, floor=0.0)["ci"][0] == 0.0
    assert fdlib.interval(0.1, boots, 0.95, floor=None)["ci"][0] < 0.0


def test_paired_bootstrap_holds_the_estimate_where_unpaired_did_not(clips):
    """The first report printed fd_bootstrap's unpaired interval, which missed the estimate here."""
    from adm_export.eval.embedders import LogMelEmbedder

    emb = LogMelEmbedder()
    base, quant = (emb.embed(w, 16000) for w in clips[:2])
    unpaired = fdlib.fd_bootstrap(quant, base, n_boot=100)
    assert not unpaired["ci_low"] <= unpaired["fd"] <= unpaired["ci_high"]
    res = _score(clips, emb)
    assert res["fd_warning"]  # 4 clips, 200 dimensions
    for key, iv in res["intervals"].items():
        assert iv["ci"][0] <= iv["estimate"] <= iv["ci"][1], key
    assert res["fd_quantized_vs_baseline_ci"] == res["intervals"]["fd_quantized_vs_baseline"]["ci"]
    assert res["fd_quantized_vs_baseline"] == pytest.approx(unpaired["fd"])


def test_fd_inf_keeps_pairs_together(clips):
    cfg = EvalConfig(num_clips=4, n_boot=20, fd_inf=True)
    res = _score(clips, HeadEmbedder(), cfg=cfg)
    inf = res["fd_inf"]["fd_quantized_vs_baseline"]
    assert [p["n"] for p in inf["points"]] == [2, 3, 4]
    # Paired subsets of near-identical clips stay near zero at every size (unpaired ones would not).
    assert max(p["fd"] for p in inf["points"]) < 0.1 * res["fd_baseline_vs_ref"]
    assert set(res["fd_inf"]) == {"fd_quantized_vs_baseline", "fd_baseline_vs_ref", "fd_quantized_vs_ref"}


def test_nonfinite_engine_output_fails_the_gate(clips):
    base = clips[0]
    broken = [w.copy() for w in base]
    broken[2][100:200] = np.nan
    res = _score(clips, HeadEmbedder(), quant=broken)
    assert res["gate"]["passed"] is False and res["gate"]["failed"] == ["finite_output"]
    assert res["nonfinite_quantized_clips"] == [2]
    assert res["fd_quantized_vs_baseline"] is None


def test_reference_equal_to_baseline_is_a_user_error(clips):
    with pytest.raises(InvalidInputError, match="indistinguishable from the baseline"):
        _score(clips, HeadEmbedder(), ref=[w.copy() for w in clips[0]], info={"kind": "folder"})


def test_reference_folder_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="--reference .* is not a folder"):
        eval_clips.load_reference(tmp_path / "missing", 16000)
    (tmp_path / "a.wav").write_bytes(b"not audio at all")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.raises(InvalidInputError, match="holds 1 audio file"):
        eval_clips.load_reference(tmp_path, 16000)
    (tmp_path / "b.wav").write_bytes(b"RIFF junk")
    with pytest.raises(InvalidInputError, match="--reference: cannot decode .*a.wav"):
        eval_clips.load_reference(tmp_path, 16000)


def test_reference_folder_is_resampled_to_mono(tmp_path):
    import soundfile as sf

    t = np.arange(8000) / 8000
    for i in range(2):
        sf.write(str(tmp_path / f"{i}.flac"), np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1) * 0.5, 8000)
    clips = eval_clips.load_reference(tmp_path, 16000)
    assert len(clips) == 2 and clips[0].ndim == 1 and abs(len(clips[0]) - 16000) <= 1


def test_clap_score_pairs_prompts_with_clips(tmp_path):
    import torch
    import transformers

    from adm_export.models.embedded import build_byte_tokenizer

    tok = build_byte_tokenizer(model_max_length=61)
    torch.manual_seed(0)
    audio = transformers.ClapAudioConfig(depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
                                         patch_embeds_hidden_size=16, hidden_size=128, projection_dim=32,
                                         window_size=8, spec_size=256, num_mel_bins=64)
    text = transformers.ClapTextConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=1, intermediate_size=37, projection_dim=32,
                                       max_position_embeddings=64, pad_token_id=1)
    config = transformers.ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=32)
    transformers.ClapModel(config).save_pretrained(tmp_path)
    transformers.ClapFeatureExtractor().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    rng = np.random.default_rng(0)
    waves = [0.1 * rng.normal(size=16000), np.sin(2 * np.pi * 300 * np.arange(16000) / 16000) * 0.3]
    prompts = ["rain on a roof", "a low hum"]
    s = clap_scores(str(tmp_path), prompts, {"a": waves, "b": waves[::-1]}, 16000)
    assert -1.0 <= s["a"] <= 1.0 and -1.0 <= s["b"] <= 1.0
    # Pairing: swapping the clips changes which prompt each is compared with.
    assert s["a"] != pytest.approx(s["b"], abs=1e-6)
    with pytest.raises(InvalidInputError, match="--clap-checkpoint .* is not a folder"):
        clap_scores(str(tmp_path / "nope"), prompts, {"a": waves}, 16000)
