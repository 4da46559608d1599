#!/usr/bin/env python
"""Full-size denoisers of every model family, random weights, exported on CPU: FP32 ONNX vs INT8 export.

For AudioLDM-S, AudioLDM2, TANGO and Make-An-Audio the U-Net is built from its published config
(weights random: sizes do not depend on values), exported to FP32 ONNX, then quantized with the
``int8`` preset (ModelOpt, NVIDIA's diffusion exclusions kept in FP16) on a few random inputs and
exported the way the ``export`` stage does (INT8 weight initializers feeding DequantizeLinear,
kept layers stored in FP16). Both files are measured on disk (external data included) and deleted.

Heavy: TANGO's U-Net has ~866 M parameters (3.5 GB in FP32); peak memory about 4x that. Run one
family at a time on a machine with room (``--families tango``).

Usage:  python benchmarks/family_sizes.py [--families audioldm-s audioldm2 tango make-an-audio]
Prints a table and writes benchmarks/results/family_sizes.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = ["audioldm-s", "audioldm2", "tango", "make-an-audio"]


class SizeAdapter:
    """The two adapter methods the export needs (spec, export module), for a bare denoiser."""

    def __init__(self, spec, make_export):
        self.spec = spec
        self.make_export = make_export

    def denoiser_spec(self):
        return self.spec

    def export_module(self, module):
        return self.make_export(module)


def _fast_random_init(module, seed: int = 0) -> None:
    """Fill every parameter with small Gaussian values (fast; sizes do not depend on values)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def _on_meta(factory):
    """Build on the meta device, then allocate on the CPU (skips slow default initialisation)."""
    import torch

    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    # These U-Nets hold no buffers (diffusers' and ours compute timestep frequencies on the fly).
    assert not list(module.buffers()), "a buffer would be left uninitialised"
    return module


