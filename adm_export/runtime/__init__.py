"""Torch-free runtime of a deployable bundle (``adm-export bundle``): ONNX Runtime, numpy, ``tokenizers``.

Nothing in this package imports torch, diffusers or transformers, even lazily::

    from adm_export.runtime import BundleRuntime, GenerationRequest, RuntimeOptions

    rt = BundleRuntime("bundle/", RuntimeOptions(device="cpu"))
    [wav] = rt.generate([GenerationRequest("a siren wails", seconds=2.56, steps=10, guidance_scale=2.5, seed=0)])
"""

from adm_export.runtime.bundle_runtime import BundleRuntime, SampleResult
from adm_export.runtime.types import GenerationRequest, RuntimeOptions

__all__ = ["BundleRuntime", "GenerationRequest", "RuntimeOptions", "SampleResult"]
