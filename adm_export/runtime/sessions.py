"""ONNX Runtime sessions without torch: a session factory, a numpy runner, and the U-Net runner.

The session settings have one home, :class:`adm_export.engines.onnxruntime.OrtOptions` (provider,
threads, CUDA graphs, NHWC, cuDNN search) with ``providers_for`` and ``session_options``; that
module imports nothing heavy at its top, so the runtime uses them as they are. Only the session
factory is this module's own: ``engines.onnxruntime.make_session`` imports torch first to load
the CUDA libraries, which the runtime must not do; here ``onnxruntime.preload_dlls`` loads them
(from the ``nvidia-*`` wheels or the system).

:class:`UNetRunner` runs the denoiser engine as the engine stage serves it: on the CPU with numpy
feeds; on CUDA with IO binding (the conditioning stays on the GPU for the whole run, only the
latents and timesteps are copied per step); with ``cuda_graph`` one session per input shape with
its dimensions pinned, fixed device buffers updated in place and each step replayed as a CUDA graph.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from adm_export.engines.onnxruntime import OrtOptions, providers_for, session_options
from adm_export.errors import MissingDependencyError, require

logger = logging.getLogger(__name__)

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(double)": np.float64, "tensor(bool)": np.bool_}


def _ort():
    return require("onnxruntime", "gpu", "The bundle runtime")


def open_session(path: str | Path, options: OrtOptions, static_dims: dict[str, int] | None = None):
    """An ``InferenceSession`` for ``path`` with ``options`` (torch-free twin of ``engines.onnxruntime.make_session``).

    Raises:
        MissingDependencyError: A GPU provider was asked for but ONNX Runtime could not load it
            (it would otherwise run on the CPU without saying so).
    """
    ort = _ort()
    if options.on_gpu:
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            try:
                preload()
            except Exception as exc:  # pragma: no cover - depends on the GPU machine's libraries
                logger.debug("onnxruntime.preload_dlls failed: %s", exc)
    session = ort.InferenceSession(str(path), sess_options=session_options(options, static_dims=static_dims),
                                   providers=providers_for(options))
    if options.on_gpu and "CUDAExecutionProvider" not in session.get_providers():
        raise MissingDependencyError(
            f"ONNX Runtime could not load its CUDA provider for {Path(path).name} (session runs on "
            f"{session.get_providers()}); install the CUDA and cuDNN libraries onnxruntime-gpu was built for, "
            f"or use device='cpu'"
        )
    return session


class OnnxModel:
    """A session called with named numpy arrays, cast to the dtypes the graph declares.

    Args:
        path: ONNX file.
        options: Session settings.
    """

    def __init__(self, path: str | Path, options: OrtOptions):
        self.path = Path(path)
        self.session = open_session(path, options)
        self.input_types = {i.name: _NP.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        feed = {n: np.ascontiguousarray(np.asarray(inputs[n]).astype(t, copy=False))
                for n, t in self.input_types.items()}
        return self.session.run(self.output_names, feed)


@dataclasses.dataclass
class _GraphSlot:
    """A static-shape session whose CUDA graph reads and writes fixed device buffers."""

    session: Any
    inputs: dict[str, Any]  # name -> OrtValue on the GPU
    output: Any
    binding: Any
    constants_version: int = -1


class UNetRunner:
    """The denoiser engine of a bundle, called once per sampler step.

    Call :meth:`set_constants` with the inputs that stay fixed for a run (the conditioning), then
    the runner with the per-step ones (``sample``, ``timestep``).

    Args:
        path: ``unet.onnx`` of the bundle.
        options: Session settings (``cuda_graph`` pins the shapes per (batch, frames)).
        dim_names: ``{input name: {axis: dimension name}}`` of the engine's dynamic axes
            (``batch``, ``frames``), to pin them for CUDA graphs.
    """

    def __init__(self, path: str | Path, options: OrtOptions, dim_names: dict[str, dict[int, str]]):
        self.path = Path(path)
        self.options = options
        self.dim_names = dim_names
        self._lock = threading.Lock()
        self._slots: collections.OrderedDict = collections.OrderedDict()
        self._constants: dict[str, np.ndarray] = {}
        self._device_constants: dict[str, Any] = {}
        self._version = 0
        self.calls = 0
        # "plain" (numpy feeds), "bound" (IO binding) or "graph" (CUDA graphs); the device of the
        # bound buffers follows the provider, so both paths also run (and are tested) on the CPU.
        self.mode = "graph" if options.cuda_graph else ("bound" if options.on_gpu else "plain")
        self.device_type = "cuda" if options.on_gpu else "cpu"
        self.session = None if options.cuda_graph else open_session(path, options)
        # With CUDA graphs the sessions are per shape: read the graph's inputs from a plain session
        # on the same provider (a fused CUDA graph may hold ops the CPU provider cannot load).
        probe = self.session or open_session(path, dataclasses.replace(options, cuda_graph=False))
        self.input_types = {i.name: _NP.get(i.type, np.float32) for i in probe.get_inputs()}
        self.input_shapes = {i.name: list(i.shape) for i in probe.get_inputs()}
        self.output_name = probe.get_outputs()[0].name
        self.output_shape = list(probe.get_outputs()[0].shape)
        self.output_type = _NP.get(probe.get_outputs()[0].type, np.float32)
        del probe

    def fixed_dim(self, name: str, axis: int) -> int | None:
        """The engine's fixed size of ``name``'s ``axis``, or None where it is dynamic."""
        d = self.input_shapes[name][axis]
        return int(d) if isinstance(d, int) and d > 0 else None

    def set_constants(self, constants: dict[str, np.ndarray]) -> None:
        """Inputs that stay the same for every step of a run (the conditioning rows)."""
        self._constants = {n: np.ascontiguousarray(v.astype(self.input_types[n], copy=False))
                           for n, v in constants.items()}
        self._version += 1
        self._device_constants = {}
        if self.mode == "bound":
            ort = _ort()
            self._device_constants = {n: ort.OrtValue.ortvalue_from_numpy(v, self.device_type, self.options.device_id)
                                      for n, v in self._constants.items()}

    def __call__(self, **step_inputs: np.ndarray) -> np.ndarray:
        """One denoiser call; returns the output as float32 numpy."""
        self.calls += 1
        feed = {n: np.ascontiguousarray(np.asarray(v).astype(self.input_types[n], copy=False))
                for n, v in step_inputs.items()}
        if self.mode == "plain":
            out = self.session.run([self.output_name], {**self._constants, **feed})[0]
        elif self.mode == "graph":
            out = self._run_graph(feed)
        else:
            out = self._run_bound(feed)
        return out.astype(np.float32, copy=False)

    def _run_bound(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        binding = self.session.io_binding()
        for name, value in self._device_constants.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(self.output_name, self.device_type, self.options.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _dims(self, arrays: dict[str, np.ndarray]) -> dict[str, int]:
        dims: dict[str, int] = {}
        for name, axes in self.dim_names.items():
            if name in arrays:
                for axis, dim in axes.items():
                    dims.setdefault(dim, int(arrays[name].shape[axis]))
        return dims

    def _slot(self, dims: dict[str, int], arrays: dict[str, np.ndarray]) -> _GraphSlot:
        key = tuple(sorted(dims.items()))
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                self._slots.move_to_end(key)
                return slot
            while len(self._slots) >= self.options.max_graph_sessions:
                self._slots.popitem(last=False)
            logger.info("bundle runtime: new CUDA-graph U-Net session for %s", dict(key))
            ort = _ort()
            session = open_session(self.path, self.options, static_dims=dims)
            dev = self.options.device_id
            inputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), a.dtype.type, self.device_type, dev)
                      for n, a in arrays.items()}
            out_shape = [dims.get(d, d) if isinstance(d, str) else d for d in self.output_shape]
            if any(isinstance(d, str) for d in out_shape):  # output axes not named like the inputs'
                out_shape = list(arrays["sample"].shape)
            output = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, self.output_type, self.device_type, dev)
            binding = session.io_binding()
            for n, v in inputs.items():
                binding.bind_ortvalue_input(n, v)
            binding.bind_ortvalue_output(self.output_name, output)
            slot = _GraphSlot(session, inputs, output, binding)
            self._slots[key] = slot
            return slot

    def _run_graph(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        arrays = {**self._constants, **feed}
        slot = self._slot(self._dims(arrays), arrays)
        if slot.constants_version != self._version:
            for name, value in self._constants.items():
                slot.inputs[name].update_inplace(value)
            slot.constants_version = self._version
        for name, value in feed.items():
            slot.inputs[name].update_inplace(value)
        slot.session.run_with_iobinding(slot.binding)
        return slot.output.numpy()
