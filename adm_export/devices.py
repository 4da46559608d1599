"""The ``--device`` check, device and dtype placement of denoiser inputs, and FP32 arithmetic on a GPU.

:func:`check_device` is the one check of a device name and of CUDA being there; every config,
stage, session and the runtime use it.

Stages keep their data on the CPU (the calibration cache is read from safetensors onto the host,
parity points come from it, references are compared there), while the model runs where
``--device`` put it. Every call of a denoiser on stored inputs goes through :func:`to_module`, so
the inputs follow the module (device and floating dtype) instead of each call site moving them —
the class of bug where ``quantize --device cuda`` died with "mat1 is on cpu".

:func:`exact_float32` turns TF32 off while a stage measures small differences on a GPU: cuDNN
runs FP32 convolutions in TF32 by default (10-bit mantissa, ~1e-3 relative error per layer), which
is the size of the quantization errors, sensitivities and ONNX Runtime-vs-torch gaps being
measured. On the CPU it changes nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

#: Devices every stage runs on (``--device``).
DEVICES = ("cpu", "cuda")


def check_device(device: str, flag: str = "--device", *, available: bool = True, index: bool = False) -> str:
    """The one check of a device (configs, load_model, exports, sessions, embedders, the runtime).

    Args:
        device: ``cpu`` or ``cuda`` (``cuda:N`` too where ``index`` is set).
        flag: The option that set it, for the message.
        available: Also refuse ``cuda`` when torch sees no CUDA GPU (imports torch). Configs pass
            ``False`` so that a bad option is refused without importing torch; the stages check
            availability where the work starts (``load_model``, the exports, sessions).
        index: Accept ``cuda:N``.

    Returns:
        ``device``.

    Raises:
        InvalidInputError: Not a device name, or (``available``) CUDA is not available.
    """
    from adm_export.errors import InvalidInputError

    indexed = index and isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit()
    if not isinstance(device, str) or (device not in DEVICES and not indexed):
        raise InvalidInputError(f"invalid {flag} {device!r}: choose {' or '.join(DEVICES)}")
    if available and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
            raise InvalidInputError(f"{flag} {device} but torch {torch.__version__} sees no CUDA GPU ({why}); "
                                    f"use {flag} cpu, or run on a machine with an NVIDIA GPU and a CUDA build of "
                                    "torch")
    return device


#: Inputs never narrowed below FP32 when a module runs in FP16/BF16: the engines take FP32
#: timesteps, and FP16 cannot hold every fractional timestep a scheduler may produce.
FP32_INPUTS = ("timestep",)


def module_placement(module) -> tuple[Any, Any]:
    """``(device, floating dtype)`` of a module's first floating parameter (else buffer).

    Returns:
        ``(None, None)`` for an object without floating tensors (an ONNX Runtime denoiser, a
        plain callable): its inputs are left where they are.
    """
    tensors = []
    for attr in ("parameters", "buffers"):
        fn = getattr(module, attr, None)
        if callable(fn):
            tensors.append(fn())
    for it in tensors:
        for t in it:
            if t.is_floating_point():
                return t.device, t.dtype
    return None, None


class PlacedModule:
    """Mixin: ``.device`` and ``.dtype`` of a torch module, read from its parameters.

    diffusers' pipelines ask their components for both (its ``ModelMixin`` has them); the plain
    ``nn.Module`` components written here (Make-An-Audio's U-Net, text encoder, vocoder) take them
    from this mixin: ``class X(PlacedModule, nn.Module)``."""

    @property
    def device(self):
        return module_placement(self)[0]

    @property
    def dtype(self):
        return module_placement(self)[1]


def to_module(inputs: dict[str, Any], module) -> dict[str, Any]:
    """``inputs`` moved to ``module``'s device, floating tensors in its dtype (order kept).

    A timestep (:data:`FP32_INPUTS`) takes the wider of FP32 and the module's dtype (FP32 for an
    FP16 module, FP64 for an FP64 one). Integer tensors keep their dtype; non-tensors pass through.
    Tensors already in place are returned as they are (no copy).
    """
    import torch

    device, dtype = module_placement(module)
    if device is None:
        return dict(inputs)
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                want = torch.promote_types(dtype, torch.float32) if name in FP32_INPUTS else dtype
                value = value.to(device=device, dtype=want)
            else:
                value = value.to(device=device)
        out[name] = value
    return out


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Run FP32 convolutions and matmuls in IEEE FP32 (no TF32) inside the block; restored after.

    Uses torch's ``fp32_precision`` settings where they exist (torch >= 2.9; mixing them with the
    legacy ``allow_tf32`` flags is an error there), else the legacy flags.
    """
    import torch

    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        saved = (cudnn_conv.fp32_precision, matmul.fp32_precision)
        cudnn_conv.fp32_precision = "ieee"
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            cudnn_conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)  # pragma: no cover - torch < 2.9
    torch.backends.cudnn.allow_tf32 = False
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved
