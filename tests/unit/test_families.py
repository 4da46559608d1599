"""Every model family through the whole build, and checkpoint-name compatibility of the loaders.

One CLI build per tiny family (module fixture, shared by its tests); the loader tests save state
dicts under the public checkpoint names and load them back through the family's loader.
"""

from __future__ import annotations

import json

import pytest
import torch

FAMILIES = ["tiny-audioldm2", "tiny-tango", "tiny-make-an-audio"]

# Small but complete: 2 prompts x 2 steps, 2 calibration points, 4 clips of 1.28 s (AudioLDM2 and
# TANGO: 32 latent frames; Make-An-Audio: 12). Every stage runs; a family takes 20-40 s of CPU.
POINTS = 2
ARGS = [
    "--num-prompts", "2", "--steps", "2", "--points", str(POINTS), "--seconds", "1.28",
    "--num-clips", "4", "--eval-steps", "2", "--eval-seconds", "1.28",
]

EXPECTED_INPUTS = {
    "tiny-audioldm2": ["sample", "timestep", "encoder_hidden_states", "encoder_hidden_states_1",
                       "encoder_attention_mask_1"],
    "tiny-tango": ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"],
    "tiny-make-an-audio": ["sample", "timestep", "context"],
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_build(request, tmp_path_factory):
    """``adm-export build --model tiny-X`` through the CLI; (model, out_dir, result, report)."""
    from click.testing import CliRunner

    from adm_export.cli import cli

    out = tmp_path_factory.mktemp(request.param) / "build"
    result = CliRunner().invoke(cli, ["--quiet", "build", "--model", request.param, "--out", str(out), *ARGS])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return request.param, out, result, report


def test_build_runs_end_to_end(family_build):
    model, out, result, report = family_build
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert report["model"]["id"] == model
    for stage in ("calibration", "quantized", "onnx", "engines"):
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["model"]["id"] == model
    assert report["eval"]["num_clips"] == 4
    assert report["eval"]["gate"]["passed"] is True


def test_int8_export_is_smaller_than_fp32_and_parity_passes(family_build):
    _, out, _, report = family_build
    size = report["size"]
    assert 0 < size["unet_export_bytes"] < size["unet_fp32_bytes"]
    assert size["reduction_vs_fp32"] < 0.6
    onnx_manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    parity = onnx_manifest["parity"]
    assert parity["passed"] is True
    assert report["parity"]["onnx_vs_torch_rel_l2"] == parity["onnx_vs_torch_max"]
    # The CPU build's placement for every family (Make-An-Audio included), checked stage by stage:
    # torch fed ONNX Runtime's codes matches it to float rounding, no code more than one step off.
    assert onnx_manifest["placement"] == "onnxruntime"
    forced = parity["teacher_forced"]
    assert forced["forced_max"] < 1e-5 and forced["codes_more_steps"] == 0
    assert forced["codes_one_step"] < 1e-3 * forced["codes"]
    assert forced["missing"] == [] and forced["unmatched"] == []


def test_spec_and_cache_carry_every_conditioning_stream(family_build):
    """The export spec, the calibration cache and the ONNX graph all carry the family's inputs."""
    import onnx
    from safetensors.torch import load_file

    model, out, _, _ = family_build
    manifest = json.loads((out / "calibration" / "manifest.json").read_text())
    names = [t["name"] for t in manifest["spec"]["inputs"]]
    assert names == EXPECTED_INPUTS[model]
    points = load_file(str(out / "calibration" / "points.safetensors"))
    rows = POINTS * 2  # classifier-free guidance doubles each point
    for t in manifest["spec"]["inputs"]:
        tensor = points[t["name"]]
        assert tensor.shape[0] == rows and tensor.dim() == len(t["shape"])
        for axis, dim in enumerate(t["shape"]):
            if isinstance(dim, int):  # fixed axes (channels, text lengths) as the spec says
                assert tensor.shape[axis] == dim, (t["name"], axis)
    for name in names:
        if "mask" in name:  # padding mask: valid tokens first, zeros after, both present
            mask = points[name]
            assert set(mask.unique().tolist()) == {0.0, 1.0}
            assert bool((mask[:, :-1] >= mask[:, 1:]).all())
    graph = onnx.load(str(out / "onnx" / "unet.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == names


# ------------------------------------------------------------------------------------------------
# AudioLDM2: the adapter's replacements are exact
# ------------------------------------------------------------------------------------------------


def test_audioldm2_padding_the_t5_stream_is_exact():
    """Padding the T5 states with a zero mask gives the U-Net output of the unpadded call."""
    from diffusers import AudioLDM2UNet2DConditionModel

    from adm_export.models.conditioning import pad_tokens
    from adm_export.models.embedded import tiny_audioldm2_unet_config

    torch.manual_seed(0)
    unet = AudioLDM2UNet2DConditionModel(**tiny_audioldm2_unet_config()).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 8, 16, 16, generator=g), torch.tensor([10.0, 500.0])
    s0, s1 = torch.randn(2, 8, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=s0, encoder_hidden_states_1=s1, encoder_attention_mask_1=mask).sample
        padded = unet(x, t, encoder_hidden_states=s0, encoder_hidden_states_1=pad_tokens(s1, 40),
                      encoder_attention_mask_1=pad_tokens(mask, 40)).sample
        unmasked = unet(x, t, encoder_hidden_states=s0, encoder_hidden_states_1=pad_tokens(s1, 40)).sample
    assert torch.allclose(padded, ref, atol=1e-5)
    assert not torch.allclose(unmasked, ref, atol=1e-3)  # the mask matters: the check can fail


def test_audioldm2_hidden_state_loop_matches_the_pipeline():
    """The adapter's GPT-2 loop (for GPT2Model) equals the pipeline's cached loop (GPT2LMHeadModel)."""
    import types

    from transformers import GPT2Config, GPT2LMHeadModel

    from adm_export.models.audioldm2 import generate_hidden_states
    from diffusers import AudioLDM2Pipeline

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=2, n_layer=2, vocab_size=2, n_positions=64,
                                    bos_token_id=0, eos_token_id=1)).eval()
    pipe = types.SimpleNamespace(language_model=lm, device=torch.device("cpu"))
    embeds = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:8] = 0  # padding inside the sequence, as the projection model's concatenation makes
    with torch.no_grad():
        ours = generate_hidden_states(pipe, embeds, max_new_tokens=5, attention_mask=mask)
        theirs = AudioLDM2Pipeline.generate_language_model(pipe, embeds, max_new_tokens=5, attention_mask=mask)
    assert ours.shape == (2, 5, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# TANGO: the published folder layout loads back
# ------------------------------------------------------------------------------------------------


def ldm_vae_names(dd: dict) -> set[str]:
    """Every parameter name of an LDM ``AutoencoderKL`` (Encoder/Decoder of the public LDM code)."""
    names: set[str] = set()

    def wb(prefix):
        names.update({f"{prefix}.weight", f"{prefix}.bias"})

    def resnet(prefix, cin, cout):
        for layer in ("norm1", "conv1", "norm2", "conv2"):
            wb(f"{prefix}.{layer}")
        if cin != cout:
            wb(f"{prefix}.nin_shortcut")

    def attn(prefix):
        for layer in ("norm", "q", "k", "v", "proj_out"):
            wb(f"{prefix}.{layer}")

    ch, mult, nrb = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
    n, attn_res = len(mult), set(dd["attn_resolutions"])
    wb("encoder.conv_in")
    cin, res = ch, dd["resolution"]
    for i in range(n):
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if res in attn_res:
                attn(f"encoder.down.{i}.attn.{j}")
        if i != n - 1:
            wb(f"encoder.down.{i}.downsample.conv")
            res //= 2
    for side in ("encoder", "decoder"):
        resnet(f"{side}.mid.block_1", 1, 1)
        attn(f"{side}.mid.attn_1")
        resnet(f"{side}.mid.block_2", 1, 1)
        wb(f"{side}.norm_out")
        wb(f"{side}.conv_out")
    wb("decoder.conv_in")
    cin = ch * mult[-1]
    for i in reversed(range(n)):
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if res in attn_res:
                attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            wb(f"decoder.up.{i}.upsample.conv")
            res *= 2
    wb("quant_conv")
    wb("post_quant_conv")
    return names


def _write_tango_folder(folder, pipe):
    """Write ``pipe`` in TANGO's published layout (public names), plus the offline extras."""
    from adm_export.models.embedded import TINY_TANGO_VAE_CONFIG, tiny_tango_unet_config
    from adm_export.models.tango import tango_state_dicts

    folder.mkdir(parents=True)
    weights = tango_state_dicts(pipe)
    torch.save(weights["main"], folder / "pytorch_model_main.bin")
    torch.save(weights["vae"], folder / "pytorch_model_vae.bin")
    (folder / "main_config.json").write_text(json.dumps({
        "text_encoder_name": "google/flan-t5-large", "scheduler_name": "stabilityai/stable-diffusion-2-1",
        "unet_model_name": None, "unet_model_config_path": "configs/diffusion_model_config.json", "snr_gamma": 5.0,
    }))
    (folder / "vae_config.json").write_text(json.dumps(TINY_TANGO_VAE_CONFIG))
    (folder / "diffusion_model_config.json").write_text(json.dumps(tiny_tango_unet_config()))
    # Not in the published snapshot: the tiny T5's config, tokenizer and vocoder config.
    (folder / "text_encoder_config.json").write_text(json.dumps(pipe.text_encoder.config.to_dict()))
    (folder / "vocoder_config.json").write_text(json.dumps(pipe.vocoder.config.to_dict()))
    pipe.tokenizer.save_pretrained(str(folder / "tokenizer"))
    return weights


def test_tango_checkpoint_with_public_names_loads_back(tmp_path):
    from adm_export.models import load_model
    from adm_export.models.embedded import TINY_TANGO_VAE_CONFIG, build_tiny_tango

    pipe = build_tiny_tango(seed=3)
    folder = tmp_path / "tango"
    weights = _write_tango_folder(folder, pipe)
    # The VAE file holds exactly the LDM names of the public code, and AudioLDM's vocoder names.
    vae_keys = {k for k in weights["vae"] if not k.startswith("vocoder.")}
    assert vae_keys == ldm_vae_names(TINY_TANGO_VAE_CONFIG["ddconfig"])
    assert "vocoder.ups.0.weight" in weights["vae"] and "vocoder.conv_post.weight" in weights["vae"]
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in weights["main"]
    assert "text_encoder.encoder.block.0.layer.0.SelfAttention.q.weight" in weights["main"]

    adapter = load_model(str(folder))
    assert adapter.family == "tango"
    loaded = adapter.pipeline
    for name in ("unet", "vae", "text_encoder", "vocoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    # Same prompt and seed, same audio: nothing was lost on the way.
    a = adapter.generate(["a door slams"], [5], 2, 0.64, 3.0)[0]
    from adm_export.models.tango import TangoAdapter

    b = TangoAdapter("orig", pipe).generate(["a door slams"], [5], 2, 0.64, 3.0)[0]
    assert a.shape == b.shape and abs(a - b).max() < 1e-5


def test_tango_folder_with_a_wrong_tensor_is_refused(tmp_path):
    from adm_export.errors import ModelNotFoundError
    from adm_export.models.embedded import build_tiny_tango
    from adm_export.models.tango import load_tango_folder

    folder = tmp_path / "tango"
    weights = _write_tango_folder(folder, build_tiny_tango())
    weights["vae"].pop("decoder.up.0.block.0.conv1.weight")
    torch.save(weights["vae"], folder / "pytorch_model_vae.bin")
    with pytest.raises(ModelNotFoundError, match="decoder.up.0.block.0.conv1.weight"):
        load_tango_folder(folder)


# ------------------------------------------------------------------------------------------------
# Make-An-Audio: the U-Net has the public checkpoint's names, and a checkpoint loads back
# ------------------------------------------------------------------------------------------------


def test_make_an_audio_unet_has_the_published_parameter_names():
    """Names and shapes of the published U-Net (320 channels, mult 1-2, context 1024), on the meta device."""
    from adm_export.models.make_an_audio import MAKE_AN_AUDIO_UNET_CONFIG
    from adm_export.models.make_an_audio.unet import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**MAKE_AN_AUDIO_UNET_CONFIG)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    expected = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.1.1.norm.weight": (320,),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (320,),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.5.1.proj_out.weight": (640, 640, 1, 1),
        "middle_block.0.in_layers.2.weight": (640, 640, 3, 3),
        "middle_block.1.transformer_blocks.0.attn2.to_v.weight": (640, 1024),
        "middle_block.2.out_layers.3.weight": (640, 640, 3, 3),
        "output_blocks.0.0.in_layers.2.weight": (640, 1280, 3, 3),
        "output_blocks.2.0.skip_connection.weight": (640, 960, 1, 1),
        "output_blocks.2.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.3.0.in_layers.0.weight": (960,),
        "output_blocks.5.1.transformer_blocks.0.attn1.to_out.0.weight": (320, 320),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    # No parameter outside the public layout (e.g. a diffusers-style name) slipped in.
    assert not [k for k in shapes if k.split(".")[0] not in ("time_embed", "input_blocks", "middle_block",
                                                              "output_blocks", "out")]
    assert len(unet.input_blocks) == 6 and len(unet.output_blocks) == 6


def test_make_an_audio_checkpoint_with_public_names_loads_back(tmp_path):
    from adm_export.models.make_an_audio.tiny import (
        TINY_MAKE_AN_AUDIO_VAE_DDCONFIG,
        build_tiny_make_an_audio,
        tiny_make_an_audio_config,
    )
    from adm_export.models.make_an_audio import (
        MakeAnAudioAdapter,
        load_make_an_audio_checkpoint,
        make_an_audio_state_dict,
    )

    pipe = build_tiny_make_an_audio(seed=7)
    state = make_an_audio_state_dict(pipe)
    assert {k[len("first_stage_model."):] for k in state if k.startswith("first_stage_model.")} == \
        ldm_vae_names(TINY_MAKE_AN_AUDIO_VAE_DDCONFIG)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in state
    assert "cond_stage_model.caption_encoder.projection.linear1.weight" in state
    # A Lightning checkpoint as the original training writes it.
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "maa.ckpt")
    loaded = load_make_an_audio_checkpoint(
        tmp_path / "maa.ckpt", vocoder=pipe.vocoder, tokenizer=pipe.tokenizer,
        config=tiny_make_an_audio_config(), bert_config=pipe.text_encoder.base.config)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    a = MakeAnAudioAdapter("ckpt", loaded).generate(["birds chirp"], [2], 2, 1.0, 3.0)[0]
    b = MakeAnAudioAdapter("orig", pipe).generate(["birds chirp"], [2], 2, 1.0, 3.0)[0]
    assert a.shape == (16000,) and abs(a - b).max() < 1e-5


def test_make_an_audio_loader_without_vocoder_says_what_is_missing(tmp_path):
    from adm_export.errors import ModelNotFoundError
    from adm_export.models.make_an_audio import load_make_an_audio_checkpoint

    with pytest.raises(ModelNotFoundError, match="BigVGAN") as info:
        load_make_an_audio_checkpoint(tmp_path / "missing.ckpt")
    message = str(info.value)
    assert "vocoder_dir=" in message and "\n" not in message
