"""TensorRT's timing cache, shared between builds: loaded, merged and saved under a file lock.

TensorRT-RTX ignores timing caches (its kernels are compiled on the GPU at run time; loading a saved
cache on a machine without a GPU makes it probe CUDA and log errors), so the cache is used with
full TensorRT only.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Iterator

from adm_export.artifacts import write_bytes

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _file_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """Advisory lock on ``<path>.lock`` (a separate file, since ``path`` itself gets replaced)."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; writes stay atomic through os.replace
        fcntl = None
    with open(lock_path, "a+b") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def attach(config, timing_cache, backend: str, notes: list[str]) -> dict:
    report = {
        "path": str(timing_cache) if timing_cache else None,
        "used": False,
        "loaded_bytes": 0,
        "saved_bytes": 0,
    }
    if not timing_cache:
        return report
    if backend == "tensorrt-rtx":
        report["reason"] = (
            "TensorRT-RTX ignores timing caches (kernels are compiled on the GPU at run time)"
        )
        notes.append(report["reason"])
        logger.info("Not using timing cache %s: %s", timing_cache, report["reason"])
        return report
    report["loaded_bytes"] = load(config, Path(timing_cache))
    report["used"] = True
    return report


def load(config, path: Path) -> int:
    """Attach the cache stored at ``path`` (or an empty one) to ``config``; return the bytes read."""
    data = b""
    if path.is_file():
        with _file_lock(path, exclusive=False):
            data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cache = config.create_timing_cache(data)
        if cache is None or not config.set_timing_cache(cache, False):
            logger.warning(
                "Timing cache %s does not fit this TensorRT version or GPU; starting an empty one", path
            )
            data = b""
            config.set_timing_cache(config.create_timing_cache(b""), False)
    logger.debug("Timing cache %s: loaded %d bytes", path, len(data))
    return len(data)


def save(config, path: Path) -> int:
    """Merge this build's timing cache with the file's current contents and replace the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cache = config.get_timing_cache()
        with _file_lock(path, exclusive=True):
            # Another build may have saved since we loaded: merge, so neither loses its entries.
            if path.is_file():
                other = config.create_timing_cache(path.read_bytes())
                if other is not None:
                    cache.combine(other, True)
            data = bytes(memoryview(cache.serialize()))
            write_bytes(path, data)
    logger.debug("Timing cache %s: saved %d bytes", path, len(data))
    return len(data)

