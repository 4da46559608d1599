"""``adm-export serve``: the app under uvicorn, with a graceful drain on SIGTERM.

On SIGTERM (or Ctrl+C) the server keeps listening but answers new clip requests and ``/health``
with 503, lets every accepted request finish (at most ``--drain-timeout`` seconds), then stops
and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from adm_export.errors import AdmExportError, MissingDependencyError
from adm_export.serving.config import ServeConfig

logger = logging.getLogger(__name__)

try:
    import uvicorn
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        f"adm-export serve needs uvicorn ({_exc}); install it with: pip install 'adm-export[serve]'"
    ) from _exc


class ServerFailedError(AdmExportError):
    """The runtime could not be warmed up: the service never became ready."""


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM/SIGINT drains instead of stopping.

    Args:
        config: uvicorn settings.
        state: The app's :class:`~adm_export.serving.app.ServiceState`.
    """

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state
        self.bound_port: int | None = None

    def handle_exit(self, sig: int, frame) -> None:  # called from the signal handler
        if self.state.draining or self.state.phase != "ready":
            # A second signal, or nothing to drain: stop now.
            if self.state.draining:
                self.force_exit = True
                self.state.batcher.cancel_all("shutdown")
            self.should_exit = True
            return
        self.state.begin_drain()  # not uvicorn's captured signal: the process must end with 0, not re-raise it

    async def on_tick(self, counter: int) -> bool:
        state = self.state
        if state.failure is not None:
            self.should_exit = True
        elif state.draining and not self.should_exit:
            waited = time.monotonic() - (state.drain_started or time.monotonic())
            if state.batcher.idle or waited > state.cfg.drain_timeout_s:
                if not state.batcher.idle:
                    logger.warning("drain timeout: %d request(s) still queued or running",
                                   state.batcher.queued + state.batcher.running)
                self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                self.bound_port = sock.getsockname()[1]
                break
        if self.bound_port is not None:
            # One parseable line (tests and scripts started with --port 0 read the port from it).
            print(f"adm-export serve: listening on http://{self.config.host}:{self.bound_port}", flush=True)


def load_runtime(cfg: ServeConfig):
    """The bundle runtime for ``cfg`` (a user error if the bundle is missing or changed)."""
    from adm_export.runtime import BundleRuntime, RuntimeOptions

    options = RuntimeOptions(device=cfg.device, threads=cfg.threads, cuda_graph=cfg.cuda_graph,
                             prefer_nhwc=cfg.prefer_nhwc)
    if cfg.max_batch is not None:  # the runtime sizes its limits (and CUDA graphs) for the largest batch
        options = dataclasses.replace(options, max_batch=cfg.max_batch)
    return BundleRuntime(cfg.bundle, options)


def serve(cfg: ServeConfig, runtime=None) -> None:
    """Serve ``cfg.bundle`` (or an already loaded ``runtime``) over HTTP until SIGTERM.

    Args:
        cfg: Service settings.
        runtime: A loaded runtime with the bundle runtime's API; loaded from ``cfg.bundle`` if ``None``.

    Raises:
        AdmExportError: Bad settings or bundle (before anything listens), or a failed warm-up.
    """
    from adm_export.serving.app import ServiceState, create_app

    # 1. Everything that can be refused is checked before the port opens.
    runtime = runtime if runtime is not None else load_runtime(cfg)
    state = ServiceState(runtime, cfg)
    app = create_app(runtime, cfg, state)
    # 2. Listen at once; /health says 503 until the warm-up (in a thread) is done.
    # Connections are bounded too (uvicorn answers 503 beyond): the queue's clients, one batch,
    # and room for health checks and scrapes.
    limit = 4 * (cfg.max_queue + state.max_batch) + 64
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, lifespan="on",
                            timeout_graceful_shutdown=int(cfg.drain_timeout_s) + 5, server_header=False,
                            limit_concurrency=limit)
    server = DrainingServer(config, state)
    logger.info("serving %s (%s, max batch %d, queue %d)", runtime.model_id, cfg.device, state.max_batch, cfg.max_queue)
    server.run()
    if state.failure is not None:
        raise ServerFailedError(state.failure)


__all__ = ["DrainingServer", "load_runtime", "serve"]
