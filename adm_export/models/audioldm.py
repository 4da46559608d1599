"""AudioLDM adapter (diffusers ``AudioLDMPipeline``).

AudioLDM's U-Net is conditioned FiLM-style: ``class_labels`` carries the L2-normalised CLAP text
embedding (512-d for the published checkpoints), ``encoder_hidden_states`` is ``None`` and the
attention blocks are self-attention only. Classifier-free guidance doubles the batch.
"""

from __future__ import annotations

from typing import Any, Sequence

from adm_export.models.base import DenoiserSpec, DiffusersUNetAdapter, TensorSpec


class AudioLDMAdapter(DiffusersUNetAdapter):
    """Adapter of diffusers' ``AudioLDMPipeline`` (AudioLDM-S/M/L and the embedded tiny model)."""

    family = "audioldm"

    def denoiser_spec(self) -> DenoiserSpec:
        cfg = self.pipeline.unet.config
        vocoder = self.pipeline.vocoder.config
        scale = self.pipeline.vae_scale_factor
        hop = self.vocoder_hop()
        mel_fps = vocoder.sampling_rate / hop
        mel_bins = vocoder.model_in_dim
        n_down = len(cfg.block_out_channels) - 1
        return DenoiserSpec(
            inputs=(
                TensorSpec("sample", ("batch", cfg.in_channels, "frames", mel_bins // scale)),
                TensorSpec("timestep", ("batch",)),
                TensorSpec("class_labels", ("batch", cfg.projection_class_embeddings_input_dim)),
            ),
            outputs=(TensorSpec("noise_pred", ("batch", cfg.out_channels, "frames", mel_bins // scale)),),
            latent_frames_per_second=mel_fps / scale,
            frame_multiple=2 ** n_down,
        )

    def inputs_from_call(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        import torch

        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        class_labels = kwargs.get("class_labels")
        if class_labels is None and len(args) > 3:
            class_labels = args[3]
        t = torch.as_tensor(t, device=sample.device)
        # The engine takes one timestep per batch row, as float32 (TensorRT and ONNX Runtime
        # both handle float inputs on every path; int64 is not supported by every TRT layer).
        t = t.float().reshape(-1).expand(sample.shape[0]).contiguous()
        return {"sample": sample, "timestep": t, "class_labels": class_labels}

    def export_module(self, denoiser=None):
        from adm_export.models.denoisers import AudioLDMDenoiser

        return AudioLDMDenoiser(denoiser if denoiser is not None else self.denoiser)



    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, audio_seconds: float,
                 guidance_scale: float) -> list:
        import torch

        device = self.pipeline.device if hasattr(self.pipeline, "device") else "cpu"
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        # Initial noise is drawn on the CPU from per-prompt generators, so a clip depends only
        # on its own prompt and seed, not on the batch it was generated in or the device.
        latents = torch.stack([
            torch.randn(self._latent_shape(audio_seconds), generator=g) for g in generators
        ]).to(device)
        with torch.inference_mode():
            out = self.pipeline(
                prompt=list(prompts),
                num_inference_steps=steps,
                audio_length_in_s=audio_seconds,
                guidance_scale=guidance_scale,
                latents=latents,  # the pipeline scales by init_noise_sigma itself
                output_type="np",
            )
        return [a.astype("float32") for a in out.audios]

    def _latent_shape(self, seconds: float) -> tuple[int, ...]:
        spec = self.denoiser_spec()
        shape = spec.concrete_shape("sample", {"batch": 1, "frames": self.pipeline_latent_frames(seconds)})
        return shape[1:]
