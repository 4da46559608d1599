"""Policy language (patterns -> formats in quant_cfg shape), presets, and capability refusals."""

from __future__ import annotations

import json

import pytest

from adm_export.errors import InvalidInputError
from adm_export.formats import capabilities, policy as pol, recipes


@pytest.fixture(scope="module")
def unet():
    """The tiny AudioLDM U-Net from config on the meta device (structure only, no weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    from adm_export.models.embedded import tiny_unet_config

    with torch.device("meta"):
        return UNet2DConditionModel(**tiny_unet_config())


def _by_name(plans):
    return {p.name: p for p in plans}


def test_int8_preset_keeps_nvidia_exclusions_in_fp16(unet):
    plans = _by_name(pol.resolve(pol.preset("int8"), unet))
    assert plans["conv_in"].format == "fp16" and plans["conv_out"].format == "fp16"
    assert plans["time_embedding.linear_1"].format == "fp16"
    assert plans["down_blocks.0.resnets.1.time_emb_proj"].format == "fp16"
    assert plans["down_blocks.0.resnets.0.conv1"].format == "int8"
    att = plans["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert (att.format, att.weight, att.activation) == ("int8", "int8", "int8")


def test_w4a8_int4_only_on_linears_blocked_along_input_axis(unet):
    plans = pol.resolve(pol.preset("w4a8"), unet)
    linear = [p for p in plans if p.kind == "linear" and p.format == "w4a8"]
    convs = [p for p in plans if p.kind == "conv" and p.requested == "w4a8"]
    assert linear and all(p.weight == "int4" and p.activation == "int8" for p in linear)
    # The tiny model's linears have 64/128/512 inputs: the block is the largest of 128/64/... dividing it.
    assert {p.block for p in linear} <= {64, 128}
    assert convs and all(p.format == "int8" and "falls back" in p.why for p in convs)
    cfg = pol.quantizer_cfgs(linear[0])
    assert cfg["weight"]["block_sizes"] == {-1: linear[0].block, "type": "static"}
    # An INT4 convolution (policy switch on) blocks along input channels (axis 1), never a 3-wide kernel axis.
    conv = next(p for p in pol.resolve(pol.Policy("x", (pol.Rule("*", pol.Format.W4A8),), int4_convs=True), unet)
                if p.name == "down_blocks.0.resnets.0.conv1")
    assert conv.weight == "int4" and pol.quantizer_cfgs(conv)["weight"]["block_sizes"] == {1: 64, "type": "static"}


def test_user_policy_file_later_rule_wins_and_parent_class_filters(unet, tmp_path):
    data = {
        "name": "mine",
        "quant_cfg": [
            {"quantizer_name": "*", "format": "int8"},
            {"quantizer_name": "*attn1*", "format": "fp8", "parent_class": "nn.Linear"},
            {"quantizer_name": "*attn1.to_q.weight_quantizer", "format": "w4a16"},  # ModelOpt-style name accepted
            {"quantizer_name": "*resnets.0*", "enable": False},  # ModelOpt's "keep" spelling
        ],
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data))
    plans = _by_name(pol.resolve(pol.load_policy(path), unet))
    blk = "down_blocks.1.attentions.0.transformer_blocks.0"
    assert plans[f"{blk}.attn1.to_k"].format == "fp8"
    assert plans[f"{blk}.attn1.to_q"].format == "w4a16"
    assert plans[f"{blk}.attn2.to_k"].format == "int8"
    assert plans["down_blocks.0.resnets.0.conv1"].format == "fp16"
    assert plans["conv_in"].format == "int8"  # no exclusions unless the policy says so
    # The compiled ModelOpt config: deny-all first, then one exact entry per quantized quantizer.
    cfg = pol.compile_quant_cfg(plans.values())
    assert cfg["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}
    names = [e["quantizer_name"] for e in cfg["quant_cfg"][1:]]
    assert f"{blk}.attn1.to_q.weight_quantizer" in names and f"{blk}.attn1.to_q.input_quantizer" not in names


@pytest.mark.parametrize("bad, needle", [
    ({"quant_cfg": []}, "non-empty 'quant_cfg'"),
    ({"quant_cfg": [{"quantizer_name": "*", "format": "int3"}]}, "unknown format 'int3'"),
    ({"quant_cfg": [{"quantizer_name": "*", "format": "int8", "parent_class": "nn.GRU"}]}, "parent_class"),
    ({"quant_cfg": [{"quantizer_name": "*", "format": "int8", "bits": 8}]}, "unknown keys"),
    ({"quant_cfg": [{"format": "int8"}]}, "quantizer_name"),
    ({"quant_cfg": [{"quantizer_name": "*", "format": "auto", "candidates": ["auto"]}]}, "candidates"),
])
def test_bad_policies_give_one_line_errors(bad, needle):
    with pytest.raises(InvalidInputError) as exc:
        pol.policy_from_dict(bad)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_policy_file_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        pol.load_policy(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        pol.load_policy(tmp_path / "bad.json")


def test_presets_compile_to_modelopt_shape():
    for name in ("int8", "fp8", "w4a8", "mixed"):
        cfg = recipes.quant_config(name)
        assert cfg["algorithm"] == "max" and cfg["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}
    w4 = recipes.quant_config("w4a8")["quant_cfg"]
    lin = [e for e in w4 if e.get("parent_class") == "nn.Linear" and e["quantizer_name"] == "*weight_quantizer"]
    conv = [e for e in w4 if e.get("parent_class") == "nn.Conv2d" and e["quantizer_name"] == "*weight_quantizer"]
    assert lin[0]["cfg"]["num_bits"] == 4 and conv[0]["cfg"]["num_bits"] == 8
    assert recipes.describe("int8")["policy"]["name"] == "int8"
    with pytest.raises(InvalidInputError):
        pol.preset("int3")


def test_weight_bytes_model():
    assert pol.weight_bytes("fp16", 1000, 10, None) == 2000
    assert pol.weight_bytes("int8", 1000, 10, None) == 1040
    assert pol.weight_bytes("int4", 1024, 8, 128) == 512 + 32


# -- capabilities ------------------------------------------------------------------------------
def _modules(unet):
    return {n: m for n, _, m in pol.compute_layers(unet)}


def test_w4a8_refused_for_tensorrt_with_a_one_line_error(unet):
    plans = pol.resolve(pol.preset("w4a8"), unet)
    for target in ("tensorrt", "tensorrt-rtx"):
        with pytest.raises(InvalidInputError) as exc:
            capabilities.check_plans(plans, target, False, _modules(unet), False, "--precision w4a8")
        msg = str(exc.value)
        assert "\n" not in msg and "--allow-adjust" in msg and "w4a8" in msg and target in msg


def test_allow_adjust_changes_w4a8_to_weight_only_and_reports_it(unet):
    plans = pol.resolve(pol.preset("w4a8"), unet)
    out, report = capabilities.check_plans(plans, "tensorrt", True, _modules(unet), False)
    changed = {c["layer"] for c in report["changes"]}
    assert changed == {p.name for p in plans if p.format == "w4a8"}
    assert all(c["from"] == "w4a8" and c["to"] == "w4a16" for c in report["changes"])
    new = _by_name(out)
    some = next(iter(changed))
    assert new[some].weight == "int4" and new[some].activation is None and new[some].requested == "w4a8"


def test_onnxruntime_cpu_runs_every_preset_and_flags_emulation(unet):
    for name in ("int8", "fp8", "w4a8"):
        plans = pol.resolve(pol.preset(name), unet)
        out, report = capabilities.check_plans(plans, "onnxruntime-cpu", False, _modules(unet), False)
        assert report["changes"] == []
        if name == "fp8":
            assert report["emulated"]["fp8:conv"]["layers"] > 0
    # INT4 convolutions: refused by TensorRT, allowed (emulated) on ONNX Runtime CPU.
    p4 = pol.resolve(pol.Policy("c", (pol.Rule("*conv1", pol.Format.W4A8),), int4_convs=True), unet)
    with pytest.raises(InvalidInputError, match="no INT4 convolution"):
        capabilities.check_plans(p4, "tensorrt", False, _modules(unet), True)
    capabilities.check_plans(p4, "onnxruntime-cpu", False, _modules(unet), True)
    assert capabilities.allowed_formats("tensorrt", "conv", ["fp16", "int8", "fp8", "w4a8"]) == ["fp16", "int8", "fp8"]
    with pytest.raises(InvalidInputError, match="--target"):
        capabilities.parse_target("coreml")
