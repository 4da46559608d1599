"""ONNX Runtime sessions: options, providers, session factory, a numpy runner, and what a graph can serve.

* :class:`OrtOptions` says how a session runs (provider, threads, graph optimisation, IO binding,
  CUDA graphs, NHWC kernels, cuDNN search); :meth:`OrtOptions.serving` resolves the serving
  defaults that ``generate`` and ``eval`` share (on CUDA: IO binding and CUDA graphs on);
  :func:`make_session` turns options into an ``InferenceSession``.
* :func:`graph_info` reads a served graph's inputs, outputs and op types from the file alone
  (no session: a fused CUDA graph cannot even be loaded by the CPU provider), and
  :func:`check_graph_serves` refuses, with one line, option/graph combinations ONNX Runtime
  would crash on or silently run somewhere else.

Nothing here imports torch: the torch-free bundle runtime (issue 12) builds on this module.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

from adm_export.devices import check_device
from adm_export.errors import InvalidInputError, MissingDependencyError, require

logger = logging.getLogger(__name__)

PROVIDERS = ("cpu", "cuda", "tensorrt")
CONV_ALGO_SEARCHES = ("exhaustive", "heuristic", "default")
_OPT_LEVELS = ("disable", "basic", "extended", "all")
_NP = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
       "tensor(int32)": "int32", "tensor(double)": "float64"}
# ONNX elem_type -> ONNX Runtime type string (the form ``session.get_inputs()[i].type`` has).
_ELEM_TO_ORT = {1: "tensor(float)", 10: "tensor(float16)", 7: "tensor(int64)", 6: "tensor(int32)",
                11: "tensor(double)"}
# Contrib ops the diffusion optimizer writes that only the CUDA provider implements.
CUDA_ONLY_OPS = frozenset({"GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclasses.dataclass(frozen=True)
class OrtOptions:
    """How an ONNX Runtime session runs.

    Attributes:
        provider: ``cpu``, ``cuda`` (CUDA execution provider) or ``tensorrt`` (TensorRT execution
            provider, CUDA then CPU as fallbacks; needs TensorRT's libraries).
        device_id: GPU index.
        threads: Intra-op threads of the CPU provider; 0 lets ONNX Runtime choose (all cores).
        optimization_level: Graph optimisation: ``disable``, ``basic``, ``extended`` or ``all``.
        io_binding: On CUDA, bind torch device tensors to the session's inputs and outputs
            instead of copying through host memory.
        cuda_graph: On CUDA, capture each input shape's step as a CUDA graph (needs IO binding;
            one session per shape with the dynamic dimensions pinned).
        prefer_nhwc: Let the CUDA provider use NHWC convolution kernels (inserts layout
            transposes; helps FP16 convolutions on tensor cores).
        conv_algo_search: cuDNN algorithm search: ``exhaustive`` (fastest kernels, slower first
            run of each shape), ``heuristic`` or ``default``.
        trt_fp16: TensorRT provider: allow FP16 kernels.
        trt_int8: TensorRT provider: honour the model's INT8 Q/DQ nodes.
        trt_cache_dir: TensorRT provider: folder for engine and timing caches (``None``: none).
        max_graph_sessions: With ``cuda_graph``: shapes kept at once (each holds its own weights).
    """

    provider: str = "cpu"
    device_id: int = 0
    threads: int = 0
    optimization_level: str = "all"
    io_binding: bool = True
    cuda_graph: bool = False
    prefer_nhwc: bool = False
    conv_algo_search: str = "exhaustive"
    trt_fp16: bool = True
    trt_int8: bool = False
    trt_cache_dir: str | None = None
    max_graph_sessions: int = 4

    def __post_init__(self):
        if self.provider not in PROVIDERS:
            raise InvalidInputError(
                f"invalid --ort-provider {self.provider!r}: choose one of {', '.join(PROVIDERS)}"
            )
        if self.optimization_level not in _OPT_LEVELS:
            raise InvalidInputError(
                f"invalid ONNX Runtime optimization level {self.optimization_level!r}: choose one of "
                f"{', '.join(_OPT_LEVELS)}"
            )
        if self.threads < 0:
            raise InvalidInputError(f"invalid --threads {self.threads}: must be >= 0 (0: all cores)")
        if self.conv_algo_search not in CONV_ALGO_SEARCHES:
            raise InvalidInputError(
                f"invalid --cudnn-search {self.conv_algo_search!r}: choose exhaustive, heuristic or default"
            )
        if self.cuda_graph and self.provider == "cpu":
            raise InvalidInputError("--cuda-graph needs a GPU provider; use --device cuda or drop --cuda-graph")
        if self.prefer_nhwc and self.provider == "cpu":
            raise InvalidInputError("--prefer-nhwc needs a GPU provider; use --device cuda or drop --prefer-nhwc")
        if self.cuda_graph and not self.io_binding:
            raise InvalidInputError(
                "--cuda-graph needs IO binding (the graph replays fixed device buffers); drop --no-io-binding "
                "or pass --no-cuda-graph"
            )
        if self.max_graph_sessions < 1:
            raise InvalidInputError(f"invalid max_graph_sessions {self.max_graph_sessions}: must be >= 1")

    @property
    def on_gpu(self) -> bool:
        return self.provider in ("cuda", "tensorrt")

    @classmethod
    def for_device(cls, device: str, threads: int = 0, **kwargs) -> "OrtOptions":
        """Plain options for ``--device cpu|cuda`` (CUDA provider on ``cuda``, no CUDA graph)."""
        return cls(provider="cuda" if device == "cuda" else "cpu", threads=threads, **kwargs)

    @classmethod
    def serving(cls, device: str, provider: str = "auto", io_binding: bool | None = None,
                cuda_graph: bool | None = None, prefer_nhwc: bool = False, threads: int = 0, device_id: int = 0,
                conv_algo_search: str = "exhaustive") -> "OrtOptions":
        """The options ``generate`` and ``eval`` serve an engine with (one definition for both).

        ``None`` means "the default": IO binding on, and CUDA graphs on whenever the provider is
        a GPU one and IO binding is on (the fastest path measured, DESIGN.md §6). An explicit
        combination that cannot work is refused with one line.

        Args:
            device: ``cpu`` or ``cuda`` (where the pipeline runs).
            provider: ``auto`` (CUDA with ``--device cuda``, else CPU), ``cpu``, ``cuda`` or ``tensorrt``.
            io_binding: ``--io-binding/--no-io-binding``; ``None``: on.
            cuda_graph: ``--cuda-graph/--no-cuda-graph``; ``None``: on for a GPU provider with IO binding.
            prefer_nhwc: ``--prefer-nhwc``.
            threads: CPU provider threads.
            device_id: GPU index.
            conv_algo_search: ``--cudnn-search``.

        Raises:
            InvalidInputError: An impossible combination (e.g. ``--ort-provider cuda --device cpu``).
        """
        check_device(device, available=False)
        if provider not in ("auto", *PROVIDERS):
            raise InvalidInputError(f"invalid --ort-provider {provider!r}: choose auto, cpu, cuda or tensorrt")
        if device == "cpu" and provider in ("cuda", "tensorrt"):
            raise InvalidInputError(
                f"--ort-provider {provider} needs --device cuda (the pipeline and the engine share the GPU)"
            )
        if provider == "auto":
            provider = "cuda" if device == "cuda" else "cpu"
        if cuda_graph and device != "cuda":
            raise InvalidInputError("--cuda-graph needs --device cuda; drop --cuda-graph to run on the CPU")
        io = True if io_binding is None else io_binding
        graph = (provider != "cpu" and io) if cuda_graph is None else cuda_graph
        return cls(provider=provider, threads=threads, device_id=device_id, io_binding=io, cuda_graph=graph,
                   prefer_nhwc=prefer_nhwc, conv_algo_search=conv_algo_search)


def _ort():
    """Import onnxruntime, naming the extra that brings it when it is missing."""
    return require("onnxruntime", "gpu", "ONNX Runtime serving")


def _preload_cuda_libraries(ort) -> None:
    """Load the CUDA / cuDNN libraries the CUDA provider links against.

    onnxruntime-gpu does not find the pip-installed ``nvidia-*`` libraries on its own; importing
    torch first (which loads them) or ``onnxruntime.preload_dlls`` does.
    """
    try:
        import torch  # noqa: F401  (loads libcudart, libcublas, libcudnn from the nvidia wheels)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # pragma: no cover - depends on the GPU machine
            logger.debug("onnxruntime.preload_dlls failed: %s", exc)


def tensorrt_provider_problem() -> str | None:
    """Why ONNX Runtime's TensorRT provider cannot be used here, or ``None`` if it can.

    ``get_available_providers()`` lists the TensorRT provider whenever onnxruntime-gpu was built
    with it, even when TensorRT's own libraries are missing; ONNX Runtime then falls back to CUDA
    when a session is created. So a one-node session is created with it: the providers that
    session actually got say whether TensorRT's libraries load.
    """
    ort = _ort()
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return f"this ONNX Runtime has no TensorRT provider (available: {ort.get_available_providers()})"
    import io

    from onnx import TensorProto, helper

    _preload_cuda_libraries(ort)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.log_severity_level = 4  # the failure is the expected answer here, not a user-facing error
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                           providers=["TensorrtExecutionProvider", "CPUExecutionProvider"])
    except Exception as exc:  # pragma: no cover - depends on the GPU machine
        return f"a TensorRT session could not be created ({' '.join(str(exc).split())[:200]})"
    if "TensorrtExecutionProvider" not in session.get_providers():
        return "TensorRT's libraries (libnvinfer) could not be loaded"
    return None


def providers_for(device_or_options: str | OrtOptions) -> list:
    """Execution providers, each with its options, for ``cpu``/``cuda`` or an :class:`OrtOptions`.

    GPU providers list the CPU provider last, so ops without a GPU kernel still run.

    Raises:
        InvalidInputError: A GPU provider was asked for but this ONNX Runtime lacks it.
    """
    opts = device_or_options if isinstance(device_or_options, OrtOptions) else OrtOptions.for_device(
        device_or_options)
    ort = _ort()
    if not opts.on_gpu:
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise InvalidInputError(
            f"--device cuda needs ONNX Runtime's CUDA provider, but only {available} are available; "
            "install onnxruntime-gpu (pip install 'adm-export[gpu]') or use --device cpu"
        )
    cuda = {
        "device_id": str(opts.device_id),
        "cudnn_conv_algo_search": opts.conv_algo_search.upper(),
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
    }
    if opts.cuda_graph:
        cuda["enable_cuda_graph"] = "1"
    if opts.prefer_nhwc:
        cuda["prefer_nhwc"] = "1"
    providers: list = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    if opts.provider == "tensorrt":
        if "TensorrtExecutionProvider" not in available:
            raise InvalidInputError(
                f"--ort-provider tensorrt needs ONNX Runtime's TensorRT provider, but only {available} are "
                "available; install onnxruntime-gpu with TensorRT, or use --ort-provider cuda"
            )
        trt = {"device_id": str(opts.device_id), "trt_fp16_enable": str(opts.trt_fp16),
               "trt_int8_enable": str(opts.trt_int8), "trt_int8_use_native_calibration_table": "False",
               "trt_cuda_graph_enable": str(opts.cuda_graph)}
        if opts.trt_cache_dir:
            Path(opts.trt_cache_dir).mkdir(parents=True, exist_ok=True)
            trt.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(opts.trt_cache_dir),
                       trt_timing_cache_enable="True", trt_timing_cache_path=str(opts.trt_cache_dir))
        providers.insert(0, ("TensorrtExecutionProvider", trt))
    return providers


def session_options(opts: OrtOptions, optimized_path: str | Path | None = None,
                    static_dims: dict[str, int] | None = None):
    """``onnxruntime.SessionOptions`` for ``opts``.

    Args:
        opts: Session settings.
        optimized_path: If given, ONNX Runtime writes its optimised graph there.
        static_dims: Free-dimension overrides (e.g. ``{"batch": 2, "frames": 256}``): the graph's
            symbolic dimensions become constants, so shape computations fold away (needed for
            CUDA graphs, which cannot hold host-side shape ops).
    """
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opts.optimization_level]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
    if opts.threads:
        so.intra_op_num_threads = opts.threads
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    for name, value in (static_dims or {}).items():
        so.add_free_dimension_override_by_name(name, int(value))
    return so


def make_session(path: str | Path, device: str = "cpu", threads: int = 0, optimized_path: str | Path | None = None,
                 *, options: OrtOptions | None = None, static_dims: dict[str, int] | None = None):
    """Create an ONNX Runtime inference session.

    Args:
        path: ONNX file.
        device: ``cpu`` or ``cuda`` (ignored when ``options`` is given).
        threads: Intra-op threads; 0 lets ONNX Runtime choose (ignored when ``options`` is given).
        optimized_path: If given, ONNX Runtime writes its optimised graph there.
        options: Full session settings.
        static_dims: Free-dimension overrides (see :func:`session_options`).

    Raises:
        MissingDependencyError: A GPU provider was asked for but could not be loaded (ONNX Runtime
            would otherwise fall back to the CPU without saying so).
    """
    opts = options or OrtOptions.for_device(device, threads)
    ort = _ort()
    if opts.on_gpu:
        _preload_cuda_libraries(ort)
    providers = providers_for(opts)
    session = ort.InferenceSession(str(path), sess_options=session_options(opts, optimized_path, static_dims),
                                   providers=providers)
    if opts.on_gpu and "CUDAExecutionProvider" not in session.get_providers():
        raise MissingDependencyError(
            f"ONNX Runtime could not load its CUDA provider (session runs on {session.get_providers()}); "
            "install the CUDA 12/13 and cuDNN 9 libraries onnxruntime-gpu was built for, or use --device cpu"
        )
    if opts.provider == "tensorrt" and "TensorrtExecutionProvider" not in session.get_providers():
        raise MissingDependencyError(
            "ONNX Runtime could not load its TensorRT provider (TensorRT's libraries are missing); "
            "use --ort-provider cuda"
        )
    return session


@dataclasses.dataclass(frozen=True)
class GraphInfo:
    """What a served ONNX file declares, read without creating a session.

    Attributes:
        inputs: Input name -> ONNX Runtime type string (``tensor(float16)``), in graph order.
        output_name: The first output's name.
        output_type: Its ONNX Runtime type string.
        ops: Op-type counts.
    """

    inputs: dict[str, str]
    output_name: str
    output_type: str
    ops: dict[str, int]

    @property
    def has_qdq(self) -> bool:
        return any(self.ops.get(op) for op in QDQ_OPS)

    @property
    def cuda_only_ops(self) -> dict[str, int]:
        return {op: n for op, n in sorted(self.ops.items()) if op in CUDA_ONLY_OPS}


def graph_info(path: str | Path) -> GraphInfo:
    """Inputs, output and op counts of an ONNX file (its external weights are not read)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    ort_type = lambda v: _ELEM_TO_ORT.get(v.type.tensor_type.elem_type, "tensor(float)")  # noqa: E731
    inputs = {v.name: ort_type(v) for v in graph.input if v.name not in inits}
    return GraphInfo(inputs=inputs, output_name=graph.output[0].name, output_type=ort_type(graph.output[0]),
                     ops=dict(collections.Counter(n.op_type for n in graph.node)))


