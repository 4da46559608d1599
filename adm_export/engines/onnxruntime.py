"""ONNX Runtime serving: session factory, IO binding, CUDA graphs, and a denoiser for the pipeline.

* :class:`OrtOptions` says how a session runs (provider, threads, graph optimisation, IO binding,
  CUDA graphs, NHWC kernels); :func:`make_session` turns it into an ``InferenceSession``.
* :class:`OrtEngine` runs a session on named torch tensors. On the CPU it feeds numpy arrays; on
  CUDA it binds the torch tensors' device memory directly (IO binding: no host round trip), cast
  to the dtypes the graph declares (FP16 inputs and outputs for an FP16 export). With
  ``cuda_graph`` it pins the dynamic dimensions per input shape (one session per shape, built on
  first use), so every shape computation folds away and the whole step is captured as one CUDA
  graph that later calls replay from fixed input and output buffers.
* :func:`make_ort_denoiser` wraps an engine into a ``torch.nn.Module`` with the U-Net's call
  signature and output type, so diffusers' own sampler runs with the engine inside (``generate``
  and ``eval`` share one sampler for the baseline and the engine). The adapter turns the
  pipeline's call into the named engine inputs, so the same class serves every model family.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path
from typing import Any

from adm_export.errors import InvalidInputError, MissingDependencyError, require

logger = logging.getLogger(__name__)

PROVIDERS = ("cpu", "cuda", "tensorrt")
_OPT_LEVELS = ("disable", "basic", "extended", "all")
_NP = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
       "tensor(int32)": "int32", "tensor(double)": "float64"}


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
        cuda_graph: On CUDA, capture each input shape's step as a CUDA graph (implies IO binding
            and one session per shape with the dynamic dimensions pinned).
        prefer_nhwc: Let the CUDA provider use NHWC convolution kernels (inserts layout
            transposes; helps FP16 convolutions on tensor cores).
        conv_algo_search: cuDNN algorithm search: ``exhaustive`` (fastest kernels, slower first
            run), ``heuristic`` or ``default``.
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
        if self.conv_algo_search not in ("exhaustive", "heuristic", "default"):
            raise InvalidInputError(
                f"invalid cuDNN algorithm search {self.conv_algo_search!r}: choose exhaustive, heuristic or default"
            )
        if self.cuda_graph and self.provider == "cpu":
            raise InvalidInputError("--cuda-graph needs a GPU provider; use --device cuda or drop --cuda-graph")
        if self.max_graph_sessions < 1:
            raise InvalidInputError(f"invalid max_graph_sessions {self.max_graph_sessions}: must be >= 1")

    @property
    def on_gpu(self) -> bool:
        return self.provider in ("cuda", "tensorrt")

    @classmethod
    def for_device(cls, device: str, threads: int = 0, **kwargs) -> "OrtOptions":
        """Options for ``--device cpu|cuda`` (CUDA provider on ``cuda``)."""
        return cls(provider="cuda" if device == "cuda" else "cpu", threads=threads, **kwargs)


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
    return session


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


class _GraphSlot:
    """One static-shape session with the fixed buffers its captured CUDA graph reads and writes."""

    def __init__(self, session, inputs: dict, output):
        self.session = session
        self.inputs = inputs
        self.output = output
        self.binding = session.io_binding()
        for name, buf in inputs.items():
            self.binding.bind_input(name, "cuda", buf.device.index or 0, _np_dtype(buf), list(buf.shape),
                                    buf.data_ptr())
        out_name = session.get_outputs()[0].name
        self.binding.bind_output(out_name, "cuda", output.device.index or 0, _np_dtype(output), list(output.shape),
                                 output.data_ptr())


def _np_dtype(t):
    import numpy as np

    return {"torch.float16": np.float16, "torch.float32": np.float32, "torch.int64": np.int64,
            "torch.int32": np.int32, "torch.float64": np.float64}[str(t.dtype)]


class OrtEngine:
    """An ONNX model served by ONNX Runtime, called with named torch tensors.

    Args:
        path: ONNX file.
        spec: The denoiser spec (names the dynamic dimensions, gives the output shape).
        options: Session settings.
        session: An already created session (CPU or dynamic-shape CUDA path only).
    """

    def __init__(self, path: str | Path, spec, options: OrtOptions | None = None, session=None):
        self.path = Path(path)
        self.spec = spec
        self.options = options or OrtOptions()
        self.calls = 0
        self._slots: collections.OrderedDict = collections.OrderedDict()
        self._session = session
        if self._session is None and not self.options.cuda_graph:
            self._session = make_session(self.path, options=self.options)
        probe = self._session or make_session(self.path, options=dataclasses.replace(
            self.options, cuda_graph=False, provider="cpu", threads=1, optimization_level="disable"))
        self.input_types = {i.name: i.type for i in probe.get_inputs()}
        self.output_name = probe.get_outputs()[0].name
        self.output_type = probe.get_outputs()[0].type
        self._runner = OrtRunner(self._session) if self._session is not None else None

    @property
    def session(self):
        """The dynamic-shape session (``None`` with ``cuda_graph``: sessions are per shape)."""
        return self._session

    def dims(self, inputs: dict) -> dict[str, int]:
        """Values of the spec's dynamic dimensions (``batch``, ``frames``) in ``inputs``."""
        dims: dict[str, int] = {}
        for t in self.spec.inputs:
            if t.name not in inputs:
                continue
            for axis, d in enumerate(t.shape):
                if isinstance(d, str):
                    dims.setdefault(d, int(inputs[t.name].shape[axis]))
        return dims

    def __call__(self, inputs: dict[str, Any]):
        """Run one step; returns a torch tensor on the inputs' device in the graph's output dtype."""
        import torch

        self.calls += 1
        first = next(iter(inputs.values()))
        if not self.options.on_gpu:
            return torch.from_numpy(self._runner(inputs)).to(first.device)
        if self.options.cuda_graph:
            return self._run_graph(inputs)
        if not self.options.io_binding:
            return torch.from_numpy(self._runner(inputs)).to(first.device)
        return self._run_bound(inputs)

    def _device(self):
        import torch

        return torch.device("cuda", self.options.device_id)

    def _cast(self, inputs: dict) -> dict:
        """The graph's inputs as contiguous tensors of the declared dtypes on the engine's GPU."""
        dev = self._device()
        return {name: inputs[name].to(device=dev, dtype=torch_dtype(t)).contiguous()
                for name, t in self.input_types.items()}

    def _empty_output(self, dims: dict[str, int]):
        import torch

        shape = self.spec.concrete_shape(self.spec.outputs[0].name, dims)
        return torch.empty(shape, dtype=torch_dtype(self.output_type), device=self._device())

    def _run_bound(self, inputs: dict):
        import torch

        feed = self._cast(inputs)
        out = self._empty_output(self.dims(feed))
        binding = self._session.io_binding()
        for name, t in feed.items():
            binding.bind_input(name, "cuda", self.options.device_id, _np_dtype(t), list(t.shape), t.data_ptr())
        binding.bind_output(self.output_name, "cuda", self.options.device_id, _np_dtype(out), list(out.shape),
                            out.data_ptr())
        # ONNX Runtime runs on its own stream: torch's writes to the inputs must be finished.
        torch.cuda.current_stream(self._device()).synchronize()
        self._session.run_with_iobinding(binding)
        return out

    def graph_slot(self, dims: dict[str, int]) -> _GraphSlot:
        """The static-shape session and buffers of ``dims`` (built, and its graph captured, on first use)."""
        import torch

        key = tuple(sorted(dims.items()))
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        while len(self._slots) >= self.options.max_graph_sessions:
            self._slots.popitem(last=False)
        logger.info("ONNX Runtime: new CUDA-graph session for %s", dict(key))
        session = make_session(self.path, options=self.options, static_dims=dict(dims))
        bufs = {name: torch.zeros(self.spec.concrete_shape(name, dims), dtype=torch_dtype(t), device=self._device())
                for name, t in self.input_types.items()}
        slot = _GraphSlot(session, bufs, self._empty_output(dims))
        self._slots[key] = slot
        return slot

    def _run_graph(self, inputs: dict):
        import torch

        dims = self.dims(inputs)
        slot = self.graph_slot(dims)
        for name, buf in slot.inputs.items():
            buf.copy_(inputs[name])
        torch.cuda.current_stream(self._device()).synchronize()
        slot.session.run_with_iobinding(slot.binding)
        # The next replay overwrites the output buffer: hand out a copy.
        return slot.output.clone()


