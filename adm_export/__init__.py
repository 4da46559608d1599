"""adm-export: post-training quantization and deployment of text-to-audio diffusion models.

The stages, each taking its config and returning a typed result (a dataclass with ``to_dict()``);
an input from an earlier stage is its folder or its result::

    calibrate(CalibrationConfig, out)                       -> CalibrateResult
    quantize_model(QuantizeConfig, calibration, out)        -> QuantizeResult
    export_onnx(ExportConfig, quantized, calibration, out)  -> ExportResult
    export_baseline(FullPrecisionExportConfig, out)         -> ExportResult
    build_engines(EngineConfig, onnx, out)                  -> EngineResult
    evaluate(EvalConfig, engine, out=None)                  -> EvalResult
    build(BuildConfig)                                      -> BuildResult
    generate(GenerateConfig, out)                           -> GenerateResult
    bundle(BundleConfig)                                    -> BundleResult
    serve(ServeConfig | RayServeConfig)                     -> None (serves until SIGTERM)

Example (the embedded tiny model; a few seconds each on a CPU)::

    import adm_export as ae

    model = "tiny-audioldm"
    cal = ae.calibrate(ae.CalibrationConfig(model=model, num_prompts=2, steps=2, points=4), "work/calibration")
    q = ae.quantize_model(ae.QuantizeConfig(precision="int8"), cal, "work/quantized")
    onnx = ae.export_onnx(ae.ExportConfig(parity_points=1), q, cal, "work/onnx")
    engines = ae.build_engines(ae.EngineConfig(), onnx, "work/engines")
    clips = ae.generate(ae.GenerateConfig(engine_dir=str(engines.out), prompts=("a dog barks",)), "work/clips")

Every stage runs once through the stage runner (:mod:`adm_export.stages.runner`): the output folder
is checked and locked, written atomically, sharded under torchrun, and cleaned up on SIGINT /
SIGTERM. User errors raise :class:`AdmExportError` subclasses (one-line messages naming the option).
The CLI (``adm-export``) is a thin layer over these functions.

Nothing heavy is imported by ``import adm_export``: names resolve on first use (Optimum's
``_import_structure`` pattern), and torch, diffusers, ModelOpt, ONNX Runtime and TensorRT are
imported only inside the stages that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adm_export.version import __version__

#: Module -> public names it provides.
_import_structure: dict[str, list[str]] = {
    "adm_export.stages.api": ["calibrate", "quantize_model", "export_onnx", "export_baseline", "build_engines",
                              "evaluate", "build", "generate", "bundle", "serve"],
    "adm_export.config": ["CalibrationConfig", "QuantizeConfig", "ExportConfig", "FullPrecisionExportConfig",
                          "EngineConfig", "EvalConfig", "BuildConfig", "BundleConfig", "Precision", "Placement",
                          "EngineBackend", "SelectMethod"],
    "adm_export.stages.generate": ["GenerateConfig"],
    "adm_export.serving.config": ["ServeConfig", "RayServeConfig"],
    "adm_export.stages.results": ["CalibrateResult", "QuantizeResult", "ExportResult", "EngineResult", "EvalResult",
                                  "BuildResult", "GenerateResult", "BundleResult"],
    "adm_export.errors": ["AdmExportError", "InvalidInputError", "ArtifactNotFoundError", "ManifestMismatchError",
                          "OutputExistsError", "OutputLockedError", "OutOfMemoryError", "MissingDependencyError",
                          "ModelNotFoundError"],
    "adm_export.models": ["load_model"],
}
_MODULE_OF = {name: module for module, names in _import_structure.items() for name in names}
__all__ = ["__version__", *_MODULE_OF]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names resolve lazily
    # ruff: noqa: F401 (re-exported through __all__, which is built from _import_structure)
    from adm_export.config import (BuildConfig, BundleConfig, CalibrationConfig, EngineBackend, EngineConfig,
                                   EvalConfig, ExportConfig, FullPrecisionExportConfig, Placement, Precision,
                                   QuantizeConfig, SelectMethod)
    from adm_export.errors import (AdmExportError, ArtifactNotFoundError, InvalidInputError, ManifestMismatchError,
                                   MissingDependencyError, ModelNotFoundError, OutOfMemoryError, OutputExistsError,
                                   OutputLockedError)
    from adm_export.models import load_model
    from adm_export.serving.config import RayServeConfig, ServeConfig
    from adm_export.stages.api import (build, build_engines, bundle, calibrate, evaluate, export_baseline,
                                       export_onnx, generate, quantize_model, serve)
    from adm_export.stages.generate import GenerateConfig
    from adm_export.stages.results import (BuildResult, BundleResult, CalibrateResult, EngineResult, EvalResult,
                                           ExportResult, GenerateResult, QuantizeResult)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'adm_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
