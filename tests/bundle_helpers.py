"""Helpers of the bundle tests: an engines folder per family, and each family's diffusers pipeline run on
the runtime's own initial noise (and DDPM step noise), for the equivalence tests (CPU and GPU)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from unittest import mock

import numpy as np


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def fp32_engines(adapter, build_dir: Path) -> Path:
    """``build_dir/engines``: the model's unquantized FP32 U-Net as an ONNX Runtime engine (the real stages).

    The optional TensorRT-RTX plan is skipped (the bundle uses the ONNX Runtime engine only; the
    plan would cost ~20 s per model on this CPU).
    """
    from adm_export.config import EngineConfig
    from adm_export.engines.stage import build_engines
    from adm_export.errors import MissingDependencyError
    from adm_export.config import FullPrecisionExportConfig
    from adm_export.export.fp16 import export_full_precision

    spec = adapter.denoiser_spec()
    onnx_dir = build_dir / "onnx"
    export_full_precision(FullPrecisionExportConfig(model=adapter.model_id, fp16=False, parity=False), onnx_dir,
                          adapter=adapter)
    with mock.patch("adm_export.engines.tensorrt.import_nvinfer",
                    side_effect=MissingDependencyError("TensorRT-RTX plan skipped in this test")):
        build_engines(EngineConfig(), onnx_dir, build_dir / "engines", adapter=adapter,
                      frames=2 * spec.frame_multiple)
    return build_dir / "engines"


class _RowNoise:
    """Stands in for diffusers' ``randn_tensor`` in DDPM steps: row i from numpy generator i."""

    def __init__(self, rngs):
        self.rngs = rngs

    def __call__(self, shape, generator=None, device=None, dtype=None, **_):
        import torch

        rows = [r.standard_normal(tuple(shape[1:]), dtype=np.float32) for r in self.rngs]
        return torch.from_numpy(np.stack(rows)).to(device=device or "cpu", dtype=dtype or torch.float32)


@contextlib.contextmanager
def _ddpm_noise(rngs):
    with mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", _RowNoise(rngs)):
        yield


def pipeline_reference(adapter, rt, reqs, denoiser=None, same_text=False):
    """Per request: (final latents, waveform) of the family's diffusers pipeline on the runtime's noise.

    Each request runs alone (the pipelines take one guidance scale per call). The initial latents
    are the runtime's (:meth:`BundleRuntime.initial_noise`); DDPM's step noise is drawn from a
    copy of the same numpy generator, so both sides add identical noise.

    Args:
        denoiser: Run the pipeline with this denoiser (e.g. the ONNX Runtime engine) instead of its own.
        same_text: AudioLDM only: feed the pipeline the runtime's text embeddings (its ONNX text
            encoder) instead of torch's. Needed where the denoiser quantizes activations: a 1e-7
            difference in the conditioning can move values across an INT8 rounding boundary, and
            over a few steps that grew to 1e-2 on one CPU and stayed below 1e-3 on another.
    """
    import torch

    pipe = adapter.pipeline
    out = []
    ctx = adapter.using_denoiser(denoiser) if denoiser is not None else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        for r in reqs:
            noise, rng = rt.initial_noise(r)
            latents = torch.from_numpy(noise[None].copy())
            seconds = rt.latent_frames(r.seconds) / rt.audio["latent_frames_per_second"]
            common = dict(num_inference_steps=r.steps, guidance_scale=r.guidance_scale, latents=latents)
            if adapter.family in ("audioldm", "audioldm2"):
                final = {}

                def keep(i, t, lat, final=final):
                    final["latents"] = lat.clone()

                kwargs = dict(prompt=[r.prompt])
                if same_text and adapter.family == "audioldm":
                    cond, uncond = rt.conditioning(r.prompt, r.guidance_scale > 1.0)
                    kwargs = dict(prompt_embeds=torch.from_numpy(cond["class_labels"]))
                    if uncond is not None:
                        kwargs["negative_prompt_embeds"] = torch.from_numpy(uncond["class_labels"])
                elif adapter.family == "audioldm2":
                    guidance = r.guidance_scale > 1.0
                    states, mask, generated = adapter.encode(r.prompt, guidance)
                    c = slice(1, 2) if guidance else slice(0, 1)
                    kwargs = dict(prompt_embeds=states[c], attention_mask=mask[c], generated_prompt_embeds=generated[c])
                    if guidance:
                        kwargs.update(negative_prompt_embeds=states[:1], negative_attention_mask=mask[:1],
                                      negative_generated_prompt_embeds=generated[:1])
                # A length whose latent is exactly the runtime's (then cut to the request's samples).
                wav = pipe(**kwargs, audio_length_in_s=seconds + 0.5 / rt.sampling_rate, output_type="np",
                           callback=keep, callback_steps=1, **common).audios[0]
                lat = final["latents"][0].numpy()
            else:
                runs = {}
                for output_type in ("latent", "np"):
                    with _ddpm_noise([copy.deepcopy(rng)]):
                        runs[output_type] = pipe([r.prompt], audio_length_in_s=seconds, output_type=output_type,
                                                 **common).audios
                lat, wav = runs["latent"][0].numpy(), runs["np"][0]
            n = int(round(r.seconds * rt.sampling_rate))
            out.append((lat, np.asarray(wav, np.float32)[:n]))
    return out


def cpu_int8_features() -> str:
    """The x86 features that pick ONNX Runtime's INT8 kernels (for failure messages: CI's CPU is not ours)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"]
    return f"{model}: " + " ".join(f for f in wanted if f in flags)
