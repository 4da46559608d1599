"""The HTTP service as a FastAPI app: ``POST /v1/generate``, ``GET /health``, ``GET /metrics``.

:func:`create_app` wraps any runtime with the bundle runtime's API (``validate``, ``batch_key``,
``generate``, ``warmup``, ``limits``, ``sampling_rate``, ``model_id``); the same app runs under
uvicorn (:mod:`adm_export.serving.server`) and inside each Ray Serve replica
(:mod:`adm_export.serving.ray_app`).

Every answer other than a clip has one JSON shape, ``{"error": {"code": ..., "message": ...}}``
with a one-line message: 401 ``unauthorized``, 413 ``too_large``, 422 ``invalid_request``, 503 ``overloaded`` (with
``Retry-After``) / ``not_ready`` / ``draining``, 504 ``timeout``, 500 ``internal`` (the traceback
goes to the log, never to the client).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import logging
import secrets
import threading
import time
from typing import Any

from adm_export.errors import AdmExportError, InvalidInputError, MissingDependencyError
from adm_export.serving.batcher import BatcherStoppedError, DynamicBatcher, QueueFullError
from adm_export.serving.config import ServeConfig, read_api_key
from adm_export.serving.metrics import ServingMetrics

try:  # this module is the HTTP layer: without its packages there is nothing to serve
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        f"adm-export serve needs FastAPI, uvicorn and prometheus-client ({_exc}); "
        "install them with: pip install 'adm-export[serve]'"
    ) from _exc

logger = logging.getLogger(__name__)

GENERATE_PATH = "/v1/generate"
DEFAULT_SECONDS = 2.56
DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 2.5
DISCONNECT_POLL_S = 0.05
# A request body is a prompt and four numbers: anything near this size is not one (413).
MAX_BODY_BYTES = 64 * 1024
# 499: nginx's "client closed request", for the metrics of requests whose client went away.
STATUS_CLIENT_GONE = 499


class ApiError(Exception):
    """An answer other than a clip: HTTP status, stable error code, one-line message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class GenerateBody(BaseModel):
    """Body of ``POST /v1/generate``: strict types (``"10"`` is not a number of steps), no unknown fields.

    Omitted values: ``seconds`` 2.56 (within the bundle's limits), ``steps`` 10 (at most the bundle's
    limit), ``guidance`` 2.5, ``seed`` random (returned with the clip, so it can be reproduced).
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    prompt: str
    seconds: float | None = None
    steps: int | None = None
    guidance: float | None = Field(None, validation_alias=AliasChoices("guidance", "guidance_scale"))
    seed: int | None = Field(None, ge=0, lt=2**63)


class ServiceState:
    """What the routes share: runtime, batcher, metrics, readiness and drain flags.

    Args:
        runtime: A runtime with the bundle runtime's API.
        cfg: Service settings.
    """

    def __init__(self, runtime, cfg: ServeConfig):
        self.runtime = runtime
        self.cfg = cfg
        self.limits = dict(runtime.limits)
        bundle_max = int(self.limits.get("max_batch") or 1)
        if cfg.max_batch is not None and cfg.max_batch > bundle_max:
            raise InvalidInputError(
                f"--max-batch {cfg.max_batch} exceeds the bundle's largest batch {bundle_max}; "
                f"pass at most {bundle_max}"
            )
        self.max_batch = cfg.max_batch or bundle_max
        self.metrics = ServingMetrics(self.max_batch)
        self.batcher = DynamicBatcher(runtime, self.max_batch, cfg.max_wait_ms, cfg.max_queue, self.metrics)
        self.api_key = read_api_key(cfg.api_key_file)
        self.phase = "warming"  # -> ready | failed; draining on SIGTERM
        self.failure: str | None = None
        self.draining = False
        self.drain_started: float | None = None
        self._warm_thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        """Engines loaded and warmed, and not draining."""
        return self.phase == "ready" and not self.draining

    def start(self) -> None:
        """Start the batcher and, unless already warm, warm the runtime in a thread (``/health``: 503 until done)."""
        self.batcher.start()
        if self.phase == "warming":
            self._warm_thread = threading.Thread(target=self.warm, name="adm-serve-warmup", daemon=True)
            self._warm_thread.start()

    def warm(self) -> None:
        """Run the runtime's warm-up now; sets the phase to ``ready`` or ``failed``."""
        t0 = time.monotonic()
        try:
            self.runtime.warmup()
        except Exception as exc:  # reported by /health; it ends the server
            logger.exception("warm-up failed")
            self.failure = f"warm-up failed: {type(exc).__name__}: {exc}"
            self.phase = "failed"
            return
        self.phase = "ready"
        self.metrics.ready.set(1)
        logger.info("engines warmed in %.1f s: ready", time.monotonic() - t0)

    def begin_drain(self) -> None:
        """Stop accepting clip requests (503) and let the accepted ones finish."""
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()
            self.metrics.ready.set(0)
            logger.info("draining: %d queued, %d running", self.batcher.queued, self.batcher.running)

    def stop(self) -> None:
        """Finish what the batcher holds and end its thread."""
        self.batcher.stop(timeout=self.cfg.drain_timeout_s)