def check_graph_serves(info: GraphInfo, opts: OrtOptions, label: str = "the engine") -> None:
    """Refuse, with one line, a graph/options pair that ONNX Runtime would crash on or misrun.

    * ``prefer_nhwc`` on a Q/DQ graph: the CUDA provider's NHWC layout transform mis-shapes
      quantized convolutions ("Input channels C is not equal to kernel channels * group",
      measured on an H200 with onnxruntime-gpu 1.31).
    * A graph with CUDA-only contrib ops (the fused CUDA engine) on the CPU provider: session
      creation would fail with "Could not find an implementation for GroupNorm".

    Raises:
        InvalidInputError: The combination cannot run.
    """
    if opts.prefer_nhwc and info.has_qdq:
        raise InvalidInputError(
            f"--prefer-nhwc cannot serve {label}: it is a Q/DQ graph, and ONNX Runtime's NHWC transform breaks "
            "quantized convolutions; drop --prefer-nhwc (or serve the CUDA engine of `adm-export engine --device cuda`)"
        )
    if not opts.on_gpu and info.cuda_only_ops:
        raise InvalidInputError(
            f"{label} is a CUDA engine (fused ops {', '.join(info.cuda_only_ops)} run only on ONNX Runtime's CUDA "
            "provider); serve it with --device cuda, or build a CPU engine with `adm-export engine --device cpu`"
        )


def torch_dtype(ort_type: str):
    """The torch dtype of an ONNX Runtime type string such as ``tensor(float16)``."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
            "float64": torch.float64}[_NP.get(ort_type, "float32")]


class OrtRunner:
    """Runs a session on named numpy inputs, casting to the dtypes the graph declares."""

    _NP = _NP

    def __init__(self, session):
        self.session = session
        self.input_types = {i.name: self._NP.get(i.type, "float32") for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]

    def __call__(self, inputs: dict[str, Any]):
        import numpy as np

        feed = {}
        for name, value in inputs.items():
            if name not in self.input_types:
                continue
            arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            feed[name] = np.ascontiguousarray(arr.astype(self.input_types[name], copy=False))
        return self.session.run(self.output_names, feed)[0]
