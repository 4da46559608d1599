"""Settings of ``adm-export serve`` and of its Ray Serve deployment (frozen, validated, JSON-able).

Here rather than in :mod:`adm_export.config` (the home of the build stages' configs): the serving
package is deployed on its own, beside a bundle, and these settings belong to it (with the API-key
reader); they use the same checks (:func:`adm_export.config.check_finite`,
:func:`adm_export.devices.check_device`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from adm_export.config import check_finite
from adm_export.devices import check_device
from adm_export.errors import InvalidInputError


def _check_positive(flag: str, value, integer: bool = True) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise InvalidInputError(f"invalid {flag} {value!r}: must be {kind}")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of the HTTP service.

    Attributes:
        bundle: Bundle folder (from ``adm-export bundle``).
        host: Interface to listen on; loopback unless told otherwise.
        port: TCP port (0: any free port, printed at start).
        device: ``cpu`` or ``cuda``: where the runtime's ONNX Runtime sessions run.
        threads: ONNX Runtime CPU threads (0: ONNX Runtime's default).
        cuda_graph: CUDA: replay each U-Net step as a captured CUDA graph (one per batch shape).
        prefer_nhwc: CUDA: let ONNX Runtime use NHWC convolution kernels in the U-Net.
        max_batch: Most requests sampled together in one U-Net batch; ``None``: the bundle's limit.
        max_wait_ms: How long a batch that is not full waits for the next request of its length (each
            arrival restarts the wait; at most ``max_batch`` times this in all).
        max_queue: Most requests waiting for a batch; beyond it a request gets 503 with Retry-After.
        timeout_s: Per-request limit from arrival to the clip (504 after it; its work is dropped).
        drain_timeout_s: On SIGTERM, how long accepted requests may take to finish before the
            process exits anyway.
        api_key_file: File holding the bearer token that ``/v1/generate`` requires (read once).
        log_level: uvicorn's log level.
    """

    bundle: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    threads: int = 0
    cuda_graph: bool = False
    prefer_nhwc: bool = False
    max_batch: int | None = None
    max_wait_ms: float = 10.0
    max_queue: int = 64
    timeout_s: float = 300.0
    drain_timeout_s: float = 60.0
    api_key_file: str | None = None
    log_level: str = "info"

    def __post_init__(self):
        check_finite(self, {"max_wait_ms": "--max-wait-ms", "timeout_s": "--timeout",
                            "drain_timeout_s": "--drain-timeout"})
        check_device(self.device, available=False)
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InvalidInputError(f"invalid --port {self.port!r}: must be 0..65535 (0: any free port)")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise InvalidInputError(f"invalid --threads {self.threads!r}: must be >= 0 (0: ONNX Runtime's default)")
        if self.cuda_graph and self.device != "cuda":
            raise InvalidInputError("--cuda-graph needs --device cuda; drop --cuda-graph to serve on the CPU")
        if self.max_batch is not None:
            _check_positive("--max-batch", self.max_batch)
        _check_positive("--max-queue", self.max_queue)
        _check_positive("--timeout", self.timeout_s, integer=False)
        _check_positive("--drain-timeout", self.drain_timeout_s, integer=False)
        if not isinstance(self.max_wait_ms, (int, float)) or self.max_wait_ms < 0:
            raise InvalidInputError(f"invalid --max-wait-ms {self.max_wait_ms!r}: must be >= 0")
        if self.api_key_file is not None and not Path(self.api_key_file).is_file():
            raise InvalidInputError(
                f"--api-key-file {self.api_key_file!r} is not a file; give a file holding the token"
            )


def read_api_key(path: str | None) -> str | None:
    """The bearer token in ``path`` (surrounding whitespace removed), or ``None`` without a file.

    The token is never logged nor put in a message.
    """
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"--api-key-file {path!r} cannot be read ({type(exc).__name__})") from None
    if not token or any(c.isspace() for c in token):
        raise InvalidInputError(f"--api-key-file {path!r} must hold one token: no spaces, not empty")
    return token


@dataclasses.dataclass(frozen=True)
class RayServeConfig:
    """How the service is scaled out under Ray Serve (one runtime per replica).

    Attributes:
        serve: The per-replica service settings (bundle, device, batching, queue, timeouts, auth).
        num_replicas: Fixed replica count; ignored when ``max_replicas`` is set (autoscaling).
        min_replicas: Autoscaling lower bound.
        max_replicas: Autoscaling upper bound; ``None``: a fixed ``num_replicas``.
        target_ongoing_requests: Autoscaling target of requests in flight per replica.
        num_cpus: CPUs reserved per replica.
        num_gpus: GPUs per replica; ``None``: 1 with ``device="cuda"``, else 0.
        max_ongoing_requests: Requests Ray sends one replica at a time (its batcher queues them).
        route_prefix: HTTP path the application is mounted at.
        name: Ray Serve application name.
    """

    serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)
    num_replicas: int = 1
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    num_cpus: float = 1.0
    num_gpus: float | None = None
    max_ongoing_requests: int = 64
    route_prefix: str = "/"
    name: str = "adm-export"

    def __post_init__(self):
        check_finite(self, {"target_ongoing_requests": "--target-ongoing-requests", "num_cpus": "--num-cpus",
                            "num_gpus": "--num-gpus"})
        _check_positive("--replicas", self.num_replicas)
        _check_positive("--max-ongoing-requests", self.max_ongoing_requests)
        _check_positive("--target-ongoing-requests", self.target_ongoing_requests, integer=False)
        if not isinstance(self.min_replicas, int) or self.min_replicas < 0:
            raise InvalidInputError(f"invalid --min-replicas {self.min_replicas!r}: must be >= 0")
        if self.max_replicas is not None:
            _check_positive("--max-replicas", self.max_replicas)
            if self.max_replicas < self.min_replicas:
                raise InvalidInputError(
                    f"--max-replicas {self.max_replicas} is below --min-replicas {self.min_replicas}"
                )
        if self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise InvalidInputError("--num-cpus and --num-gpus must be >= 0")

    @property
    def gpus_per_replica(self) -> float:
        """GPUs each replica reserves: one on CUDA unless told otherwise."""
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if self.serve.device == "cuda" else 0.0
