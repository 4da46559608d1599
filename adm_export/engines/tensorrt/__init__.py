"""TensorRT and TensorRT-RTX engines from the exported (Q/DQ) ONNX denoiser.

TensorRT >= 10 (``import tensorrt``) and TensorRT-RTX (``import tensorrt_rtx``) share the nvinfer
Python API (Builder, OnnxParser, BuilderConfig, optimization profiles, engine inspector), so one
code path serves both; :func:`import_nvinfer` picks the module at run time. Neither is imported
when this package is imported. Modules: ``backend`` (the module and its logger), ``profile``
(optimization profiles from the denoiser spec), ``build`` (parse, configure, build, write),
``timing_cache`` (shared timing cache under a file lock), ``inspection`` (the layer report).

Where the two differ (checked against TensorRT-RTX 1.7):

* TensorRT-RTX has no precision builder flags (``FP16``, ``INT8``, ``FP8``) and no INT8
  calibrator: precision comes from the graph (explicit Q/DQ, casts). TensorRT 11 went the same
  way. Quantized graphs are therefore built as strongly typed networks
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, the only creation flag TensorRT-RTX has).
* TensorRT-RTX builds ahead of time on a CPU-only machine, for compute capabilities 8.0, 8.6,
  8.9 and 12.x by default; its kernels are compiled on the target GPU at run time. Its timing
  cache calls are documented no-ops since 1.2, and on a machine without a GPU, loading a saved
  cache makes it probe CUDA and log errors, so the timing cache is used with full TensorRT only.
* Deserializing an engine (and so the engine inspector) needs a CUDA device with either backend.

The layer report says which evidence it rests on (``"source"``):

``engine_inspector``
    ``ICudaEngine.create_engine_inspector()`` JSON, when the engine deserializes here (a GPU).
``engine_plan``
    TensorRT-RTX only: its plan embeds a readable listing of the compiled program (op kind, the
    ONNX layers each kernel implements, every tensor's data type). It is undocumented, so it is
    read on a best-effort basis and used only where it names the network's convolutions/GEMMs.
``network_definition``
    The parsed, strongly typed network: each convolution/matmul is reported in the data type its
    inputs are dequantized from (INT8, FP8, ...) or, if not quantized, their own type. This is
    what the graph asks for, not proof of the kernel chosen; standalone Q/DQ are then unknown.

Whichever engine source covers more of the network's convolutions/matmuls is used; layers it does
not cover fall back to the network definition (``precision_from`` in ``layers.json``).
"""

from adm_export.engines.tensorrt.backend import FLAVORS, EngineBuildError, import_nvinfer
from adm_export.engines.tensorrt.build import LAYERS_NAME, PLAN_NAME, build_engine
from adm_export.engines.tensorrt.profile import EngineProfile

__all__ = ["FLAVORS", "LAYERS_NAME", "PLAN_NAME", "EngineBuildError", "EngineProfile", "build_engine", "import_nvinfer"]