def _error_response(exc: ApiError):
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status,
                        headers=exc.headers)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    """One line from pydantic's error list: the first problem, and how many more there are."""
    if not errors:
        return "invalid request"
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query")]
    field = ".".join(loc)
    kind, msg = err.get("type", ""), err.get("msg", "invalid")
    if kind == "json_invalid":
        line = f"invalid JSON body: {err.get('ctx', {}).get('error', msg)}"
    elif kind == "missing":
        line = f"missing field {field!r}" if field else "missing request body: send a JSON object"
    elif kind == "extra_forbidden":
        line = f"unknown field {field!r}; allowed: prompt, seconds, steps, guidance, seed"
    else:
        value = err.get("input")
        shown = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
        if isinstance(value, str) and len(value) > 40:
            shown = repr(value[:37] + "...")
        line = f"invalid {field!r} {shown}: {msg}" if field else f"invalid body: {msg}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return line


async def _parse_body(request) -> GenerateBody:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"request body of {declared} bytes; at most {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies have no length: count as they come
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "too_large", f"request body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(422, "invalid_request", "missing request body: send a JSON object, e.g. {\"prompt\": \"rain\"}")
    try:
        return GenerateBody.model_validate_json(raw)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", _validation_message(exc.errors())) from None


def _wav_bytes(wave, sampling_rate: int) -> bytes:
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.nan_to_num(np.asarray(wave, dtype=np.float32).reshape(-1)), -1, 1), sampling_rate,
             format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def _await_job(state: ServiceState, job, request, deadline: float):
    """The job's waveform; raises :class:`ApiError` (timeout) or ``ConnectionAbortedError`` (client gone)."""
    fut = asyncio.wrap_future(job.future)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            state.batcher.cancel(job, "timeout")
            raise ApiError(504, "timeout",
                           f"no clip within --timeout {state.cfg.timeout_s:g} s; the request was dropped")
        done, _ = await asyncio.wait({fut}, timeout=min(DISCONNECT_POLL_S, remaining))
        if done:
            return fut.result()
        if await request.is_disconnected():
            state.batcher.cancel(job, "client")
            raise ConnectionAbortedError("client disconnected")


