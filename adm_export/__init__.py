"""adm-export: post-training quantization and deployment of text-to-audio diffusion models.

The package is a library first; ``adm_export.cli`` is a thin click front-end over it. Heavy
dependencies (torch, diffusers, ModelOpt, ONNX Runtime, TensorRT) are imported lazily inside the
functions that need them, so ``adm-export --help`` works without them.
"""

__version__ = "0.1.0"