def build_family(name: str):
    """``(denoiser, SizeAdapter, description)`` of a family's published full-size U-Net."""
    from diffusers import UNet2DConditionModel

    from adm_export.models import embedded
    from adm_export.models.base import TensorSpec
    from adm_export.models.conditioning import TextCondSpec

    if name == "audioldm-s":
        from adm_export.models.denoisers import AudioLDMDenoiser

        unet = _on_meta(lambda: UNet2DConditionModel(**embedded.audioldm_s_unet_config()))
        spec = TextCondSpec(
            inputs=(TensorSpec("sample", ("batch", 8, "frames", 16)), TensorSpec("timestep", ("batch",)),
                    TensorSpec("class_labels", ("batch", 512))),
            outputs=(TensorSpec("noise_pred", ("batch", 8, "frames", 16)),),
            latent_frames_per_second=25.0, frame_multiple=8)
        return unet, SizeAdapter(spec, AudioLDMDenoiser), "cvssp/audioldm-s-full-v2 U-Net config"
    if name == "audioldm2":
        from diffusers import AudioLDM2UNet2DConditionModel

        from adm_export.models.denoisers import AudioLDM2Denoiser

        unet = _on_meta(lambda: AudioLDM2UNet2DConditionModel(**embedded.audioldm2_unet_config()))
        names = ("sample", "timestep", "encoder_hidden_states", "encoder_hidden_states_1", "encoder_attention_mask_1")
        spec = TextCondSpec(
            inputs=(TensorSpec("sample", ("batch", 8, "frames", 16)), TensorSpec("timestep", ("batch",)),
                    TensorSpec("encoder_hidden_states", ("batch", 8, 768)),
                    TensorSpec("encoder_hidden_states_1", ("batch", 128, 1024)),
                    TensorSpec("encoder_attention_mask_1", ("batch", 128))),
            outputs=(TensorSpec("noise_pred", ("batch", 8, "frames", 16)),),
            latent_frames_per_second=25.0, frame_multiple=8)
        return unet, SizeAdapter(spec, lambda m: AudioLDM2Denoiser(m, names)), "cvssp/audioldm2 U-Net config"
    if name == "tango":
        from adm_export.models.denoisers import TangoDenoiser
        from adm_export.models.tango import TANGO_UNET_CONFIG

        unet = _on_meta(lambda: UNet2DConditionModel(**TANGO_UNET_CONFIG))
        spec = TextCondSpec(
            inputs=(TensorSpec("sample", ("batch", 8, "frames", 16)), TensorSpec("timestep", ("batch",)),
                    TensorSpec("encoder_hidden_states", ("batch", 128, 1024)),
                    TensorSpec("encoder_attention_mask", ("batch", 128))),
            outputs=(TensorSpec("noise_pred", ("batch", 8, "frames", 16)),),
            latent_frames_per_second=25.0, frame_multiple=8)
        return unet, SizeAdapter(spec, TangoDenoiser), "declare-lab/tango diffusion_model_config.json"
    if name == "make-an-audio":
        from adm_export.models.make_an_audio.config import MAKE_AN_AUDIO_UNET_CONFIG
        from adm_export.models.make_an_audio.pipeline import MakeAnAudioDenoiser
        from adm_export.models.make_an_audio.unet import UNetModel

        unet = _on_meta(lambda: UNetModel(**MAKE_AN_AUDIO_UNET_CONFIG))
        spec = TextCondSpec(
            inputs=(TensorSpec("sample", ("batch", 4, 10, "frames")), TensorSpec("timestep", ("batch",)),
                    TensorSpec("context", ("batch", 77, 1024))),
            outputs=(TensorSpec("noise_pred", ("batch", 4, 10, "frames")),),
            latent_frames_per_second=7.8125, frame_multiple=4)
        return unet, SizeAdapter(spec, MakeAnAudioDenoiser), "Make-An-Audio txt2audio_args.yaml unet_config"
    raise SystemExit(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def measure(name: str, workdir: Path, frames: int, points: int) -> dict:
    """Export one family FP32 and INT8; returns sizes and timings."""
    import onnx
    import torch

    from adm_export.export import onnx_graph
    from adm_export.export.onnx import save_onnx, torch_to_onnx
    from adm_export.formats import recipes
    from adm_export.numerics import import_modelopt
    from adm_export.quantize.modelopt import round_high_precision_weights

    t0 = time.perf_counter()
    unet, adapter, source = build_family(name)
    _fast_random_init(unet)
    unet.eval()
    params = sum(p.numel() for p in unet.parameters())
    spec = adapter.denoiser_spec()
    example = spec.dummy_inputs(2, frames)
    row = {"family": name, "config": source, "parameters": params, "fp32_param_bytes": 4 * params,
           "export_frames": frames}

    # 1. FP32 ONNX. Above 2 GB torch writes every tensor to its own file beside the model: each
    #    export gets its own folder, and its size is everything in it.
    fp32_dir = workdir / f"{name}-fp32"
    fp32_dir.mkdir()
    t = time.perf_counter()
    torch_to_onnx(adapter, unet, fp32_dir / "unet.onnx", 17, example)
    row["fp32_onnx_bytes"] = _folder_bytes(fp32_dir)
    row["fp32_onnx_files"] = len(list(fp32_dir.iterdir()))
    row["fp32_export_seconds"] = round(time.perf_counter() - t, 1)
    shutil.rmtree(fp32_dir)
    gc.collect()

    # 2. INT8: ModelOpt fake quant in place (the preset the build uses), calibrated on random
    #    inputs (scales matter, sizes do not), then the export stage's weight folding.
    mtq, _ = import_modelopt()
    calib = [spec.dummy_inputs(2, frames, seed=s) for s in range(points)]

    def forward_loop(m):
        wrapped = adapter.export_module(m)
        for inputs in calib:
            wrapped(*inputs.values())

    t = time.perf_counter()
    with torch.no_grad():
        mtq.quantize(unet, recipes.quant_config("int8"), forward_loop)
    row["kept_fp16_layers"] = round_high_precision_weights(unet)
    row["quantize_seconds"] = round(time.perf_counter() - t, 1)
    raw_dir = workdir / f"{name}-raw"
    raw_dir.mkdir()
    t = time.perf_counter()
    torch_to_onnx(adapter, unet, raw_dir / "unet.onnx", 17, example)
    del unet
    gc.collect()
    graph = onnx.load(str(raw_dir / "unet.onnx"))
    shutil.rmtree(raw_dir)
    onnx_graph.constants_to_initializers(graph)
    fold = onnx_graph.fold_weight_quantization(graph)
    onnx_graph.store_float_weights_fp16(graph)
    int8_dir = workdir / f"{name}-int8"
    int8_dir.mkdir()
    save_onnx(graph, int8_dir / "unet.onnx")  # one .data file beside it above 1.8 GB
    row["int8_export_bytes"] = _folder_bytes(int8_dir)
    row["int8_quantized_weights"] = fold.get("folded", fold.get("encoded"))
    row["int8_export_seconds"] = round(time.perf_counter() - t, 1)
    del graph
    shutil.rmtree(int8_dir)
    gc.collect()
    row["int8_vs_fp32_param_bytes"] = round(row["int8_export_bytes"] / row["fp32_param_bytes"], 4)
    row["int8_vs_fp32_onnx"] = round(row["int8_export_bytes"] / row["fp32_onnx_bytes"], 4)
    row["total_seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    ap.add_argument("--frames", type=int, default=16, help="latent frames of the export example (axes stay dynamic)")
    ap.add_argument("--points", type=int, default=2, help="random calibration inputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="scratch folder for the ONNX files (default: a temp dir)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "family_sizes.json"))
    args = ap.parse_args()

    import torch

    from adm_export.progress import set_progress

    set_progress(False)
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.exists() else {"families": {}}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name in args.families:
            print(f"{name}: building and exporting ...", flush=True)
            before = round(os.getloadavg()[0], 2)
            row = measure(name, Path(tmp), args.frames, args.points)
            row["load_average_before"] = before
            row["load_average_after"] = round(os.getloadavg()[0], 2)
            row["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
            result["families"][name] = row
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")  # after each family: a crash keeps the rest
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "threads": args.threads, "load_average_before": round(load_before, 2),
                         "load_average_after": round(os.getloadavg()[0], 2)}
    result["date"] = time.strftime("%Y-%m-%d")
    result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    path.write_text(json.dumps(result, indent=2) + "\n")

    print("| family | parameters | FP32 (params x 4) | FP32 ONNX | INT8 export | INT8 / FP32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in result["families"].items():
        print(f"| {name} | {r['parameters'] / 1e6:.1f} M | {r['fp32_param_bytes'] / 1e6:.1f} MB | "
              f"{r['fp32_onnx_bytes'] / 1e6:.1f} MB | {r['int8_export_bytes'] / 1e6:.1f} MB | "
              f"{100 * r['int8_vs_fp32_onnx']:.1f}% |")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