def make_ort_denoiser(adapter, session_or_engine, options: OrtOptions | None = None, path: str | Path | None = None):
    """An ``nn.Module`` that replaces ``adapter.denoiser`` and runs ONNX Runtime instead.

    Args:
        adapter: The model adapter whose denoiser is replaced.
        session_or_engine: An :class:`OrtEngine`, an ``InferenceSession``, or ``None`` with ``path``.
        options: Session settings when an engine is built here.
        path: ONNX file when an engine is built here.

    Returns:
        A module with the denoiser's call signature; it returns the output in the dtype of the
        pipeline's ``sample`` (an FP16 engine serves an FP32 pipeline and vice versa).
    """
    import torch

    if isinstance(session_or_engine, OrtEngine):
        engine = session_or_engine
    elif session_or_engine is not None:
        engine = OrtEngine(path or "<session>", adapter.denoiser_spec(), options, session=session_or_engine)
    else:
        engine = OrtEngine(path, adapter.denoiser_spec(), options)
    original = adapter.denoiser

    class OrtDenoiser(torch.nn.Module):
        """The pipeline's denoiser, served by ONNX Runtime."""

        def __init__(self):
            super().__init__()
            self.engine = engine
            # The pipeline reads config (in_channels, sample_size), dtype and device.
            self.config = original.config
            self._dtype = next(original.parameters()).dtype
            self._device = (torch.device("cuda", engine.options.device_id) if engine.options.on_gpu
                            else torch.device("cpu"))

        @property
        def runner(self):  # kept for callers of the first version
            return engine._runner

        @property
        def calls(self) -> int:
            return engine.calls

        @property
        def dtype(self):
            return self._dtype

        @property
        def device(self):
            return self._device

        def forward(self, *args, **kwargs):
            inputs = adapter.inputs_from_call(args, kwargs)
            sample = inputs[next(iter(inputs))]
            out = engine(inputs).to(device=sample.device, dtype=sample.dtype)
            if kwargs.get("return_dict", True) is False:
                return (out,)
            return adapter.wrap_output(out)

    return OrtDenoiser()
