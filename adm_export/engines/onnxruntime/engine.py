"""An ONNX model served by ONNX Runtime and called with named torch tensors.

On the CPU :class:`OrtEngine` feeds numpy arrays; on CUDA it binds the torch tensors' device
memory directly (IO binding: no host round trip), cast to the dtypes the graph declares (FP16
inputs and outputs for an FP16 export, FP32 for the fused CUDA engine, which casts inside). With
``cuda_graph`` it pins the dynamic dimensions per input shape (one session per shape, built on
first use), so every shape computation folds away and the whole step is captured as one CUDA
graph that later calls replay from fixed input and output buffers.
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path
from typing import Any

from adm_export.engines.onnxruntime.sessions import (
    OrtOptions,
    OrtRunner,
    check_graph_serves,
    graph_info,
    make_session,
    torch_dtype,
)

logger = logging.getLogger(__name__)


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

    Attributes:
        calls: Steps run so far.
        session_seconds: Time spent creating sessions (per shape with ``cuda_graph``).

    Raises:
        InvalidInputError: ``options`` cannot serve this graph (see ``check_graph_serves``).
    """

    def __init__(self, path: str | Path, spec, options: OrtOptions | None = None, session=None):
        self.path = Path(path)
        self.spec = spec
        self.options = options or OrtOptions()
        self.calls = 0
        self.session_seconds = 0.0
        self._slots: collections.OrderedDict = collections.OrderedDict()
        self._session = session
        if session is not None:
            self.input_types = {i.name: i.type for i in session.get_inputs()}
            self.output_name = session.get_outputs()[0].name
            self.output_type = session.get_outputs()[0].type
        else:
            # Read from the file: a fused CUDA graph cannot be loaded by the CPU provider, and a
            # CUDA-graph engine has no dynamic-shape session to ask.
            info = graph_info(self.path)
            check_graph_serves(info, self.options, f"{self.path}")
            self.input_types, self.output_name, self.output_type = info.inputs, info.output_name, info.output_type
            if not self.options.cuda_graph:
                self._session = self._new_session()
        self._runner = OrtRunner(self._session) if self._session is not None else None

    def _new_session(self, static_dims: dict[str, int] | None = None):
        start = time.perf_counter()
        session = make_session(self.path, options=self.options, static_dims=static_dims)
        self.session_seconds += time.perf_counter() - start
        return session

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
        session = self._new_session(static_dims=dict(dims))
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
