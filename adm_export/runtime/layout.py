"""What a bundle folder holds: file names and the keys of ``bundle.json``.

Written by the bundle stage (:mod:`adm_export.stages.bundle`), read by the runtime; one home for both::

    BUNDLE/
      manifest.json                 artifact manifest: model, config, SHA-256 of every file, parity
      bundle.json                   what the runtime needs (below)
      unet/                         every file of the build's engines/onnxruntime/ (unet.onnx, external data, ...)
      text_encoder.onnx ...         the family's other components (adm_export.export.components)
      vae_decoder.onnx, vocoder.onnx
      tokenizer/tokenizer.json      for the ``tokenizers`` package (tokenizer_2/ for AudioLDM2's T5)
      scheduler/scheduler_config.json

``bundle.json``::

    family, model_id
    audio:      sampling_rate, hop_length, mel_bins, vae_scale_factor, vae_scaling_factor,
                latent_shape ([C, H, W] with null for the time axis), frames_axis (in the batched
                latent), latent_frames_per_second, frame_multiple, max_seconds
    scheduler:  class_name, config (path)
    unet:       file, inputs ({name: shape, "batch"/"frames" for dynamic axes}), built_for, precision
    components: {name: file}
    text:       tokenizers ({name: {file, model_max_length, pad_id}}) and the family's settings
                (audioldm: uncond_max_length; audioldm2: text_len, generated_len; tango and
                make_an_audio: text_len)
"""

from __future__ import annotations

STAGE = "bundle"
CONFIG_FILE = "bundle.json"
UNET_DIR = "unet"
UNET_FILE = "unet/unet.onnx"
SCHEDULER_FILE = "scheduler/scheduler_config.json"
FORMAT = 1
FAMILIES = ("audioldm", "audioldm2", "tango", "make_an_audio")
