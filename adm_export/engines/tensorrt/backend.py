"""The nvinfer module of TensorRT >= 10 or TensorRT-RTX, chosen at run time, and its logger.

Neither library is imported when this module is imported; :func:`import_nvinfer` picks one.
"""

from __future__ import annotations

import importlib
import logging
import re
from typing import Any

from adm_export.errors import AdmExportError, InvalidInputError, MissingDependencyError

logger = logging.getLogger("adm_export.engines.tensorrt")

FLAVORS = ("auto", "tensorrt", "tensorrt-rtx")
# Warnings that say nothing to act on, logged at DEBUG: TensorRT-RTX widens the FP16 Q/DQ scales
# of an FP16-typed graph (engines.fp16_qdq) to FP32 inside each convolution, once per layer.
_BENIGN_WARNINGS = ("Converting conv activation scales to fp32.", "Converting conv weight scales to fp32.")

# Import names per flavor: the meta package's module first, then the standalone bindings wheel
# (``tensorrt-rtx-cu13-bindings`` installs ``tensorrt_rtx_bindings``).
_MODULES = {
    "tensorrt": ("tensorrt", "tensorrt_bindings"),
    "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings"),
}
LABELS = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
_INSTALL_HINT = (
    "install TensorRT-RTX with: pip install 'adm-export[tensorrt-rtx]' (builds on any machine, engines "
    "run on RTX-class GPUs), or build in the GPU image docker/Dockerfile.gpu (NGC TensorRT base) for "
    "full TensorRT"
)



class EngineBuildError(AdmExportError):
    """TensorRT could not parse the ONNX model or build an engine from it."""



def import_nvinfer(flavor: str = "auto") -> tuple[Any, str]:
    """Import the nvinfer Python module of TensorRT >= 10 or TensorRT-RTX.

    Args:
        flavor: ``"tensorrt"``, ``"tensorrt-rtx"``, or ``"auto"`` (full TensorRT >= 10 if
            importable, else TensorRT-RTX).

    Returns:
        ``(module, flavor_name)`` with ``flavor_name`` ``"tensorrt"`` or ``"tensorrt-rtx"``.

    Raises:
        InvalidInputError: ``flavor`` is not one of :data:`FLAVORS`.
        MissingDependencyError: no suitable module can be imported.
    """
    if flavor not in FLAVORS:
        raise InvalidInputError(
            f"unknown TensorRT flavor {flavor!r}; choose one of {', '.join(FLAVORS)}"
        )
    order = ("tensorrt", "tensorrt-rtx") if flavor == "auto" else (flavor,)
    reasons = []
    for name in order:
        for module_name in _MODULES[name]:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # ImportError, or OSError/RuntimeError from missing CUDA libs
                reasons.append(f"{module_name}: {one_line(exc) or type(exc).__name__}")
                continue
            if not hasattr(module, "Builder"):  # e.g. the PyPI placeholder package
                reasons.append(f"{module_name}: not the nvinfer API")
                continue
            version = str(getattr(module, "__version__", "0"))
            if name == "tensorrt" and _major(version) < 10:
                reasons.append(f"{module_name} {version} is older than 10")
                continue
            logger.debug("Using %s %s (module %s)", LABELS[name], version, module_name)
            return module, name
    wanted = "TensorRT >= 10 or TensorRT-RTX" if flavor == "auto" else LABELS[flavor]
    raise MissingDependencyError(
        f"building engines needs {wanted}, which could not be imported ({'; '.join(reasons)}); "
        f"{_INSTALL_HINT}"
    )


def _major(version: str) -> int:
    match = re.match(r"(\d+)", version)
    return int(match.group(1)) if match else 0


def one_line(value: Any) -> str:
    return " ".join(str(value).split())



class _LogForwarder:
    """Forwards TensorRT's messages to this package's Python logger.

    A mixin: the nvinfer module (``tensorrt`` or ``tensorrt_rtx``) is only known at run time, so the
    logger class is this mixin on that module's ``ILogger``, made once per module by
    :func:`make_logger`. ``quiet`` turns errors and warnings into debug lines while probing (e.g.
    deserializing without a GPU, where errors are expected); ``errors`` keeps the error lines.
    """

    def configure(self, trt: Any, backend: str) -> None:
        severity = trt.ILogger.Severity
        self.error_levels = {int(severity.INTERNAL_ERROR), int(severity.ERROR)}
        self.warning_level, self.info_level = int(severity.WARNING), int(severity.INFO)
        self.tag = LABELS[backend]
        self.quiet = False
        self.errors: list[str] = []

    def log(self, sev, msg):
        sev = int(sev)
        text = str(msg).strip()
        if sev in self.error_levels:
            if not self.quiet:
                self.errors.append(one_line(text))
            level = logging.DEBUG if self.quiet else logging.ERROR
        elif sev == self.warning_level:
            level = logging.DEBUG if self.quiet or text.endswith(_BENIGN_WARNINGS) else logging.WARNING
        elif sev == self.info_level:
            level = logging.DEBUG
        else:  # VERBOSE: very chatty, never forwarded
            return
        if logger.isEnabledFor(level):
            logger.log(level, "[%s] %s", self.tag, text)


_LOGGER_CLASSES: dict[int, type] = {}


def make_logger(trt: Any, backend: str):
    """An ``ILogger`` of ``trt`` (the imported nvinfer module) forwarding to this module's logger."""
    cls = _LOGGER_CLASSES.get(id(trt.ILogger))
    if cls is None:  # the mixin on this module's ILogger (pybind11 classes take Python mixins)
        cls = type(f"{LABELS[backend].replace('-', '')}Logger", (_LogForwarder, trt.ILogger), {})
        _LOGGER_CLASSES[id(trt.ILogger)] = cls
    trt_logger = cls()
    trt_logger.configure(trt, backend)
    return trt_logger