def create_app(runtime, cfg: ServeConfig, state: ServiceState | None = None):
    """Build the FastAPI app serving ``runtime``.

    Args:
        runtime: A loaded runtime with the bundle runtime's API (:class:`adm_export.runtime.BundleRuntime`).
        cfg: Service settings (batching, queue, timeout, auth).
        state: Shared state, when the caller (the uvicorn server) needs a handle on it.

    Returns:
        The app; ``app.state.service`` is its :class:`ServiceState`.
    """
    from adm_export.runtime import GenerationRequest

    state = state or ServiceState(runtime, cfg)
    limits = state.limits

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.stop)

    app = FastAPI(title="adm-export serve", version=_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = state

    def count(status: int) -> None:
        state.metrics.requests.labels(status=str(status)).inc()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        if request.url.path == GENERATE_PATH:
            count(exc.status)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return await api_error(request, ApiError(422, "invalid_request", _validation_message(list(exc.errors()))))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, code, str(exc.detail), dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        message = f"internal error ({type(exc).__name__}); see the server log"
        return await api_error(request, ApiError(500, "internal", message))

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token: send 'Authorization: Bearer TOKEN'",
                           {"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        body = {"status": "draining" if state.draining else state.phase, "model": runtime.model_id,
                "sampling_rate": runtime.sampling_rate, "queued": state.batcher.queued,
                "running": state.batcher.running, "max_batch": state.max_batch, "limits": limits}
        if state.failure:
            body["error"] = state.failure
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics():
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    @app.post(GENERATE_PATH, dependencies=[Depends(authorize)])
    async def generate(request: Request, format: str | None = Query(None, pattern="^(wav|json)$")):
        t0 = time.monotonic()
        body = await _parse_body(request)  # JSON whatever the Content-Type (curl -d sends a form type)
        if state.draining:
            raise ApiError(503, "draining", "the server is shutting down; send the request to another instance",
                           {"Retry-After": "5"})
        if state.phase != "ready":
            raise ApiError(503, "not_ready", f"engines not ready ({state.phase}); retry shortly",
                           {"Retry-After": "2"})
        req = GenerationRequest(
            prompt=body.prompt,
            seconds=float(body.seconds if body.seconds is not None else _default_seconds(limits)),
            steps=body.steps if body.steps is not None else min(DEFAULT_STEPS, int(limits.get("max_steps", 1000))),
            guidance_scale=float(body.guidance if body.guidance is not None else DEFAULT_GUIDANCE),
            seed=int(body.seed if body.seed is not None else secrets.randbelow(2**31)),
        )
        try:
            runtime.validate(req)
        except AdmExportError as exc:
            message = str(exc).splitlines()[0] if str(exc) else "invalid request"
            raise ApiError(422, "invalid_request", message) from None
        try:
            job = state.batcher.submit(req)
        except QueueFullError as exc:
            raise ApiError(503, "overloaded", f"queue full ({state.cfg.max_queue} waiting); retry after "
                           f"{exc.retry_after} s", {"Retry-After": str(exc.retry_after)}) from None
        except BatcherStoppedError:
            raise ApiError(503, "draining", "the server is shutting down", {"Retry-After": "5"}) from None
        try:
            wave = await _await_job(state, job, request, t0 + state.cfg.timeout_s)
        except ConnectionAbortedError:
            count(STATUS_CLIENT_GONE)
            return Response(status_code=STATUS_CLIENT_GONE)
        except asyncio.CancelledError:  # the ASGI server (or Ray Serve) gave up on the request
            state.batcher.cancel(job, "client")
            count(STATUS_CLIENT_GONE)
            raise
        if wave is None:  # cancelled in the batch after all (timeout raced the last step)
            raise ApiError(504, "timeout", "the request was dropped before its clip was ready")
        sr = int(runtime.sampling_rate)
        wav = _wav_bytes(wave, sr)
        latency = time.monotonic() - t0
        meta = {"model": runtime.model_id, "sampling_rate": sr, "samples": int(len(wave)),
                "seconds": req.seconds, "steps": req.steps, "guidance": req.guidance_scale, "seed": req.seed,
                "batch_size": job.batch_size, "queue_seconds": round((job.started or t0) - job.arrived, 4),
                "latency_seconds": round(latency, 4)}
        count(200)
        state.metrics.latency.observe(latency)
        wants_json = format == "json" or (format is None and "application/json" in request.headers.get("accept", ""))
        if wants_json:
            return JSONResponse({**meta, "wav_base64": base64.b64encode(wav).decode("ascii")})
        headers = {"X-Seed": str(req.seed), "X-Sampling-Rate": str(sr), "X-Batch-Size": str(job.batch_size),
                   "X-Latency-Seconds": f"{latency:.4f}",
                   "Content-Disposition": f'attachment; filename="clip-{req.seed}.wav"'}
        return Response(wav, media_type="audio/wav", headers=headers)

    return app


def _default_seconds(limits: dict) -> float:
    lo, hi = float(limits.get("min_seconds", 0.0)), float(limits.get("max_seconds", DEFAULT_SECONDS))
    return min(max(DEFAULT_SECONDS, lo), hi)


def _version() -> str:
    from adm_export.version import __version__

    return __version__


__all__ = ["ApiError", "ServiceState", "create_app"]
