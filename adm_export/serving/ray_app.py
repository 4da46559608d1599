"""The service as a Ray Serve deployment: the same FastAPI app, one bundle runtime per replica.

Ray Serve does the scale-out (replicas, one GPU each on CUDA, autoscaling between bounds, routing,
replica health, graceful shutdown); each replica keeps the single-process behaviour of
``adm-export serve`` (dynamic batching, bounded queue, validation, timeouts, auth, metrics).

Three ways in:

- ``adm-export serve BUNDLE --ray --replicas 2`` (or ``--min-replicas 1 --max-replicas 4``);
- Ray's own CLI: ``serve run adm_export.serving.ray_app:app_builder bundle=BUNDLE device=cuda
  max_replicas=4`` (every :class:`ServeConfig` and :class:`RayServeConfig` field as ``key=value``);
- Python: ``serve.run(build_app(RayServeConfig(...)))``.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from adm_export.errors import InvalidInputError, MissingDependencyError
from adm_export.serving.config import RayServeConfig, ServeConfig

try:
    from ray import serve
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        f"running under Ray Serve needs ray[serve] ({_exc}); install it with: pip install 'adm-export[ray]'"
    ) from _exc

logger = logging.getLogger(__name__)


@serve.ingress()
class AudioGenerationDeployment:
    """One replica: loads and warms the runtime, then serves the app of :func:`create_app`.

    Args:
        cfg: Service settings as a dict (:func:`dataclasses.asdict` of a :class:`ServeConfig`).
        runtime_factory: ``ServeConfig -> runtime``; ``None``: the bundle runtime. It must be
            importable by the replica's worker (Ray pickles it by reference).
    """

    def __init__(self, cfg: dict[str, Any], runtime_factory: Callable | None = None):
        from adm_export.serving.app import ServiceState, create_app
        from adm_export.serving.server import load_runtime

        serve_cfg = ServeConfig(**cfg)
        runtime = runtime_factory(serve_cfg) if runtime_factory is not None else load_runtime(serve_cfg)
        self._state = ServiceState(runtime, serve_cfg)
        # Warm before the replica counts as started, so Ray routes nothing to a cold replica.
        self._state.warm()
        if self._state.failure is not None:
            raise RuntimeError(self._state.failure)
        self._app = create_app(runtime, serve_cfg, self._state)

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        """Ray's replica health check: a failed runtime gets the replica replaced."""
        if self._state.failure is not None:
            raise RuntimeError(self._state.failure)


def build_app(cfg: RayServeConfig, runtime_factory: Callable | None = None):
    """The Ray Serve application for ``cfg`` (pass it to ``serve.run``).

    Args:
        cfg: Replicas, autoscaling bounds and per-replica resources, and the service settings.
        runtime_factory: ``ServeConfig -> runtime`` (tests); ``None``: the bundle runtime.

    Returns:
        A bound Ray Serve application.
    """
    options: dict[str, Any] = {
        "name": "AudioGeneration",
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.gpus_per_replica},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        # Ray's own graceful stop of a replica waits for its requests, as SIGTERM does without Ray.
        "graceful_shutdown_timeout_s": cfg.serve.drain_timeout_s,
    }
    if cfg.max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                         "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        options["num_replicas"] = cfg.num_replicas
    deployment = serve.deployment(AudioGenerationDeployment).options(**options)
    return deployment.bind(dataclasses.asdict(cfg.serve), runtime_factory)


def app_builder(args: dict[str, str]):
    """Entry point of Ray's CLI: ``serve run adm_export.serving.ray_app:app_builder bundle=DIR ...``.

    Args:
        args: ``key=value`` pairs naming :class:`ServeConfig` and :class:`RayServeConfig` fields.
    """
    serve_fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    ray_fields = {f.name: f for f in dataclasses.fields(RayServeConfig) if f.name != "serve"}
    s_kw, r_kw = {}, {}
    for key, value in args.items():
        if key in serve_fields:
            s_kw[key] = _coerce(key, value, serve_fields[key].type)
        elif key in ray_fields:
            r_kw[key] = _coerce(key, value, ray_fields[key].type)
        else:
            raise InvalidInputError(f"unknown argument {key!r}; use fields of ServeConfig or RayServeConfig")
    if "bundle" not in s_kw:
        raise InvalidInputError("missing bundle=DIR (the folder from adm-export bundle)")
    return build_app(RayServeConfig(serve=ServeConfig(**s_kw), **r_kw))


def _coerce(key: str, value, type_name) -> Any:
    if not isinstance(value, str):
        return value
    t = str(type_name)
    try:
        if value.lower() in ("none", "null") and "None" in t:
            return None
        if t.startswith("int"):
            return int(value)
        if t.startswith("float"):
            return float(value)
    except ValueError:
        raise InvalidInputError(f"invalid {key}={value!r}: expected a number") from None
    return value


def run_ray(cfg: RayServeConfig, address: str | None = None, runtime_factory: Callable | None = None) -> None:
    """Start (or join) Ray, deploy the app on ``cfg.serve.host:port`` and block until SIGTERM/SIGINT.

    Args:
        cfg: Deployment settings.
        address: A running Ray cluster; ``None`` starts a local instance.
        runtime_factory: ``ServeConfig -> runtime`` (tests); ``None``: the bundle runtime.
    """
    import ray

    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg, runtime_factory), name=cfg.name, route_prefix=cfg.route_prefix)
    print(f"adm-export serve (Ray Serve): listening on http://{cfg.serve.host}:{cfg.serve.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logger.info("shutting down Ray Serve (replicas finish their requests)")
    serve.delete(cfg.name)  # graceful: each replica drains within graceful_shutdown_timeout_s
    serve.shutdown()
    ray.shutdown()
