"""A long-running text-to-audio service over a bundle: HTTP (FastAPI + uvicorn) and Ray Serve.

- :mod:`~adm_export.serving.config`: :class:`ServeConfig`, :class:`RayServeConfig`;
- :mod:`~adm_export.serving.batcher`: dynamic batching by the runtime's batch key, bounded queue;
- :mod:`~adm_export.serving.metrics`: Prometheus metrics;
- :mod:`~adm_export.serving.app`: the FastAPI app (``create_app``);
- :mod:`~adm_export.serving.server`: ``serve(cfg)`` under uvicorn with a graceful SIGTERM drain;
- :mod:`~adm_export.serving.ray_app`: the same app as a Ray Serve deployment.

Nothing here imports torch or diffusers: the runtime is onnxruntime + numpy.
"""

from adm_export.serving.config import RayServeConfig, ServeConfig

__all__ = ["RayServeConfig", "ServeConfig"]
